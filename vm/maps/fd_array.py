"""Arrays whose values are objects named by fd: PROG_ARRAY and PERF_EVENT_ARRAY
(kernel/bpf/arraymap.c, fd_array_map_*).

User space writes an fd; the syscall layer resolves it to the object and calls `put`. The array
holds a reference on each object it stores and drops it through `release` (set by whoever
counts references: the daemon's store) when the slot is overwritten, deleted or cleared.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import BpfError
from ..uapi import BPF_ANY, MapType
from .arraymap import _INDEX, ArrayBase


def _no_release(obj: Any) -> None:
    pass


class FdArrayMap(ArrayBase):
    release: Callable[[Any], None] = staticmethod(_no_release)

    def __init__(self, key_size: int, value_size: int, max_entries: int, flags: int = 0,
                 name: str = ""):
        super().__init__(key_size, value_size, max_entries, flags, name)
        self.slots: list[Any] = [None] * max_entries
        self.live = 0  # slots holding an object: entry counts in O(1) (obj_info, pin text)

    @classmethod
    def check_attrs(cls, key_size: int, value_size: int, max_entries: int) -> None:
        if value_size != 4:
            raise BpfError(errno.EINVAL, f"{cls.map_type.name.lower()} map needs value_size 4"
                           f" (an fd), got {value_size}")
        super().check_attrs(key_size, value_size, max_entries)

    def check_object(self, obj: Any) -> None:
        """Raise unless obj may be stored here (EINVAL, as for an fd of the wrong kind)."""

    def lookup(self, key: bytes) -> memoryview | None:
        return None  # user space cannot read object pointers (ENOENT at the syscall)

    def get(self, index: int) -> Any:
        """The object at index, or None (used by tail calls and perf helpers)."""
        return self.slots[index] if 0 <= index < self.max_entries else None

    def slot(self, key: bytes, flags: int = BPF_ANY) -> int:
        """The index an update of key with flags writes; the kernel checks these before it
        looks at the fd (so their errnos win over a wrong fd's)."""
        if flags != BPF_ANY:
            raise BpfError(errno.EINVAL, f"{self.describe()} accepts only BPF_ANY updates")
        index = self.index(key)
        if index >= self.max_entries:
            raise self.out_of_range(index)
        return index

    def put(self, key: bytes, obj: Any, flags: int = BPF_ANY) -> None:
        index = self.slot(key, flags)
        self.check_object(obj)
        old, self.slots[index] = self.slots[index], obj
        if old is not None:
            self.release(old)
        else:
            self.live += 1

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        raise BpfError(errno.EINVAL, f"{self.describe()} stores objects: update it with an fd")

    def delete(self, key: bytes) -> None:
        index = self.index(key)
        if index >= self.max_entries:
            raise self.out_of_range(index)
        old, self.slots[index] = self.slots[index], None
        if old is None:
            raise BpfError(errno.ENOENT, f"index {index} of {self.describe()} is empty")
        self.live -= 1
        self.release(old)

    def clear(self) -> None:
        """Drop every entry: done when the last user reference (fd or pin) goes, which breaks
        the cycles a program -> prog_array -> program chain can form (4.4's usercnt rule)."""
        for index, old in enumerate(self.slots):
            if old is not None:
                self.slots[index] = None
                self.live -= 1
                self.release(old)

    def items(self) -> Iterator[tuple[bytes, Any]]:
        for index, obj in enumerate(self.slots):
            if obj is not None:
                yield _INDEX.pack(index), obj


class ProgArrayMap(FdArrayMap):
    """Tail-call targets. All programs in one array share a type: the first program stored
    (or the first program loaded that uses the array) fixes it."""

    map_type = MapType.PROG_ARRAY
    owner_prog_type: int | None = None

    def compatible(self, prog_type: int) -> bool:
        """bpf_prog_array_compatible: claim the array for prog_type, or check the claim."""
        if self.owner_prog_type is None:
            self.owner_prog_type = prog_type
        return self.owner_prog_type == prog_type

    def check_object(self, obj: Any) -> None:
        if not self.compatible(obj.prog_type):
            raise BpfError(errno.EINVAL, f"{self.describe()} holds programs of type"
                           f" {self.owner_prog_type}; cannot store one of type {obj.prog_type}")


class PerfEventArrayMap(FdArrayMap):
    """Perf event objects indexed by CPU, the targets of perf_event_output/perf_event_read."""

    map_type = MapType.PERF_EVENT_ARRAY
