"""The fixed layouts of map memory (shm.py): the one description that the daemon's maps
(arraymap.py, hashtab.py) write and that readers in other processes (reader.py) read.

Array (BPF_MAP_TYPE_ARRAY), as the kernel's BPF_F_MMAPABLE arrays: value i at offset
i * round_up(value_size, 8), nothing else in the file.

Hash (BPF_MAP_TYPE_HASH), a preallocated table (the kernel's default, prealloc), all integers
little-endian u32:

    offset 0          header: magic "BPFH", version, n_buckets, max_entries, key_size,
                      value_size, elem_size, count (live elements), used (slots ever
                      used: none at or past it holds an element), zero-padded to 64 bytes
    HEADER_SIZE       n_buckets buckets of (seq, head): head is slot + 1 of the first element
                      of the bucket's chain, 0 for none
    elems_offset      max_entries elements of elem_size bytes: (seq, next, hash, flags), then
                      the key padded to 8 bytes, then the value padded to 8 bytes; `next` is
                      slot + 1 of the next element in the chain, `flags` has IN_USE set while
                      the element holds a key

A key's bucket is `bucket_hash(key) & (n_buckets - 1)`; n_buckets is max_entries rounded up to
a power of two (as htab_map_alloc). Only the daemon writes hash memory (it is sealed against
other writers), as a seqlock writer: a `seq` is odd while what it guards changes. A bucket's seq
guards its chain (linking, unlinking), an element's seq its key, value and flags. A reader
copies, then checks that the seqs it read are even and unchanged, or tries again (reader.py).
The daemon keeps its own index of keys to slots, so its lookups read no structure from here.
"""

from __future__ import annotations

import struct
import zlib

from .base import round_up

HASH_MAGIC = b"BPFH"
LAYOUT_VERSION = 1
# magic, version, n_buckets, max_entries, key, value, elem; then count and used
HEADER = struct.Struct("<4s7I")
HEADER_SIZE = 64
COUNT_OFFSET = HEADER.size - 4
USED_OFFSET = HEADER.size
SEQ = struct.Struct("<I")
BUCKET = struct.Struct("<II")  # seq, head
ELEM_HEADER = struct.Struct("<IIII")  # seq, next, hash, flags
IN_USE = 1
U32_MASK = 0xFFFFFFFF


def bucket_hash(key: bytes) -> int:
    """The hash that places a key (CRC-32: in C in every Python, so a reader computes it in
    ~0.1 us; the kernel's jhash would cost a reader microseconds in Python)."""
    return zlib.crc32(key)


def array_elem_size(value_size: int) -> int:
    return round_up(value_size, 8)


def array_size(value_size: int, max_entries: int) -> int:
    return array_elem_size(value_size) * max_entries


class HashLayout:
    """Offsets of a hash map's memory, from its attributes alone."""

    __slots__ = ("elem_size", "elems_offset", "key_offset", "key_size", "max_entries",
                 "n_buckets", "size", "value_offset", "value_size")

    def __init__(self, key_size: int, value_size: int, max_entries: int):
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self.n_buckets = 1 << (max_entries - 1).bit_length()
        self.elems_offset = round_up(HEADER_SIZE + BUCKET.size * self.n_buckets, 64)
        self.key_offset = ELEM_HEADER.size  # within an element
        self.value_offset = ELEM_HEADER.size + round_up(key_size, 8)
        self.elem_size = self.value_offset + round_up(value_size, 8)
        self.size = self.elems_offset + self.elem_size * max_entries

    def bucket(self, hash_: int) -> int:
        """The offset of the bucket of a key whose bucket_hash is hash_."""
        return HEADER_SIZE + BUCKET.size * (hash_ & (self.n_buckets - 1))

    def elem(self, slot: int) -> int:
        """The offset of element `slot`."""
        return self.elems_offset + self.elem_size * slot

    def header(self, count: int) -> bytes:
        return HEADER.pack(HASH_MAGIC, LAYOUT_VERSION, self.n_buckets, self.max_entries,
                           self.key_size, self.value_size, self.elem_size, count)
