"""What every map type shares: its attributes, the 4.4 create-time checks and the memlock cost.

Keys and values cross this interface as bytes of exactly key_size / value_size; the syscall
layer (the daemon) checks lengths before calling in, as the kernel copies fixed sizes from user
memory. `lookup` returns a writable view of the stored value: programs write through it, as
they write through the pointer bpf_map_lookup_elem returns.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

from ..errors import BpfError
from ..uapi import BPF_EXIST, MAP_TYPE_NAMES, PAGE_SIZE, MapType


def round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def pages(nbytes: int) -> int:
    """Pages charged against RLIMIT_MEMLOCK for an allocation of nbytes (as the kernel)."""
    return round_up(nbytes, PAGE_SIZE) // PAGE_SIZE


class BpfMap:
    map_type: MapType

    def __init__(self, key_size: int, value_size: int, max_entries: int, flags: int = 0,
                 name: str = ""):
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self.flags = flags
        self.name = name

    @property
    def type_name(self) -> str:
        return MAP_TYPE_NAMES[self.map_type]

    def describe(self) -> str:
        """How errors name this map: "hash map 'flows'"."""
        return f"{self.type_name} map '{self.name}'" if self.name else f"{self.type_name} map"

    @property
    def memlock_pages(self) -> int:
        return self.pages_for(self.key_size, self.value_size, self.max_entries)

    @classmethod
    def pages_for(cls, key_size: int, value_size: int, max_entries: int) -> int:
        """The memlock charge of a map of these attributes, known before allocating it."""
        raise NotImplementedError

    def free(self) -> bool:
        """The map is freed: give back what it holds outside Python (its shared memory).
        True when that memory may still be held by another process (see shm.release)."""
        return False

    def check_update_flags(self, flags: int) -> None:
        if not 0 <= flags <= BPF_EXIST:
            raise BpfError(errno.EINVAL, f"unknown update flags {flags:#x} for {self.describe()}"
                           " (BPF_ANY=0, BPF_NOEXIST=1, BPF_EXIST=2)")

    # -- element operations (overridden per type) ------------------------------------------
    def lookup(self, key: bytes) -> memoryview | None:
        raise NotImplementedError

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        raise NotImplementedError

    def delete(self, key: bytes) -> None:
        raise NotImplementedError

    def get_next_key(self, key: bytes | None) -> bytes:
        raise NotImplementedError

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every element as (key, value copy), in get_next_key order."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def lookup_copy(self, key: bytes) -> bytes:
        """The syscall's lookup: a copy of the value, or ENOENT."""
        view = self.lookup(key)
        if view is None:
            raise BpfError(errno.ENOENT, f"key {key.hex()} not found in {self.describe()}")
        return bytes(view)

    def walk(self, after: bytes | None, count: int) -> list[bytes]:
        """Up to `count` keys following `after` (None: from the first), for batch operations.
        A cursor key that is no longer in the map restarts the walk, as get_next_key does."""
        keys: list[bytes] = []
        key = after
        try:
            for _ in range(count):
                key = self.get_next_key(key)
                keys.append(key)
        except BpfError as e:
            if e.errno != errno.ENOENT:
                raise
        return keys
