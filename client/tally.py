"""Counting a result column by value, natively: how many packets had each retval (and how
many bytes they were), each classid, each redirect. A replay's accounting is then a few
operations per distinct value, not per packet.

The tally is an open-addressed table in native code (native_code); it gives up (None) past
MAX_DISTINCT values or without llvmlite, and the caller counts in Python.
"""

from __future__ import annotations

import ctypes
from array import array
from functools import cache
from typing import Any

from .native_code import compile_function, module_header

SLOTS = 1024  # a power of two, twice MAX_DISTINCT: probes stay short
MAX_DISTINCT = 512
_ENTRY = 3  # u64 words a slot: key, packets, weight (packets == 0: an empty slot)
# tally(keys, key_bytes, weights, weight_mask, n, table) -> distinct values, or -1 past
# MAX_DISTINCT; packet i weighs weights[i & weight_mask] (mask 0: one zero for all)
_TALLY_TYPE = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_uint64,
                               ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64,
                               ctypes.c_void_p)
_NO_WEIGHTS = array("I", [0])


def tally(keys: array, weights: array | None = None) -> dict[int, tuple[int, int]] | None:
    """{value: (packets, sum of their weights)} of the column `keys` (array "I" or "Q"),
    `weights` an array "I" as long (or none: sums of 0); None where it cannot count."""
    count = _native()
    if count is None or keys.itemsize not in (4, 8):
        return None
    if weights is not None and (weights.typecode != "I" or len(weights) != len(keys)):
        raise ValueError("weights are a u32 column as long as the keys")
    table = (ctypes.c_uint64 * (SLOTS * _ENTRY))()
    distinct = count(keys.buffer_info()[0], keys.itemsize,
                     (weights if weights else _NO_WEIGHTS).buffer_info()[0],
                     (1 << 64) - 1 if weights else 0, len(keys), table)
    if distinct < 0:
        return None
    return {table[at]: (table[at + 1], table[at + 2]) for at in range(0, SLOTS * _ENTRY, _ENTRY)
            if table[at + 1]}


@cache
def _native() -> Any:
    return compile_function(_ir, "tally", _TALLY_TYPE)


def _ir() -> str:
    from llvmlite import ir

    i32, i64, ptr = ir.IntType(32), ir.IntType(64), ir.PointerType()
    module = module_header()
    fn = ir.Function(module, ir.FunctionType(i64, [ptr, i64, ptr, i64, i64, ptr]), "tally")
    keys, key_bytes, weights, weight_mask, n, table = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))

    def const(value: int) -> ir.Constant:
        return ir.Constant(i64, value)

    def word(slot: ir.Value, field: int) -> ir.Value:
        return b.gep(table, [b.add(b.mul(slot, const(_ENTRY)), const(field))], source_etype=i64)

    entry = b.block
    head, body, probe, empty, full, found, done = (fn.append_basic_block(name) for name in (
        "head", "body", "probe", "empty", "full", "found", "done"))
    b.branch(head)

    b.position_at_end(head)
    i, distinct = b.phi(i64, "i"), b.phi(i64, "distinct")
    i.add_incoming(const(0), entry)
    distinct.add_incoming(const(0), entry)
    b.cbranch(b.icmp_unsigned("<", i, n), body, done)

    b.position_at_end(body)
    wide = b.icmp_unsigned("==", key_bytes, const(8))
    key = b.select(wide, b.load(b.gep(keys, [i], source_etype=i64), typ=i64),
                   b.zext(b.load(b.gep(keys, [i], source_etype=i32), typ=i32), i64))
    weight = b.zext(b.load(b.gep(weights, [b.and_(i, weight_mask)], source_etype=i32),
                           typ=i32), i64)
    # Fibonacci hashing: the top bits of key * 2^64/phi pick the first slot.
    start = b.lshr(b.mul(key, const(0x9E3779B97F4A7C15)), const(64 - SLOTS.bit_length() + 1))
    body_end = b.block
    b.branch(probe)

    b.position_at_end(probe)
    slot = b.phi(i64, "slot")
    slot.add_incoming(start, body_end)
    packets = b.load(word(slot, 1), typ=i64)
    is_empty = b.icmp_unsigned("==", packets, const(0))
    same = b.icmp_unsigned("==", b.load(word(slot, 0), typ=i64), key)
    next_slot = fn.append_basic_block("next")
    b.cbranch(is_empty, empty, next_slot)
    b.position_at_end(next_slot)
    slot.add_incoming(b.and_(b.add(slot, const(1)), const(SLOTS - 1)), next_slot)
    b.cbranch(same, found, probe)

    b.position_at_end(empty)  # a new value
    b.cbranch(b.icmp_unsigned("<", distinct, const(MAX_DISTINCT)), found, full)
    b.position_at_end(full)
    b.ret(const(-1))

    b.position_at_end(found)
    new = b.select(is_empty, const(1), const(0))
    b.store(key, word(slot, 0))
    b.store(b.add(packets, const(1)), word(slot, 1))
    b.store(b.add(b.load(word(slot, 2), typ=i64), weight), word(slot, 2))
    i.add_incoming(b.add(i, const(1)), found)
    distinct.add_incoming(b.add(distinct, new), found)
    b.branch(head)

    b.position_at_end(done)
    b.ret(distinct)
    return str(module)
