"""Where the packets of a classic pcap file are: the record walk in native code, so that
reading a capture costs no Python per packet (pcap replay at millions of packets a second).

The walk is a few lines of LLVM IR (native_code); without llvmlite the same walk runs as a
Python loop. Both fill the same
columns: each packet's offset in a chosen base, captured length and length on the wire.
"""

from __future__ import annotations

import ctypes
import struct
from array import array
from dataclasses import dataclass
from functools import cache
from typing import Any

from .native_code import compile_function, module_header

RECORD = 16  # ts_sec, ts_frac, caplen, len
_ARGS = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64,
         ctypes.c_uint64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
# index(data, pos, end, base, max, swap, offsets, lengths, wire, stats) -> packets found;
# stats: u64[4], where the walk stopped and the shortest, longest and truncated captures
_INDEX_TYPE = ctypes.CFUNCTYPE(ctypes.c_uint64, *_ARGS)


@dataclass
class Index:
    """Packets found: offsets (from `base`), captured and wire lengths; `end` is where the
    walk stopped (the next record, the end of the file, or a record that overruns it)."""

    offsets: array
    lengths: array
    wire: array
    end: int
    shortest: int = 0  # captured lengths (0 without packets) ...
    longest: int = 0
    truncated: int = 0  # ... and packets captured shorter than they were on the wire


def index(data: Any, pos: int, base: int, count: int, big_endian: bool) -> Index:
    """Up to `count` records of `data` (a buffer that stays mapped meanwhile, as a pcap
    file's mmap) from byte `pos`."""
    offsets, lengths, wire = array("Q", bytes(8 * count)), array("I", bytes(4 * count)), \
        array("I", bytes(4 * count))
    walk = _native()
    if walk is None:
        found, end = _python_walk(data, pos, base, count, big_endian, offsets, lengths, wire)
        if found < count:
            del offsets[found:], lengths[found:], wire[found:]
        return Index(offsets, lengths, wire, end, min(lengths, default=0),
                     max(lengths, default=0), sum(map(int.__gt__, wire, lengths)))
    from bpffs.vm.native.regions import buffer_address

    stats = (ctypes.c_uint64 * 4)()
    found = walk(buffer_address(data), pos, len(data), base, count, int(big_endian),
                 offsets.buffer_info()[0], lengths.buffer_info()[0], wire.buffer_info()[0],
                 stats)
    if found < count:
        del offsets[found:], lengths[found:], wire[found:]
    return Index(offsets, lengths, wire, *stats)


def _python_walk(data: Any, pos: int, base: int, count: int, big_endian: bool,
                 offsets: array, lengths: array, wire: array) -> tuple[int, int]:
    unpack, end = struct.Struct(">II" if big_endian else "<II").unpack_from, len(data)
    found = 0
    while found < count and pos + RECORD <= end:
        caplen, length = unpack(data, pos + 8)
        if pos + RECORD + caplen > end:
            break
        offsets[found], lengths[found], wire[found] = pos + RECORD - base, caplen, length
        found += 1
        pos += RECORD + caplen
    return found, pos


@cache
def _native() -> Any:
    """The compiled walk, or None (native_code)."""
    return compile_function(_ir, "pcap_index", _INDEX_TYPE)


def _ir() -> str:
    from llvmlite import ir

    i32, i64, ptr = ir.IntType(32), ir.IntType(64), ir.PointerType()
    module = module_header()
    fn = ir.Function(module, ir.FunctionType(i64, [ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr,
                                                   ptr]), "pcap_index")
    data, start, end, base, count, swap, offsets, lengths, wire, stats = fn.args
    bswap = ir.Function(module, ir.FunctionType(i32, [i32]), "llvm.bswap.i32")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    head, record, store, done = (fn.append_basic_block(n) for n in (
        "head", "record", "store", "done"))
    entry = b.block
    b.branch(head)
    b.position_at_end(head)
    n, pos = b.phi(i64, "n"), b.phi(i64, "pos")
    shortest, longest, truncated = b.phi(i32), b.phi(i32), b.phi(i64)
    n.add_incoming(ir.Constant(i64, 0), entry)
    pos.add_incoming(start, entry)
    for phi, first in ((shortest, ir.Constant(i32, 0xFFFFFFFF)), (longest, ir.Constant(i32, 0)),
                       (truncated, ir.Constant(i64, 0))):
        phi.add_incoming(first, entry)
    body = b.add(pos, ir.Constant(i64, RECORD))
    more = b.and_(b.icmp_unsigned("<", n, count), b.icmp_unsigned("<=", body, end))
    b.cbranch(more, record, done)

    b.position_at_end(record)

    def field(at: int) -> ir.Value:
        raw = b.load(b.gep(data, [b.add(pos, ir.Constant(i64, at))], source_etype=ir.IntType(8)),
                     typ=i32, align=1)
        swapped = b.select(b.icmp_unsigned("!=", swap, ir.Constant(i64, 0)),
                           b.call(bswap, [raw]), raw)
        return swapped

    caplen, length = field(8), field(12)
    after = b.add(body, b.zext(caplen, i64))
    b.cbranch(b.icmp_unsigned("<=", after, end), store, done)

    b.position_at_end(store)
    b.store(b.sub(body, base), b.gep(offsets, [n], source_etype=i64))
    b.store(caplen, b.gep(lengths, [n], source_etype=i32))
    b.store(length, b.gep(wire, [n], source_etype=i32))
    n.add_incoming(b.add(n, ir.Constant(i64, 1)), store)
    pos.add_incoming(after, store)
    shortest.add_incoming(b.select(b.icmp_unsigned("<", caplen, shortest), caplen, shortest),
                          store)
    longest.add_incoming(b.select(b.icmp_unsigned(">", caplen, longest), caplen, longest),
                         store)
    truncated.add_incoming(b.add(truncated, b.zext(b.icmp_unsigned("<", caplen, length), i64)),
                           store)
    b.branch(head)

    b.position_at_end(done)
    none = b.icmp_unsigned("==", n, ir.Constant(i64, 0))
    for at, value in enumerate((pos, b.select(none, ir.Constant(i64, 0), b.zext(shortest, i64)),
                                b.zext(longest, i64), truncated)):
        b.store(value, b.gep(stats, [ir.Constant(i64, at)], source_etype=i64))
    b.ret(n)
    return str(module)
