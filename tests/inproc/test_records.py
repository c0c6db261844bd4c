"""Journal and snapshot records in-process (bpffsd/persist/records.py): what is framed reads
back the same; reading stops at a torn or corrupt tail and keeps the good prefix before it; a
large element record is written in slices that replay whole or not at all; and a map's
contents recorded lazily read the same elements as an eager record would."""

from __future__ import annotations

import zlib

import pytest

from bpffs.daemon.persist import records
from bpffs.daemon.persist.state import Contents
from bpffs.vm.maps import ArrayMap, HashMap

CHUNK = records.CHUNK


def key(n: int) -> bytes:
    return n.to_bytes(4, "little")


def frames(*entries: object) -> bytes:
    return b"".join(records.frames(entries))


def test_a_large_record_is_framed_in_slices_that_add_up_to_it() -> None:
    items = [[key(n), key(n * 2)] for n in range(3 * CHUNK + 5)]
    found, _, problem = records.read(frames(("map", 1), ("elems", 1, items), ("del", 1, [])))
    assert problem is None
    assert [r[0] for r in found] == ["map", "elems", "set", "set", "set", "del"]
    assert [len(r) for r in found[1:5]] == [4, 4, 4, 3]  # "more follows" on all but the last
    assert [item for r in found[1:5] for item in r[2]] == items
    assert records.small(("set", 1, items[:CHUNK])) and not records.small(("set", 1, items))


def test_a_group_cut_short_is_dropped_whole() -> None:
    """A crash between two slices must not leave an "elems" that forgot acknowledged
    elements: the group goes, as a torn record does, and what came before stays."""
    items = [[key(n), key(n)] for n in range(2 * CHUNK + 1)]
    data = frames(("map", 1), ("set", 1, [[key(0), key(9)]]), ("elems", 1, items))
    full, _, _ = records.read(data)
    ends, offset = [], 0
    for record in full:
        offset += len(records.frame(record))
        ends.append(offset)
    for cut in (ends[2], ends[3], ends[3] + 7, ends[4] - 1):  # after slice 1, 2, mid 3
        found, end, problem = records.read(data[:cut])
        assert found == full[:2] and end == ends[1], cut
        assert problem is not None and "cut short" in problem
    assert records.read(data)[0] == full


def test_contents_read_the_map_when_written() -> None:
    array = ArrayMap(4, 2, 3 * CHUNK)
    array.update(key(5), b"ab")
    lazy = Contents(7, array)
    array.update(key(6), b"cd")  # a later change shows (its own record follows it)
    found, _, problem = records.read(frames(lazy))
    assert problem is None and found[0][:2] == ["elems", 7]
    elems = dict((k, v) for r in found for k, v in r[2])
    assert len(elems) == 3 * CHUNK and elems[key(5)] == b"ab" and elems[key(6)] == b"cd"
    assert elems[key(0)] == bytes(2)

    hashmap = HashMap(4, 4, 100)
    for n in range(10):
        hashmap.update(key(n), key(n))
    lazy = Contents(8, hashmap)
    hashmap.delete(key(3))
    found, _, _ = records.read(frames(lazy))
    assert found == [["elems", 8, [[key(n), key(n)] for n in range(10) if n != 3]]]
    empty, _, _ = records.read(frames(Contents(9, HashMap(4, 4, 1))))
    assert empty == [["elems", 9, []]]


RECORDS = [
    ("map", 1, 1, 4, 8, 16, 0, "counts"),
    ("set", 1, [[key(1), b"\x00" * 8], [key(2), b"\xff" * 8]]),
    ("pin", 2, b"\xffnot utf-8", 0o600, {"uid": 0, "gid": 0}),
    ("del", 1, []),
    ("free", 2**63),
]


def test_framed_records_read_back_the_same() -> None:
    data = frames(*RECORDS)
    assert data == b"".join(records.frame(r) for r in RECORDS)
    found, end, problem = records.read(data)
    assert found == [list(r) for r in RECORDS]  # msgpack arrays come back as lists
    assert (end, problem) == (len(data), None)
    assert records.read(b"") == ([], 0, None)


def test_frames_are_written_about_a_mebibyte_at_a_time() -> None:
    big = ("set", 1, [[key(n), bytes(200)] for n in range(records.CHUNK)])  # ~1.7 MiB
    writes = list(records.frames([big, big, ("del", 1, [])]))
    assert len(writes) >= 2 and all(len(w) < 4 << 20 for w in writes)
    assert records.read(b"".join(writes))[0][-1] == ["del", 1, []]


def test_a_torn_tail_at_any_byte_keeps_every_whole_record_before_it() -> None:
    data = frames(*RECORDS)
    last = len(records.frame(RECORDS[-1]))
    good = len(data) - last
    for cut in range(good + 1, len(data)):
        found, end, problem = records.read(data[:cut])
        assert found == [list(r) for r in RECORDS[:-1]] and end == good, cut
        torn = "torn record header" if cut - good < records.HEADER.size else "torn record"
        assert problem == f"{torn} at byte {good}", cut


@pytest.mark.parametrize("where", ["length", "crc", "body"])
def test_a_corrupt_record_stops_the_reading_there(where: str) -> None:
    data = bytearray(frames(*RECORDS))
    second = len(records.frame(RECORDS[0]))
    offset = {"length": 0, "crc": 4, "body": records.HEADER.size + 3}[where]
    data[second + offset] ^= 0x40
    found, end, problem = records.read(bytes(data))
    assert found == [list(RECORDS[0])] and end == second
    assert problem is not None and f"at byte {second}" in problem


def test_a_body_that_passes_its_checksum_but_is_no_msgpack_stops_the_reading() -> None:
    body = b"\xc1"  # a byte msgpack never produces
    bad = records.HEADER.pack(len(body), zlib.crc32(body)) + body
    found, end, problem = records.read(records.frame(RECORDS[0]) + bad + frames(*RECORDS))
    assert found == [list(RECORDS[0])] and end == len(records.frame(RECORDS[0]))
    assert problem is not None and problem.startswith("undecodable record at byte")
