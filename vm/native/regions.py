"""The region table native code checks every access against: for each region id, the
address of its buffer, its size and whether it may be written (abi.Entry).

Python's Memory stays the one description of a run's address space; this is a copy native
code can read, refreshed whenever Python may have changed Memory: on entry to native code
and after every call out (a helper may map a map value, a callee frame maps its stack). The
buffers themselves are shared, not copied: a Region's memoryview holds an export on its
buffer, so the address stays valid while the region is mapped.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from ..memory import FIRST_DYNAMIC_REGION, Memory, Region
from .abi import ENTRY_WORDS, Entry

if TYPE_CHECKING:
    from ..run import Run

_INITIAL_ENTRIES = 64
_ENTRY_BYTES = ENTRY_WORDS * ctypes.sizeof(ctypes.c_uint64)


class _PyBuffer(ctypes.Structure):
    """Py_buffer (part of the stable ABI since 3.11): how to get the address of a read-only
    buffer too, which ctypes' from_buffer refuses."""

    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int),
                ("ndim", ctypes.c_int), ("format", ctypes.c_char_p),
                ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None
_PYBUF_SIMPLE = 0  # contiguous bytes, read-only allowed


# CPython keeps a bytes object's data inline, right after its header: the one kind of buffer
# whose address needs no call (and the frame of a test run is bytes until a helper writes it).
_BYTES_DATA = bytes.__basicsize__ - 1


def buffer_address(buf: bytes | bytearray | memoryview) -> int:
    """Address of the first byte of a contiguous buffer (0 for an empty one)."""
    if not len(buf):
        return 0
    if type(buf) is bytes:
        return id(buf) + _BYTES_DATA
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))
    except TypeError:  # read-only: ctypes refuses it, the buffer protocol does not
        pass
    view = _PyBuffer()
    _get_buffer(buf, ctypes.byref(view), _PYBUF_SIMPLE)  # raises BufferError if it cannot
    try:
        return view.buf or 0
    finally:
        _release_buffer(ctypes.byref(view))


class RegionTable:
    """The table of one Run (shared by nested native invocations: tail calls)."""

    def __init__(self) -> None:
        self.entries = 0
        self.words = (ctypes.c_uint64 * 0)()
        self.address = 0
        self.synced: dict[int, Region] = {}  # what the table holds, by region id
        self.next_id = FIRST_DYNAMIC_REGION  # Memory's next dynamic id when last synced
        self._grow(_INITIAL_ENTRIES)

    @property
    def length(self) -> int:
        """Entries native code may index: one past the highest mapped id."""
        return self.entries

    def _grow(self, needed: int) -> None:
        entries = max(needed, 2 * self.entries)
        words = (ctypes.c_uint64 * (entries * ENTRY_WORDS))()
        ctypes.memmove(words, self.words, ctypes.sizeof(self.words))
        self.words, self.entries, self.address = words, entries, ctypes.addressof(words)

    def _set(self, region_id: int, region: Region | None) -> None:
        if region_id >= self.entries:
            self._grow(region_id + 1)
        at = region_id * ENTRY_WORDS
        words = self.words
        if region is None:
            words[at + Entry.BASE] = words[at + Entry.READ_LIMIT] = 0
            words[at + Entry.WRITE_LIMIT] = words[at + Entry.MAP] = 0
            self.synced.pop(region_id, None)
            return
        words[at + Entry.BASE] = buffer_address(region.buf)
        words[at + Entry.READ_LIMIT] = region.size
        words[at + Entry.WRITE_LIMIT] = region.size if region.writable else 0
        words[at + Entry.MAP] = 0
        self.synced[region_id] = region

    def clear(self, first: int, end: int) -> None:
        """Unmap ids [first, end) that native code mapped and Memory never learnt of (map
        values of a run that ended): no later run may reach them."""
        end = min(end, self.entries)
        if first < end:
            ctypes.memset(self.address + first * _ENTRY_BYTES, 0,
                          (end - first) * _ENTRY_BYTES)

    def sync(self, mem: Memory) -> None:
        """Make the table describe `mem` exactly (O(regions))."""
        regions, synced = mem.regions, self.synced
        for region_id, region in regions.items():
            if synced.get(region_id) is not region:
                self._set(region_id, region)
        if len(synced) != len(regions):
            for region_id in [r for r in synced if r not in regions]:
                self._set(region_id, None)
        self.next_id = mem._next_id

    def sync_new(self, mem: Memory, *fixed: int) -> None:
        """After a call out that may only have added dynamic regions (a helper) or mapped
        the fixed ids given (a frame's stack): cheap unless something else changed."""
        regions = mem.regions
        for region_id in fixed:
            region = regions.get(region_id)
            if self.synced.get(region_id) is not region:
                self._set(region_id, region)
        next_id = mem._next_id
        if next_id < self.next_id:
            self.sync(mem)
            return
        for region_id in range(self.next_id, next_id):
            region = regions.get(region_id)
            if region is not None:
                self._set(region_id, region)
        self.next_id = next_id
        if len(self.synced) != len(regions):
            self.sync(mem)


def table_of(run: Run) -> RegionTable:
    """The run's table, made on its first native invocation."""
    table = run.__dict__.get("_native_regions")
    if table is None:
        table = run.__dict__["_native_regions"] = RegionTable()
    return table
