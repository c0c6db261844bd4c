"""BPF_MAP_TYPE_HASH (kernel/bpf/hashtab.c).

Elements live in a dict; a separate insertion-order list with tombstones gives get_next_key an
O(1) successor, so walking or draining a map of n keys costs O(n). The order differs from the
kernel's bucket order, which no caller may rely on; the rules at the ends (a missing key gives
the first key, the last key gives ENOENT) are the kernel's.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

from ..errors import BpfError
from ..uapi import BPF_EXIST, BPF_NOEXIST, KMALLOC_MAX_SIZE, MapType
from .base import BpfMap, pages, round_up

# sizeof(struct htab_elem) and of a bucket head in 4.4 on 64-bit: the memlock cost formula.
HTAB_ELEM_SIZE = 40
HLIST_HEAD_SIZE = 8
HTAB_ELEM_SIZE_NOW = 48  # sizeof(struct htab_elem) today: bounds key_size + value_size
U32_MAX = 0xFFFFFFFF

# With fewer tombstones than this the order list is never compacted.
_COMPACT_MIN = 64


class HashMap(BpfMap):
    map_type = MapType.HASH

    def __init__(self, key_size: int, value_size: int, max_entries: int, flags: int = 0,
                 name: str = ""):
        super().__init__(key_size, value_size, max_entries, flags, name)
        self._elems: dict[bytes, bytearray] = {}
        self._slot: dict[bytes, int] = {}  # key -> index in _order
        self._order: list[bytes | None] = []
        self._first = 0  # no live key sits before this index of _order
        self._tombstones = 0

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
        return len(self._elems)

    def lookup(self, key: bytes) -> memoryview | None:
        value = self._elems.get(key)
        return None if value is None else memoryview(value)

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        if flags:
            self.check_update_flags(flags)
        elems = self._elems
        if key in elems:
            if flags == BPF_NOEXIST:
                raise BpfError(errno.EEXIST, f"key {key.hex()} already exists in {self.describe()}"
                               " (BPF_NOEXIST)")
            # Replace rather than write in place: a program still holding the old value's
            # pointer keeps a valid, detached element, as after the kernel's RCU replace.
            elems[key] = bytearray(value)
            return
        if flags == BPF_EXIST:
            raise BpfError(errno.ENOENT, f"key {key.hex()} not found in {self.describe()}"
                           " (BPF_EXIST)")
        if len(elems) >= self.max_entries:
            raise BpfError(errno.E2BIG, f"{self.describe()} is full"
                           f" (max_entries={self.max_entries})")
        elems[key] = bytearray(value)
        self._slot[key] = len(self._order)
        self._order.append(key)

    def delete(self, key: bytes) -> None:
        if self._elems.pop(key, None) is None:
            raise BpfError(errno.ENOENT, f"key {key.hex()} not found in {self.describe()}")
        self._order[self._slot.pop(key)] = None
        self._tombstones += 1
        if self._tombstones > _COMPACT_MIN and self._tombstones > len(self._elems):
            self._compact()

    def _compact(self) -> None:
        self._order = [k for k in self._order if k is not None]
        self._slot = {k: i for i, k in enumerate(self._order)}
        self._first = 0
        self._tombstones = 0

    def get_next_key(self, key: bytes | None) -> bytes:
        order = self._order
        i = self._slot.get(key) if key is not None else None
        if i is None:  # no key, or a key not in the map: the first key
            i = self._first
            while i < len(order) and order[i] is None:
                i += 1
            self._first = i
        else:
            i += 1
            while i < len(order) and order[i] is None:
                i += 1
        if i >= len(order):
            raise BpfError(errno.ENOENT, f"no key after {'the start' if key is None else key.hex()}"
                           f" in {self.describe()}")
        return order[i]  # type: ignore[return-value]

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for key in [k for k in self._order if k is not None]:
            value = self._elems.get(key)
            if value is not None:
                yield key, bytes(value)

    def clear(self) -> None:
        self._elems.clear()
        self._slot.clear()
        self._order.clear()
        self._first = self._tombstones = 0
