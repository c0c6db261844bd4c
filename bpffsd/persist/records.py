"""Record framing of the journal and the snapshot: a length, a CRC-32 and a msgpack body.

A torn write (a crash mid-append) leaves a short or mismatching last record; reading stops at
the first record that is incomplete or fails its checksum, and everything from there on is
discarded: later records may depend on the lost one, so none of them can be trusted.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import msgpack

HEADER = struct.Struct("<II")  # body length, crc32 of the body


def frame(record: Any) -> bytes:
    body = msgpack.packb(record, use_bin_type=True)
    return HEADER.pack(len(body), zlib.crc32(body)) + body


def read(data: bytes) -> tuple[list[Any], int, str | None]:
    """(records, length of the good prefix, why reading stopped early or None)."""
    records, offset = [], 0
    while offset < len(data):
        if offset + HEADER.size > len(data):
            return records, offset, f"torn record header at byte {offset}"
        length, crc = HEADER.unpack_from(data, offset)
        body = data[offset + HEADER.size:offset + HEADER.size + length]
        if len(body) < length:
            return records, offset, f"torn record at byte {offset}"
        if zlib.crc32(body) != crc:
            return records, offset, f"checksum mismatch in the record at byte {offset}"
        try:
            records.append(msgpack.unpackb(body, raw=False, strict_map_key=False))
        except (ValueError, msgpack.UnpackException) as e:
            return records, offset, f"undecodable record at byte {offset}: {e}"
        offset += HEADER.size + length
    return records, offset, None
