"""The map types of Linux 4.4, and `create_map`, which checks attributes as BPF_MAP_CREATE."""

from __future__ import annotations

import errno

from ..errors import BpfError
from ..uapi import BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_OBJ_NAME_LEN, MapType
from .arraymap import ArrayMap
from .base import BpfMap
from .fd_array import FdArrayMap, PerfEventArrayMap, ProgArrayMap
from .hashtab import HashMap

MAP_CLASSES: dict[int, type[BpfMap]] = {
    MapType.HASH: HashMap,
    MapType.ARRAY: ArrayMap,
    MapType.PROG_ARRAY: ProgArrayMap,
    MapType.PERF_EVENT_ARRAY: PerfEventArrayMap,
}

# map_flags accepted at create. 4.4 took none; BPF_F_NO_PREALLOC (4.6) is accepted on hash maps
# because clang-built objects commonly set it; it changes nothing here (the table's memory is
# a sparse memfd: pages are taken as elements are first used). BPF_F_MMAPABLE (5.5) on arrays
# lets user space write the values through its mapping.
_ALLOWED_FLAGS = {MapType.HASH: BPF_F_NO_PREALLOC, MapType.ARRAY: BPF_F_MMAPABLE}


def create_map(map_type: int, key_size: int, value_size: int, max_entries: int,
               flags: int = 0, name: str = "") -> BpfMap:
    cls = map_class(map_type, key_size, value_size, max_entries, flags, name)
    return cls(key_size, value_size, max_entries, flags, name)


def map_class(map_type: int, key_size: int, value_size: int, max_entries: int,
              flags: int = 0, name: str = "") -> type[BpfMap]:
    """BPF_MAP_CREATE's checks without allocating: the class to construct. The daemon charges
    `cls.pages_for(...)` before constructing, so a refused map never takes memory."""
    cls = MAP_CLASSES.get(map_type)
    if cls is None:
        raise BpfError(errno.EINVAL, f"unknown map type {map_type}"
                       f" (supported: {', '.join(f'{t.name}={int(t)}' for t in MAP_CLASSES)})")
    if flags & ~_ALLOWED_FLAGS.get(map_type, 0):
        raise BpfError(errno.EINVAL, f"unsupported map_flags {flags:#x} for {cls.__name__}")
    check_name(name)
    cls.check_attrs(key_size, value_size, max_entries)
    return cls


def check_name(name: str) -> None:
    """Object names: at most 15 characters of [A-Za-z0-9_.] (bpf_obj_name_cpy)."""
    if len(name) >= BPF_OBJ_NAME_LEN or not all(c.isascii() and (c.isalnum() or c in "_.")
                                                 for c in name):
        raise BpfError(errno.EINVAL, f"invalid object name {name!r} (at most"
                       f" {BPF_OBJ_NAME_LEN - 1} characters of letters, digits, '_' and '.')")


__all__ = [
    "MAP_CLASSES",
    "ArrayMap",
    "BpfMap",
    "FdArrayMap",
    "HashMap",
    "PerfEventArrayMap",
    "ProgArrayMap",
    "check_name",
    "create_map",
    "map_class",
]
