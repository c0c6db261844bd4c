"""BPF_MAP_TYPE_HASH (kernel/bpf/hashtab.c), preallocated in shared memory.

The elements live in the map's memory (shm.py) in the layout that layout.py documents, so other
processes read them in place (reader.py); this class is the only writer. Its own index (key to
slot, a dict) answers the daemon's and the VM's lookups without reading the table, so lookups
cost what they did when elements lived in a dict. An update of a present key writes the value
in place under the element's seqlock (readers never see it torn; a program's pointer to the
value sees the new value, where the kernel's prealloc table would hand it a recycled element).
get_next_key walks slots in order: the order differs from the kernel's bucket order, which no
caller may rely on; the rules at the ends (a missing key gives the first key, the last key
gives ENOENT) are the kernel's.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

from ..errors import BpfError
from ..uapi import BPF_EXIST, BPF_NOEXIST, KMALLOC_MAX_SIZE, MapType
from .base import BpfMap, pages, round_up
from .layout import (
    BUCKET,
    COUNT_OFFSET,
    ELEM_HEADER,
    HEADER,
    IN_USE,
    SEQ,
    USED_OFFSET,
    HashLayout,
    bucket_hash,
)
from .shm import SharedMemory

# sizeof(struct htab_elem) and of a bucket head in 4.4 on 64-bit: the memlock cost formula.
HTAB_ELEM_SIZE = 40
HLIST_HEAD_SIZE = 8
HTAB_ELEM_SIZE_NOW = 48  # sizeof(struct htab_elem) today: bounds key_size + value_size
U32_MAX = 0xFFFFFFFF
_pack_seq = SEQ.pack_into
_unpack_seq = SEQ.unpack_from


class HashMap(BpfMap):
    map_type = MapType.HASH

    def __init__(self, key_size: int, value_size: int, max_entries: int, flags: int = 0,
                 name: str = ""):
        super().__init__(key_size, value_size, max_entries, flags, name)
        self.layout = layout = HashLayout(key_size, value_size, max_entries)
        self.shm = SharedMemory(name or "hash", layout.size)
        self._buf = self.shm.buf
        self._buf[:HEADER.size] = layout.header(0)  # the rest of a new memfd is zeros
        self._index: dict[bytes, int] = {}  # key -> slot: the daemon's truth
        self._free: list[int] = []  # slots freed by deletes, reused first (LIFO)
        self._fresh = 0  # slots from here on were never used
        self._first = 0  # no element is in use below this slot
        self._value_base = layout.elems_offset + layout.value_offset
        self._elem_size = layout.elem_size

    @classmethod
    def check_attrs(cls, key_size: int, value_size: int, max_entries: int) -> None:
        """htab_map_alloc's checks (the errno of each is the kernel's): sizes as the running
        kernel bounds them, max_entries by 4.4's cost rule."""
        if max_entries == 0 or key_size == 0 or value_size == 0:
            raise BpfError(errno.EINVAL, "hash map needs key_size, value_size and max_entries > 0"
                           f" (got key {key_size}, value {value_size}, entries {max_entries})")
        # The running kernel's size rule (4.4 also capped key_size at the 512-byte stack,
        # which only programs need: the verifier refuses their larger keys anyway).
        if key_size + value_size >= KMALLOC_MAX_SIZE - HTAB_ELEM_SIZE_NOW:
            raise BpfError(errno.E2BIG, f"hash map key_size {key_size} + value_size"
                           f" {value_size} is too large (an element must fit in"
                           f" {KMALLOC_MAX_SIZE} bytes)")
        if max_entries > 1 << 31 or cls._cost(key_size, value_size, max_entries) >= U32_MAX - 4096:
            raise BpfError(errno.E2BIG, f"hash map max_entries {max_entries} is too large")

    @staticmethod
    def _cost(key_size: int, value_size: int, max_entries: int) -> int:
        n_buckets = 1 << (max_entries - 1).bit_length()
        elem_size = HTAB_ELEM_SIZE + round_up(key_size, 8) + value_size
        return n_buckets * HLIST_HEAD_SIZE + elem_size * max_entries

    @classmethod
    def pages_for(cls, key_size: int, value_size: int, max_entries: int) -> int:
        return pages(cls._cost(key_size, value_size, max_entries))

    def __len__(self) -> int:
        return len(self._index)

    def free(self) -> bool:
        return self.shm.release()

    def lookup(self, key: bytes) -> memoryview | None:
        slot = self._index.get(key)
        if slot is None:
            return None
        off = self._value_base + slot * self._elem_size
        return self._buf[off:off + self.value_size]

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        if flags:
            self.check_update_flags(flags)
        slot = self._index.get(key)
        if slot is not None:
            if flags == BPF_NOEXIST:
                raise BpfError(errno.EEXIST, f"key {key.hex()} already exists in {self.describe()}"
                               " (BPF_NOEXIST)")
            elem = self.layout.elems_offset + slot * self._elem_size
            seq = _unpack_seq(self._buf, elem)[0]
            _pack_seq(self._buf, elem, seq + 1)
            off = self._value_base + slot * self._elem_size
            self._buf[off:off + self.value_size] = value
            _pack_seq(self._buf, elem, seq + 2)
            return
        if flags == BPF_EXIST:
            raise BpfError(errno.ENOENT, f"key {key.hex()} not found in {self.describe()}"
                           " (BPF_EXIST)")
        if len(self._index) >= self.max_entries:
            raise BpfError(errno.E2BIG, f"{self.describe()} is full"
                           f" (max_entries={self.max_entries})")
        self._insert(key, value)

    def _insert(self, key: bytes, value: bytes) -> None:
        """Fill a free element, then link it at the head of its bucket's chain."""
        buf, layout = self._buf, self.layout
        if self._free:
            slot = self._free.pop()
        else:
            slot, self._fresh = self._fresh, self._fresh + 1
            _pack_seq(buf, USED_OFFSET, self._fresh)  # before the element is linked
        self._first = min(self._first, slot)
        hash_ = bucket_hash(key)
        elem = layout.elem(slot)
        bucket = layout.bucket(hash_)
        seq = _unpack_seq(buf, elem)[0] | 1  # odd: the element is changing
        head = BUCKET.unpack_from(buf, bucket)[1]
        ELEM_HEADER.pack_into(buf, elem, seq, head, hash_, IN_USE)
        buf[elem + layout.key_offset:elem + layout.key_offset + self.key_size] = key
        off = elem + layout.value_offset
        buf[off:off + self.value_size] = value
        _pack_seq(buf, elem, seq + 1)
        bucket_seq = _unpack_seq(buf, bucket)[0]
        _pack_seq(buf, bucket, bucket_seq + 1)
        _pack_seq(buf, bucket + 4, slot + 1)
        _pack_seq(buf, bucket, bucket_seq + 2)
        self._index[key] = slot
        _pack_seq(buf, COUNT_OFFSET, len(self._index))

    def delete(self, key: bytes) -> None:
        slot = self._index.pop(key, None)
        if slot is None:
            raise BpfError(errno.ENOENT, f"key {key.hex()} not found in {self.describe()}")
        buf, layout = self._buf, self.layout
        elem = layout.elem(slot)
        seq, after, hash_, _ = ELEM_HEADER.unpack_from(buf, elem)
        bucket = layout.bucket(hash_)
        link = bucket + 4  # the u32 that points at this element: the bucket's head or a next
        while (at := _unpack_seq(buf, link)[0]) != slot + 1:
            link = layout.elem(at - 1) + 4
        bucket_seq = _unpack_seq(buf, bucket)[0]
        _pack_seq(buf, bucket, bucket_seq + 1)
        _pack_seq(buf, link, after)
        _pack_seq(buf, bucket, bucket_seq + 2)
        ELEM_HEADER.pack_into(buf, elem, seq + 1, 0, hash_, 0)
        _pack_seq(buf, elem, seq + 2)
        self._free.append(slot)
        _pack_seq(buf, COUNT_OFFSET, len(self._index))

    def _key_at(self, slot: int) -> bytes:
        off = self.layout.elem(slot) + self.layout.key_offset
        return bytes(self._buf[off:off + self.key_size])

    def _used_from(self, slot: int) -> int | None:
        """The first slot at or after `slot` that holds an element."""
        buf, layout = self._buf, self.layout
        flags_at = layout.elems_offset + 12
        for i in range(slot, self._fresh):
            if _unpack_seq(buf, flags_at + i * self._elem_size)[0] & IN_USE:
                return i
        return None

    def get_next_key(self, key: bytes | None) -> bytes:
        slot = self._index.get(key) if key is not None else None
        if slot is None:  # no key, or a key not in the map: the first key
            found = self._used_from(self._first)
            self._first = self._fresh if found is None else found
        else:
            found = self._used_from(slot + 1)
        if found is None:
            raise BpfError(errno.ENOENT, f"no key after {'the start' if key is None else key.hex()}"
                           f" in {self.describe()}")
        return self._key_at(found)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        index = self._index
        for key in [self._key_at(slot) for slot in sorted(index.values())]:
            value = self.lookup(key)
            if value is not None:
                yield key, bytes(value)
