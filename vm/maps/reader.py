"""Reading a map's memory from another process, without the daemon (layout.py says what is
where; the client library maps the memory and reads through these).

A reader trusts nothing it reads: every slot index is bounds-checked, every chain walk stops
after max_entries steps, and whatever the memory holds, a read returns bytes, None, or raises
`Contended`, never anything else. Hash reads are seqlock reads: the seqs read before and after
the copy must be even and equal, else the read is tried again, up to MAX_TRIES times; then
`Contended` tells the caller to ask the daemon instead (whose answer is serialised with its
writes). Array values have no lock, as on the kernel: a value that is being written may be
read half old, half new.

The seqlock relies on the writer's stores and the reader's loads each staying in program
order, which x86-64 guarantees (TSO) and Python cannot ask for elsewhere (no fences):
`DIRECT_HASH_READS` is therefore False on other CPUs, and callers use the daemon for hashes.
"""

from __future__ import annotations

import platform
import struct
from collections.abc import Iterator

from .layout import (
    BUCKET,
    COUNT_OFFSET,
    ELEM_HEADER,
    HEADER_SIZE,
    IN_USE,
    SEQ,
    USED_OFFSET,
    HashLayout,
    array_elem_size,
    bucket_hash,
)

MAX_TRIES = 64
WALK_CHUNK = 1024  # elements copied at once by a walk
_TRIES = range(MAX_TRIES)
DIRECT_HASH_READS = platform.machine().lower() in ("x86_64", "amd64")
_unpack_bucket = BUCKET.unpack_from
_unpack_elem = ELEM_HEADER.unpack_from
_unpack_seq = SEQ.unpack_from


class Contended(Exception):
    """The memory kept changing (or holds what no writer leaves): ask the daemon."""


class ArrayReader:
    """Values of an array map in place: value i at i * elem_size."""

    def __init__(self, buf: memoryview, value_size: int, max_entries: int):
        self.elem_size = array_elem_size(value_size)
        if len(buf) < self.elem_size * max_entries:
            raise ValueError(f"array memory of {len(buf)} bytes is too small for"
                             f" {max_entries} values of {value_size} bytes")
        self.buf = buf
        self.value_size = value_size
        self.max_entries = max_entries

    def lookup(self, index: int) -> bytes | None:
        if not 0 <= index < self.max_entries:
            return None
        off = index * self.elem_size
        return bytes(self.buf[off:off + self.value_size])

    def values(self, start: int = 0, stop: int | None = None) -> list[bytes]:
        """Values start..stop-1 (one copy of the range, then sliced)."""
        stop = self.max_entries if stop is None else min(stop, self.max_entries)
        elem, size = self.elem_size, self.value_size
        chunk = bytes(self.buf[start * elem:stop * elem])
        return [chunk[i:i + size] for i in range(0, len(chunk), elem)]


class HashReader:
    """Lookups and walks of a hash map's table, by seqlock."""

    def __init__(self, buf: memoryview, key_size: int, value_size: int, max_entries: int):
        layout = HashLayout(key_size, value_size, max_entries)
        if len(buf) < layout.size:
            raise ValueError(f"hash memory of {len(buf)} bytes is too small for its layout"
                             f" ({layout.size} bytes)")
        self.buf = buf
        self.layout = layout
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self._mask = layout.n_buckets - 1
        self._elems = layout.elems_offset
        self._esize = layout.elem_size
        self._koff = layout.key_offset
        self._voff = layout.value_offset
        self._vend = self._voff + value_size
        # an element's header and key in one unpack (the key without its padding)
        self._unpack_head = struct.Struct(f"<IIII{key_size}s").unpack_from
        self._elem_struct = struct.Struct(f"<IIII{self._voff - self._koff}s"
                                          f"{self._esize - self._voff}s")

    def lookup(self, key: bytes) -> bytes | None:
        """The value of key, or None if absent."""
        buf, limit = self.buf, self.max_entries
        hash_ = bucket_hash(key)
        bucket = HEADER_SIZE + BUCKET.size * (hash_ & self._mask)
        elems, esize, voff, vend = self._elems, self._esize, self._voff, self._vend
        unpack_head = self._unpack_head
        for _ in _TRIES:
            seq, at = _unpack_bucket(buf, bucket)
            if seq & 1:
                continue
            value, whole, steps = None, True, 0
            while at:
                if at > limit or steps == limit:
                    whole = False  # no writer leaves this: torn, or garbage
                    break
                steps += 1
                elem = elems + esize * (at - 1)
                eseq, at, ehash, flags, ekey = unpack_head(buf, elem)
                if ehash == hash_ and ekey == key:
                    value = bytes(buf[elem + voff:elem + vend])  # copied before the check
                    whole = not eseq & 1 and flags & IN_USE and _unpack_seq(buf, elem)[0] == eseq
                    break
            if whole and _unpack_seq(buf, bucket)[0] == seq:
                return value
        raise Contended(f"hash bucket of key {key.hex()} kept changing")

    def _slot_of(self, key: bytes) -> int | None:
        """The slot holding key now, or None (a walk then restarts from the first element)."""
        buf, elems, esize, limit = self.buf, self._elems, self._esize, self.max_entries
        hash_ = bucket_hash(key)
        bucket = HEADER_SIZE + BUCKET.size * (hash_ & self._mask)
        kstart, kend = self._koff, self._koff + self.key_size
        for _ in range(MAX_TRIES):
            seq, at = _unpack_bucket(buf, bucket)
            if seq & 1:
                continue
            found, steps = None, 0
            while at and at <= limit and steps < limit:
                steps += 1
                elem = elems + esize * (at - 1)
                _, after, ehash, _ = _unpack_elem(buf, elem)
                if ehash == hash_ and buf[elem + kstart:elem + kend] == key:
                    found = at - 1
                    break
                at = after
            if _unpack_seq(buf, bucket)[0] == seq:
                return found
        raise Contended(f"hash bucket of key {key.hex()} kept changing")

    def items(self, after: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) of every element after `after` (from the first if None or absent),
        in slot order: the daemon's get_next_key order. A live walk: elements added or
        removed meanwhile may or may not show, as a walk with get_next_key. Elements are
        copied WALK_CHUNK at a time; each copied element whose seq was even counts if its seq
        is still the same afterwards, else it is read again alone."""
        start = 0
        if after is not None:
            slot = self._slot_of(after)
            start = 0 if slot is None else slot + 1
        buf, esize, elem_struct = self.buf, self._esize, self._elem_struct
        ksize, vsize = self.key_size, self.value_size
        # no slot at or past `used` holds an element (a number, so bounded by max_entries)
        used = min(self.max_entries, _unpack_seq(buf, USED_OFFSET)[0])
        for first in range(start, used, WALK_CHUNK):
            base = self._elems + esize * first
            end = min(used, first + WALK_CHUNK)
            chunk = bytes(buf[base:self._elems + esize * end])
            for i, (seq, _, _, flags, key, value) in enumerate(elem_struct.iter_unpack(chunk)):
                if seq & 1 or _unpack_seq(buf, base + esize * i)[0] != seq:
                    element = self._element(first + i)
                    if element is not None:
                        yield element
                elif flags & IN_USE:
                    yield key[:ksize], value[:vsize]

    def _element(self, slot: int) -> tuple[bytes, bytes] | None:
        """The (key, value) of a slot if in use, None if free; read alone, by seqlock."""
        buf = self.buf
        elem = self._elems + self._esize * slot
        for _ in range(MAX_TRIES):
            seq, _, _, flags, key, value = self._elem_struct.unpack_from(buf, elem)
            if seq & 1:
                continue
            if _unpack_seq(buf, elem)[0] == seq:
                return (key[:self.key_size], value[:self.value_size]) if flags & IN_USE else None
        raise Contended(f"hash element {slot} kept changing")

    def next_key(self, key: bytes | None) -> bytes | None:
        """get_next_key: the key after key (the first if None or absent), None at the end."""
        for k, _ in self.items(key):
            return k
        return None

    def count(self) -> int:
        """The live element count the daemon keeps in the header (not bounds-checked: a
        number, not an index)."""
        return _unpack_seq(self.buf, COUNT_OFFSET)[0]
