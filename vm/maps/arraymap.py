"""BPF_MAP_TYPE_ARRAY (kernel/bpf/arraymap.c): preallocated, zero-filled, u32 index keys.

All values live in the map's shared memory (shm.py), elements 8-byte aligned at offset 0 as in
the kernel's BPF_F_MMAPABLE arrays (layout.py), so a program's pointer into one value is a view
of that memory and other processes read values in place. Only arrays created BPF_F_MMAPABLE may
be written by others through their mapping, as on the kernel.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator

from ..errors import BpfError
from ..uapi import BPF_F_MMAPABLE, BPF_NOEXIST, PAGE_SIZE, MapType
from .base import BpfMap, pages, round_up
from .layout import array_elem_size, array_size
from .shm import SharedMemory

SIZEOF_BPF_ARRAY = 64  # struct bpf_array header in 4.4 (bpf_map + elem_size), cache aligned
U32_MAX = 0xFFFFFFFF
INT_MAX = 0x7FFFFFFF
_INDEX = struct.Struct("<I")


class ArrayBase(BpfMap):
    """Index handling shared by value arrays and fd arrays."""

    def index(self, key: bytes) -> int:
        return _INDEX.unpack(key)[0]

    @classmethod
    def check_attrs(cls, key_size: int, value_size: int, max_entries: int) -> None:
        kind = cls.map_type.name.lower()
        if max_entries == 0 or key_size != 4 or value_size == 0:
            raise BpfError(errno.EINVAL, f"{kind} map needs key_size 4 and value_size,"
                           f" max_entries > 0 (got key {key_size}, value {value_size},"
                           f" entries {max_entries})")
        if value_size > INT_MAX:  # the running kernel's bound (4.4: KMALLOC_MAX_SIZE)
            raise BpfError(errno.E2BIG, f"{kind} map value_size {value_size} is too large")
        if max_entries > (U32_MAX - PAGE_SIZE - SIZEOF_BPF_ARRAY) // round_up(value_size, 8):
            raise BpfError(errno.ENOMEM, f"{kind} map of {max_entries} entries of"
                           f" {value_size} bytes is too large")

    @classmethod
    def pages_for(cls, key_size: int, value_size: int, max_entries: int) -> int:
        return pages(SIZEOF_BPF_ARRAY + max_entries * round_up(value_size, 8))

    def __len__(self) -> int:
        return self.max_entries

    def get_next_key(self, key: bytes | None) -> bytes:
        index = U32_MAX if key is None else self.index(key)
        if index >= self.max_entries:
            return _INDEX.pack(0)
        if index == self.max_entries - 1:
            raise BpfError(errno.ENOENT, f"index {index} is the last of {self.describe()}")
        return _INDEX.pack(index + 1)

    def out_of_range(self, index: int) -> BpfError:
        return BpfError(errno.E2BIG, f"index {index} out of range for {self.describe()}"
                        f" (max_entries={self.max_entries})")


class ArrayMap(ArrayBase):
    map_type = MapType.ARRAY

    def __init__(self, key_size: int, value_size: int, max_entries: int, flags: int = 0,
                 name: str = ""):
        super().__init__(key_size, value_size, max_entries, flags, name)
        self.elem_size = array_elem_size(value_size)
        self.shm = SharedMemory(name or "array", array_size(value_size, max_entries),
                                user_writable=bool(flags & BPF_F_MMAPABLE))
        self._view = self.shm.buf

    def free(self) -> bool:
        return self.shm.release()

    def lookup(self, key: bytes) -> memoryview | None:
        index = _INDEX.unpack(key)[0]
        if index >= self.max_entries:
            return None
        off = index * self.elem_size
        return self._view[off:off + self.value_size]

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        if flags:
            self.check_update_flags(flags)
        index = _INDEX.unpack(key)[0]
        if index >= self.max_entries:
            raise self.out_of_range(index)
        if flags == BPF_NOEXIST:
            raise BpfError(errno.EEXIST, f"array elements always exist (BPF_NOEXIST on index"
                           f" {index} of {self.describe()})")
        off = index * self.elem_size
        self._view[off:off + self.value_size] = value

    def delete(self, key: bytes) -> None:
        raise BpfError(errno.EINVAL, f"array elements cannot be deleted ({self.describe()})")

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for index in range(self.max_entries):
            off = index * self.elem_size
            yield _INDEX.pack(index), bytes(self._view[off:off + self.value_size])
