"""Map helpers in native code: bpf_map_lookup_elem on arrays and hash maps, and
bpf_map_update_elem on arrays and on the present keys of hash maps, read and written in the
maps' shared memory (vm.maps.layout) without calling into Python.

What stays a Python callback, because the daemon's index of a hash map (HashMap._index, its
free list, its count) must stay the truth: inserting a key, deleting one
(bpf_map_delete_elem) and every other helper; and any map that is not an ArrayMap or a HashMap
(prog arrays, perf event arrays), or a lookup when the region table is full.

A value found is mapped as the Python helper maps it: a region of its own, the next dynamic
id, exactly value_size bytes, writable; native code writes the region table entry, and the
glue maps the same view in Memory before Python next looks (vm.native.glue). So addresses,
bounds and faults are those of the other tiers. Native code runs with the GIL held, so the
daemon (the only writer of map memory) cannot change a table while it is walked.
"""

from __future__ import annotations

import errno
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llvmlite import ir

from ..helpers.spec import neg
from ..maps import ArrayMap, BpfMap, HashMap
from ..maps.layout import BUCKET, ELEM_HEADER, HEADER_SIZE, IN_USE, HashLayout
from ..memory import REGION_SHIFT
from ..uapi import BPF_EXIST, BPF_NOEXIST, Helper
from .abi import ENTRY_SHIFT, Entry, Field
from .regions import buffer_address

if TYPE_CHECKING:
    from .ir import _FunctionWriter

I1, I8, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(32), ir.IntType(64)
PTR = ir.PointerType()
NATIVE_HELPERS = frozenset({Helper.map_lookup_elem, Helper.map_update_elem})
# Fields of an element header and of a bucket, all u32 (layout.py: seq, next, hash, flags;
# seq, head), as byte offsets.
_WORD = BUCKET.size // 2
_SEQ, _NEXT, _HASH, _FLAGS = (k * _WORD for k in range(ELEM_HEADER.size // _WORD))
_HEAD = _WORD
_UNROLLED_KEY = 64  # keys up to this size are compared with unrolled loads, larger in a loop


def _crc_table() -> list[int]:
    """zlib's CRC-32 table (reflected polynomial 0xEDB88320), taken from zlib itself: the
    CRC of the byte i from an all-zero register is table[i] with the pre- and post-inversion
    undone."""
    return [zlib.crc32(bytes([i]), 0xFFFFFFFF) ^ 0xFFFFFFFF for i in range(256)]


CRC_TABLE = _crc_table()


@dataclass(frozen=True)
class MapInfo:
    """What native code needs of one map: where its memory is and its fixed layout."""

    kind: str  # "array" or "hash"
    address: int  # of the map's first byte of shared memory
    key_size: int
    value_size: int
    max_entries: int
    elem_size: int  # array: the value stride; hash: the element size
    n_buckets: int = 0
    elems_offset: int = 0
    key_offset: int = 0
    value_offset: int = 0


def describe(m: BpfMap) -> tuple[MapInfo | None, memoryview | None]:
    """The native description of a map (None: its helpers stay in Python), and a view of its
    memory that keeps the mapping (and so the address) valid while the code may run."""
    try:
        if type(m) is ArrayMap:
            view = m.shm.buf[:]
            return MapInfo("array", buffer_address(view), m.key_size, m.value_size,
                           m.max_entries, m.elem_size), view
        if type(m) is HashMap:
            view = m.shm.buf[:]
            layout: HashLayout = m.layout
            return MapInfo("hash", buffer_address(view), m.key_size, m.value_size,
                           m.max_entries, layout.elem_size, layout.n_buckets,
                           layout.elems_offset, layout.key_offset, layout.value_offset), view
    except ValueError:  # its memory is released already: the Python helper says so
        pass
    return None, None


def _const(value: int, ty: ir.IntType = I64) -> ir.Constant:
    return ir.Constant(ty, value)


class MapHelpers:
    """Emits the native map helpers into one bpf function (the writer's builder)."""

    def __init__(self, w: _FunctionWriter):
        self.w = w
        self.b = w.b
        module = w.fn.module
        table = module.globals.get("bpffs_crc32_table")
        if table is None:
            ty = ir.ArrayType(I32, 256)
            table = ir.GlobalVariable(module, ty, "bpffs_crc32_table")
            table.initializer = ir.Constant(ty, [_const(v, I32) for v in CRC_TABLE])
            table.global_constant = True
            table.linkage = "internal"
        self.crc_table = table
        self.memmove = module.globals.get("llvm.memmove.p0.p0.i64") or ir.Function(
            module, ir.FunctionType(ir.VoidType(), [PTR, PTR, I64, I1]),
            "llvm.memmove.p0.p0.i64")

    def emit(self, helper: int, info: MapInfo, index: int, slow: ir.Block
             ) -> list[tuple[ir.Value, ir.Block]]:
        """The helper on map `index` (r1 is its handle); returns the (r0, block) pairs it
        ends with, each block still open; it may branch to `slow`, the Python helper."""
        if helper == Helper.map_lookup_elem:
            return self._lookup(info, index, slow)
        return self._update(info, slow)

    # -- finding the value ------------------------------------------------------------------
    def _block(self, name: str) -> ir.Block:
        return self.w.fn.append_basic_block(name)

    def _find(self, info: MapInfo, key: ir.Value) -> tuple[ir.Value, ir.Block, ir.Block]:
        """Branch to (found, missing): in `found`, the address (i64) of the element (hash)
        or value (array) of the key at `key`."""
        b = self.b
        found, missing = self._block("map.found"), self._block("map.missing")
        if info.kind == "array":
            index = b.zext(b.load(key, typ=I32, align=1), I64)
            inside = b.icmp_unsigned("<", index, _const(info.max_entries))
            b.cbranch(inside, found, missing)
            b.position_at_end(found)
            at = b.add(_const(info.address), b.mul(index, _const(info.elem_size)))
            return at, found, missing
        hash_ = self._crc32(key, info.key_size)
        bucket = b.add(_const(info.address + HEADER_SIZE + _HEAD),
                       b.mul(b.zext(b.and_(hash_, _const(info.n_buckets - 1, I32)), I64),
                             _const(BUCKET.size)))
        head = b.load(b.inttoptr(bucket, PTR), typ=I32, align=_WORD)
        start = b.block
        walk, step, compare = self._block("chain"), self._block("chain.elem"), \
            self._block("chain.key")
        b.branch(walk)
        b.position_at_end(walk)
        link = b.phi(I32)
        steps = b.phi(I64)
        link.add_incoming(head, start)
        steps.add_incoming(_const(0), start)
        # A chain of at most max_entries elements, each a slot in range: a table corrupted
        # by anyone else ends the walk, it cannot send it astray.
        slot = b.zext(b.sub(link, _const(1, I32)), I64)  # link 0 wraps above max_entries
        go_on = b.and_(b.icmp_unsigned("<", slot, _const(info.max_entries)),
                       b.icmp_unsigned("<", steps, _const(info.max_entries)))
        b.cbranch(go_on, step, missing)
        b.position_at_end(step)
        elem = b.add(_const(info.address + info.elems_offset), b.mul(slot,
                                                                   _const(info.elem_size)))
        field = lambda off: b.load(b.inttoptr(b.add(elem, _const(off)), PTR),  # noqa: E731
                                   typ=I32, align=_WORD)
        used = b.icmp_unsigned("!=", b.and_(field(_FLAGS), _const(IN_USE, I32)),
                               _const(0, I32))
        same_hash = b.and_(used, b.icmp_unsigned("==", field(_HASH), hash_))
        following = field(_NEXT)
        b.cbranch(same_hash, compare, next_block := self._block("chain.next"))
        b.position_at_end(compare)
        stored = b.inttoptr(b.add(elem, _const(info.key_offset)), PTR)
        b.cbranch(self._equal(stored, key, info.key_size), found, next_block)
        b.position_at_end(next_block)
        link.add_incoming(following, next_block)
        steps.add_incoming(b.add(steps, _const(1)), next_block)
        b.branch(walk)
        b.position_at_end(found)
        return elem, found, missing

    def _crc32(self, key: ir.Value, size: int) -> ir.Value:
        """zlib.crc32 of the `size` bytes at `key` (one table lookup a byte; LLVM unrolls
        the loop for small keys)."""
        b = self.b
        start = b.block
        loop, done = self._block("crc"), self._block("crc.done")
        b.branch(loop)
        b.position_at_end(loop)
        i = b.phi(I64)
        crc = b.phi(I32)
        i.add_incoming(_const(0), start)
        crc.add_incoming(_const(0xFFFFFFFF, I32), start)
        byte = b.zext(b.load(b.gep(key, [i], source_etype=I8), typ=I8), I32)
        entry = b.zext(b.and_(b.xor(crc, byte), _const(0xFF, I32)), I64)
        looked = b.load(b.gep(self.crc_table, [_const(0), entry],
                              source_etype=self.crc_table.value_type), typ=I32)
        new = b.xor(looked, b.lshr(crc, _const(8, I32)))
        after = b.add(i, _const(1))
        i.add_incoming(after, loop)
        crc.add_incoming(new, loop)
        b.cbranch(b.icmp_unsigned("<", after, _const(size)), loop, done)
        b.position_at_end(done)
        return b.xor(new, _const(0xFFFFFFFF, I32))

    def _equal(self, a: ir.Value, c: ir.Value, size: int) -> ir.Value:
        """Whether the `size` bytes at a and c are equal (i1)."""
        b = self.b
        if size <= _UNROLLED_KEY:
            differ: ir.Value = _const(0)
            at = 0
            for chunk in (8, 4, 2, 1):
                while size - at >= chunk:
                    ty = ir.IntType(chunk * 8)
                    x = b.load(b.gep(a, [_const(at)], source_etype=I8), typ=ty, align=1)
                    y = b.load(b.gep(c, [_const(at)], source_etype=I8), typ=ty, align=1)
                    differ = b.or_(differ, b.zext(b.xor(x, y), I64) if chunk < 8 else
                                   b.xor(x, y))
                    at += chunk
            return b.icmp_unsigned("==", differ, _const(0))
        start = b.block
        loop, step, done = self._block("keq"), self._block("keq.step"), self._block("keq.done")
        b.branch(loop)
        b.position_at_end(loop)
        i = b.phi(I64)
        i.add_incoming(_const(0), start)
        more = b.icmp_unsigned("<", i, _const(size))
        b.cbranch(more, step, done)
        b.position_at_end(step)
        same = b.icmp_unsigned("==", b.load(b.gep(a, [i], source_etype=I8), typ=I8),
                               b.load(b.gep(c, [i], source_etype=I8), typ=I8))
        i.add_incoming(b.add(i, _const(1)), step)
        b.cbranch(same, loop, done)
        b.position_at_end(done)
        result = b.phi(I1)
        result.add_incoming(_const(1, I1), loop)
        result.add_incoming(_const(0, I1), step)
        return result

    # -- the helpers -----------------------------------------------------------------------
    def _lookup(self, info: MapInfo, index: int, slow: ir.Block
                ) -> list[tuple[ir.Value, ir.Block]]:
        w, b = self.w, self.b
        key = w.access(w.reg(2), info.key_size, False)
        at, _, missing = self._find(info, key)
        if info.kind == "hash":
            at = b.add(at, _const(info.value_offset))
        r0 = self._map_value(at, info.value_size, index, slow)
        ends = [(r0, b.block)]
        b.position_at_end(missing)
        ends.append((_const(0), missing))
        return ends

    def _map_value(self, at: ir.Value, size: int, index: int, slow: ir.Block) -> ir.Value:
        """A region of its own for the value at `at`, as Memory.add: the next dynamic id,
        `size` bytes, writable; the Python helper does it when the table is full."""
        w, b = self.w, self.b
        region = w._load_field(Field.NEXT_ID)
        room = b.icmp_unsigned("<", region, b.load(w.table_len, typ=I64))
        b.cbranch(room, mapped := self._block("value.map"), slow)
        b.position_at_end(mapped)
        table = b.load(w.table, typ=PTR)
        entry = b.shl(region, _const(ENTRY_SHIFT))
        for word, value in ((Entry.BASE, at), (Entry.READ_LIMIT, _const(size)),
                            (Entry.WRITE_LIMIT, _const(size)), (Entry.MAP, _const(index + 1))):
            b.store(value, b.gep(table, [b.add(entry, _const(word))], source_etype=I64))
        w._store_field(Field.NEXT_ID, b.add(region, _const(1)))
        return b.shl(region, _const(REGION_SHIFT))

    def _update(self, info: MapInfo, slow: ir.Block) -> list[tuple[ir.Value, ir.Block]]:
        """ArrayMap.update and HashMap.update of a present key, after the helper's reads of
        the key and the value (which fault first, as there)."""
        w, b = self.w, self.b
        key = w.access(w.reg(2), info.key_size, False)
        value = w.access(w.reg(3), info.value_size, False)
        flags = w.reg(4)
        ends: list[tuple[ir.Value, ir.Block]] = []

        def end(result: int, ok: ir.Value, name: str) -> None:
            """Return `result` unless `ok`; go on in a new block."""
            failed = self._block(f"{name}.fail")
            b.cbranch(ok, go_on := self._block(name), failed)
            ends.append((_const(result), failed))
            b.position_at_end(go_on)

        end(neg(errno.EINVAL), b.icmp_unsigned("<=", flags, _const(BPF_EXIST)), "flags")
        noexist = b.icmp_unsigned("==", flags, _const(BPF_NOEXIST))
        at, found, missing = self._find(info, key)
        if info.kind == "array":
            b.position_at_end(missing)
            ends.append((_const(neg(errno.E2BIG)), missing))
            b.position_at_end(found)
            end(neg(errno.EEXIST), b.not_(noexist), "noexist")
            self._copy(at, value, info.value_size)
        else:
            b.position_at_end(missing)  # a new key: only BPF_EXIST's refusal is native
            exist = b.icmp_unsigned("==", flags, _const(BPF_EXIST))
            b.cbranch(exist, absent := self._block("exist.fail"), slow)
            ends.append((_const(neg(errno.ENOENT)), absent))
            b.position_at_end(found)
            end(neg(errno.EEXIST), b.not_(noexist), "noexist")
            seq_at = b.inttoptr(b.add(at, _const(_SEQ)), PTR)
            seq = b.load(seq_at, typ=I32, align=_WORD)
            # The element's seqlock, as HashMap.update: odd while the value changes.
            self._store_seq(b.add(seq, _const(1, I32)), seq_at)
            b.fence("release")
            self._copy(b.add(at, _const(info.value_offset)), value, info.value_size)
            b.fence("release")
            self._store_seq(b.add(seq, _const(2, I32)), seq_at)
        ends.append((_const(0), b.block))
        return ends

    def _store_seq(self, value: ir.Value, at: ir.Value) -> None:
        """An atomic store of a seq (IRBuilder.store_atomic wants typed pointers)."""
        self.b._insert(ir.StoreAtomicInstr(self.b.block, value, at, "monotonic", _WORD))

    def _copy(self, at: ir.Value, source: ir.Value, size: int) -> None:
        b = self.b
        b.call(self.memmove, [b.inttoptr(at, PTR), source, _const(size), _const(0, I1)])
