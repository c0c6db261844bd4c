"""The address space of one program run.

The kernel's verifier proves every access safe; the VM checks every access anyway, so a
program the verifier let through by mistake can fault but can never touch the daemon's state.
An address is `(region_id << 32) | offset`: pointer arithmetic stays plain integer arithmetic,
and any address outside a mapped region (including NULL and anything below a region's base,
which wraps into another region id) faults.
"""

from __future__ import annotations

import struct

from .errors import MemoryFault

REGION_SHIFT = 32
OFFSET_MASK = (1 << REGION_SHIFT) - 1
STACK_REGION = 1  # frame 0
STACK_FRAME_REGIONS = 3  # frames 1..8 of bpf-to-bpf calls use regions 4..11
CTX_REGION = 2
FIRST_DYNAMIC_REGION = 16  # map values and helper buffers
MAP_HANDLE_REGION = OFFSET_MASK  # never mapped: a map "pointer" cannot be dereferenced
# Little-endian accessors by access size (struct is several times faster than int.from_bytes
# on a slice, and loads and stores are most of what a program does besides ALU work).
_FORMATS = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}
UNPACK = {size: struct.Struct(fmt).unpack_from for size, fmt in _FORMATS.items()}
PACK = {size: struct.Struct(fmt).pack_into for size, fmt in _FORMATS.items()}
SIZE_MASK = {size: (1 << (size * 8)) - 1 for size in _FORMATS}


def region_base(region_id: int) -> int:
    return region_id << REGION_SHIFT


def map_handle(index: int) -> int:
    """What LD_IMM64 with src=BPF_PSEUDO_MAP_FD loads: the index of the map in `prog.maps`."""
    return region_base(MAP_HANDLE_REGION) | index


def map_index(value: int) -> int | None:
    """The map index of a map handle, or None when `value` is not one."""
    if value >> REGION_SHIFT != MAP_HANDLE_REGION:
        return None
    return value & OFFSET_MASK


class Region:
    __slots__ = ("buf", "name", "size", "writable")

    def __init__(self, buf: bytearray | memoryview, writable: bool, name: str):
        self.buf = buf if isinstance(buf, memoryview) else memoryview(buf)
        self.size = len(self.buf)
        self.writable = writable
        self.name = name


class Memory:
    __slots__ = ("_next_id", "regions")

    def __init__(self) -> None:
        self.regions: dict[int, Region] = {}
        self._next_id = FIRST_DYNAMIC_REGION

    def map(self, region_id: int, buf: bytearray | memoryview, writable: bool, name: str) -> int:
        """Map `buf` at a fixed region id; returns its base address."""
        self.regions[region_id] = Region(buf, writable, name)
        return region_base(region_id)

    def map_zeroed(self, region_id: int, size: int, name: str) -> int:
        """Map `size` zero bytes at a fixed id, reusing the buffer already there (stacks are
        mapped once per run and call, so this is on the hot path)."""
        region = self.regions.get(region_id)
        if region is not None and region.size == size and region.writable:
            region.buf[:] = _zeros(size)
            return region_base(region_id)
        return self.map(region_id, bytearray(size), True, name)

    def add(self, buf: bytearray | memoryview, writable: bool, name: str) -> int:
        """Map `buf` at a new region id; returns its base address."""
        region_id = self._next_id
        self._next_id += 1
        return self.map(region_id, buf, writable, name)

    def _find(self, addr: int, size: int, write: bool) -> tuple[memoryview, int]:
        region = self.regions.get(addr >> REGION_SHIFT)
        off = addr & OFFSET_MASK
        if region is None:
            raise MemoryFault(f"invalid {'write' if write else 'read'} of {size} bytes at"
                              f" {addr:#x}: not a mapped region")
        if off + size > region.size:
            raise MemoryFault(f"invalid {'write' if write else 'read'} of {size} bytes at"
                              f" offset {off} of {region.name} ({len(region.buf)} bytes)")
        if write and not region.writable:
            raise MemoryFault(f"write of {size} bytes into read-only {region.name}")
        return region.buf, off

    def load(self, addr: int, size: int) -> int:
        """An instruction's load: size 1, 2, 4 or 8, unsigned little endian."""
        region = self.regions.get(addr >> REGION_SHIFT)
        off = addr & OFFSET_MASK
        if region is None or off + size > region.size:
            self._find(addr, size, False)  # raises the fault
        return UNPACK[size](region.buf, off)[0]

    def store(self, addr: int, size: int, value: int) -> None:
        """An instruction's store of the low `size` bytes of value (size 1, 2, 4 or 8)."""
        region = self.regions.get(addr >> REGION_SHIFT)
        off = addr & OFFSET_MASK
        if region is None or off + size > region.size or not region.writable:
            self._find(addr, size, True)  # raises the fault
        PACK[size](region.buf, off, value & SIZE_MASK[size])

    def read(self, addr: int, n: int) -> bytes:
        buf, off = self._find(addr, n, False)
        return bytes(buf[off:off + n])

    def write(self, addr: int, data: bytes) -> None:
        buf, off = self._find(addr, len(data), True)
        buf[off:off + len(data)] = data

    def view(self, addr: int, n: int, write: bool = False) -> memoryview:
        buf, off = self._find(addr, n, write)
        return buf[off:off + n]


_ZEROS: dict[int, bytes] = {}


def _zeros(size: int) -> bytes:
    zeros = _ZEROS.get(size)
    if zeros is None:
        zeros = _ZEROS[size] = bytes(size)
    return zeros
