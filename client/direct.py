"""Direct reads: a map's memory mapped into this process, read without asking the daemon.

The daemon hands out a map's memfd (`map_memory`); reading it costs a memory copy instead of
a round trip (a lookup: ~0.3-1 us against ~25 us through the socket). The layouts and the
seqlock reads are bpffs.vm.maps.layout and .reader. Reads fall back to the socket, and
`Direct.why_not` says why, when:
- the map has no memory to map (prog_array, perf_event_array) or the daemon refuses it;
- BPFFS_DIRECT=0 is set in the environment (to compare, or to rule this path out);
- a hash read finds the memory changing MAX_TRIES times in a row (`Contended`: the daemon's
  answer is serialised with its writes), or the CPU is not x86-64 (reader.DIRECT_HASH_READS).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct

from bpffs.vm.maps.reader import DIRECT_HASH_READS, ArrayReader, Contended, HashReader

__all__ = ["Contended", "Direct", "why_not"]
from bpffs.vm.maps.shm import check_sealed
from bpffs.vm.uapi import MapType

ENABLED = os.environ.get("BPFFS_DIRECT", "1") != "0"
MAP_FAILED = ctypes.c_void_p(-1).value
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_INDEX = struct.Struct("<I")


class Direct:
    """One map's memory, mapped read-only (or read-write: a BPF_F_MMAPABLE array)."""

    def __init__(self, fd: int, info: dict, result: dict):
        map_type, key_size = info["type"], info["key_size"]
        value_size, max_entries = info["value_size"], info["max_entries"]
        size, self.writable = result["size"], bool(result["writable"])
        check_sealed(fd, size)
        self.memory = map_memory(fd, size, self.writable)
        self.map_type = map_type
        self.is_array = map_type == MapType.ARRAY
        self.key_size = key_size
        self.reader: ArrayReader | HashReader
        if map_type == MapType.ARRAY:
            self.reader = ArrayReader(self.memory, value_size, max_entries)
        else:
            self.reader = HashReader(self.memory, key_size, value_size, max_entries)

    def lookup(self, key: bytes) -> bytes | None:
        """The value, or None when absent; raises Contended (ask the daemon) or returns
        NotImplemented for a key of the wrong size (the daemon words that error)."""
        if len(key) != self.key_size:
            return NotImplemented  # type: ignore[return-value]
        return self.lookup_checked(key)

    def lookup_checked(self, key: bytes) -> bytes | None:
        """lookup of a key known to be key_size bytes."""
        if self.is_array:
            return self.reader.lookup(_INDEX.unpack(key)[0])  # type: ignore[arg-type]
        return self.reader.lookup(key)  # type: ignore[arg-type]

    def batch(self, cursor: bytes | None, count: int) -> tuple[list[bytes], list[bytes],
                                                               bytes | None]:
        """map_lookup_batch's answer read in place: up to count (keys, values) after cursor
        and the next cursor (None at the end). Raises Contended."""
        reader = self.reader
        if isinstance(reader, ArrayReader):
            start = 0 if cursor is None else _INDEX.unpack(cursor)[0] + 1
            if start > reader.max_entries:  # a cursor past the end restarts, as get_next_key
                start = 0
            values = reader.values(start, start + count)
            keys = [_INDEX.pack(i) for i in range(start, start + len(values))]
            end = start + len(values)
            return keys, values, (keys[-1] if keys and end < reader.max_entries else None)
        keys, values = [], []
        for key, value in reader.items(cursor):
            if len(keys) == count:  # one more than asked: the walk goes on after these
                return keys, values, keys[-1]
            keys.append(key)
            values.append(value)
        return keys, values, None

    def next_key(self, key: bytes | None) -> bytes | None:
        """get_next_key read in place: None at the end. Raises Contended."""
        reader = self.reader
        if isinstance(reader, ArrayReader):
            index = 0xFFFFFFFF if key is None else _INDEX.unpack(key)[0]
            if index >= reader.max_entries:
                return _INDEX.pack(0)
            return None if index + 1 >= reader.max_entries else _INDEX.pack(index + 1)
        return reader.next_key(key)

    @classmethod
    def attach(cls, fd: int, info: dict, result: dict) -> Direct:
        """Map the memfd the daemon sent, closing the fd (the mapping stays)."""
        try:
            return cls(fd, info, result)
        finally:
            os.close(fd)



class _Mapping:
    """An mmap(2) of map memory, unmapped when the last view of it is gone. Not Python's
    mmap, which keeps a dup of the fd for as long as the mapping lives: a process reading many
    maps would hold an fd for each."""

    def __init__(self, address: int, size: int):
        self.address, self.size = address, size

    def __del__(self) -> None:
        _libc.munmap(self.address, self.size)


def map_memory(fd: int, size: int, writable: bool) -> memoryview:
    """`size` bytes of fd mapped shared (read-only unless writable), as a memoryview that
    keeps the mapping while it or any slice of it lives. The fd may be closed afterwards."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    address = _libc.mmap(None, size, prot, mmap.MAP_SHARED, fd, 0)
    if address in (None, MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of map memory: {os.strerror(err)}")
    pages = (ctypes.c_char * size).from_address(address)
    pages.mapping = _Mapping(address, size)  # munmap once `pages` (held by every view) goes
    view = memoryview(pages).cast("B")
    return view if writable else view.toreadonly()  # a write is a TypeError, not a SIGSEGV


def why_not(info: dict) -> str | None:
    """Why a map fd is read through the socket rather than in place, or None."""
    if not ENABLED:
        return "BPFFS_DIRECT=0 is set"
    if info.get("type") not in (MapType.ARRAY, MapType.HASH):
        return "only array and hash maps have memory to map"
    if info["type"] == MapType.HASH and not DIRECT_HASH_READS:
        return "hash maps are read in place on x86-64 only (the seqlock needs its ordering)"
    return None
