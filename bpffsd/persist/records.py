"""Record framing of the journal and the snapshot: a length, a CRC-32 and a msgpack body.

A torn write (a crash mid-append) leaves a short or mismatching last record; reading stops at
the first record that is incomplete or fails its checksum, and everything from there on is
discarded: later records may depend on the lost one, so none of them can be trusted.

A large element record (a map's whole contents, a big batch) is framed in slices of CHUNK
elements, off the event loop: ("elems", id, first slice, 1), then ("set", id, slice, 1) ...
and a last slice without the trailing 1. The 1 says "more of this record follows": reading
drops a group whose end is missing as it drops a torn record, so the group applies whole or
not at all (an "elems" cut short would otherwise forget the map's acknowledged elements).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import msgpack

HEADER = struct.Struct("<II")  # body length, crc32 of the body
CHUNK = 8192  # elements per framed slice of a large record (a msgpack call holds the GIL)
_ELEMENT_RECORDS = ("elems", "set", "del")
_WRITE_SIZE = 1 << 20


def frame(record: Any) -> bytes:
    body = msgpack.packb(record, use_bin_type=True)
    return HEADER.pack(len(body), zlib.crc32(body)) + body


class Lazy:
    """Stands for records made only when they are written (in a thread, off the event loop):
    `records()` yields them, their large element records already in slices (see `split`)."""

    def records(self) -> Iterator[Any]:
        raise NotImplementedError


def small(record: Any) -> bool:
    """Whether to frame the record at once (on the loop): not a Lazy, not a large element
    record."""
    return not isinstance(record, Lazy) and not (
        isinstance(record, tuple) and len(record) == 3 and record[0] in _ELEMENT_RECORDS
        and len(record[2]) > CHUNK)


def split(record: tuple) -> Iterator[tuple]:
    """An element record as slices of CHUNK elements, all but the last marked "more"."""
    kind, obj_id, items = record
    if len(items) <= CHUNK:
        yield record
        return
    for start in range(0, len(items), CHUNK):
        part = items[start:start + CHUNK]
        more = start + CHUNK < len(items)
        name = "set" if kind == "elems" and start else kind
        yield (name, obj_id, part, 1) if more else (name, obj_id, part)


def slices(kind: str, obj_id: int, items: Iterable[Any]) -> Iterator[tuple]:
    """An element record of an iterable (read as it goes), in slices as `split` makes them."""
    chunk: list[Any] = []
    name = kind
    for item in items:
        if len(chunk) == CHUNK:
            yield (name, obj_id, chunk, 1)
            chunk = []
            if kind == "elems":
                name = "set"
        chunk.append(item)
    yield (name, obj_id, chunk)


def frames(batch: Iterable[Any]) -> Iterator[bytes]:
    """Entries (framed bytes, records, Lazy) framed as bytes to write, about a MiB at a
    time."""
    out: list[bytes] = []
    size = 0
    for entry in batch:
        if isinstance(entry, bytes):
            parts: Iterable[bytes] = (entry,)
        elif isinstance(entry, Lazy):
            parts = map(frame, entry.records())
        elif small(entry):
            parts = (frame(entry),)
        else:
            parts = map(frame, split(entry))
        for part in parts:
            out.append(part)
            size += len(part)
            if size >= _WRITE_SIZE:
                yield b"".join(out)
                out, size = [], 0
    if out:
        yield b"".join(out)


def _continued(record: Any) -> bool:
    return (isinstance(record, list) and len(record) == 4 and record[0] in _ELEMENT_RECORDS
            and record[3] == 1)


def read(data: bytes) -> tuple[list[Any], int, str | None]:
    """(records, length of the good prefix, why reading stopped early or None)."""
    records: list[Any] = []
    ends: list[int] = []  # where each record ends
    offset, problem = 0, None
    while offset < len(data):
        if offset + HEADER.size > len(data):
            problem = f"torn record header at byte {offset}"
            break
        length, crc = HEADER.unpack_from(data, offset)
        body = data[offset + HEADER.size:offset + HEADER.size + length]
        if len(body) < length:
            problem = f"torn record at byte {offset}"
            break
        if zlib.crc32(body) != crc:
            problem = f"checksum mismatch in the record at byte {offset}"
            break
        try:
            records.append(msgpack.unpackb(body, raw=False, strict_map_key=False))
        except (ValueError, msgpack.UnpackException) as e:
            problem = f"undecodable record at byte {offset}: {e}"
            break
        offset += HEADER.size + length
        ends.append(offset)
    if records and _continued(records[-1]):
        while records and _continued(records[-1]):
            records.pop()
            ends.pop()
        offset = ends[-1] if ends else 0
        problem = (f"{problem}; " if problem else "") + ("a record cut short (the rest of its"
                                                        f" slices missing) at byte {offset}")
    return records, offset, problem
