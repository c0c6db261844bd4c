"""Where the packets of a classic pcap file are: the native walk (llvmlite) and the Python
walk find the same records, in either byte order, a chunk at a time, and stop at the same
place before a record that overruns the file."""

from __future__ import annotations

import random
import struct
from array import array

import pytest

from bpffs.client import pcap_index


def capture(seed: int, big_endian: bool, records: int = 500, cut: int = 0) -> bytes:
    rng = random.Random(seed)
    order = ">" if big_endian else "<"
    out = [struct.pack(order + "IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)]
    for i in range(records):
        data = rng.randbytes(rng.choice([0, 1, 14, 60, 1514, 9000]))
        out.append(struct.pack(order + "IIII", i, 0, len(data),
                               len(data) + rng.choice([0, 0, 4])) + data)
    blob = b"".join(out)
    return blob[:len(blob) - cut]


def walk(data: bytes, big_endian: bool, count: int, native: bool) -> list:
    """Every record, `count` at a time: (offsets, lengths, wire, end) of each chunk."""
    if native:
        pytest.importorskip("llvmlite")
    chunks, pos = [], 24
    while True:
        if native:
            index = pcap_index.index(data, pos, pos, count, big_endian)
        else:
            index = pcap_index.Index(array("Q", bytes(8 * count)), array("I", bytes(4 * count)),
                                     array("I", bytes(4 * count)), 0)
            found, index.end = pcap_index._python_walk(data, pos, pos, count, big_endian,
                                                       index.offsets, index.lengths,
                                                       index.wire)
            for column in (index.offsets, index.lengths, index.wire):
                del column[found:]
        chunks.append((index.offsets.tolist(), index.lengths.tolist(), index.wire.tolist(),
                       index.end))
        if len(index.offsets) < count:
            return chunks
        pos = index.end


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("cut", [0, 1, 10, 20])
@pytest.mark.parametrize("count", [1, 7, 1000])
def test_the_native_walk_finds_what_the_python_walk_finds(big_endian: bool, cut: int,
                                                          count: int) -> None:
    data = capture(cut * 31 + count, big_endian, cut=cut)
    native = walk(data, big_endian, count, native=True)
    assert native == walk(data, big_endian, count, native=False)
    found, end = sum(len(offsets) for offsets, *_ in native), native[-1][3]
    assert (found, end) == (500, len(data)) if not cut else (found < 500 and end < len(data))


def test_offsets_point_at_each_packet() -> None:
    pytest.importorskip("llvmlite")
    data = capture(3, False)
    index = pcap_index.index(data, 24, 24, 1000, False)
    pos = 24
    for offset, length in zip(index.offsets, index.lengths, strict=True):
        assert struct.unpack_from("<I", data, pos + 8)[0] == length
        assert offset == pos + 16 - 24
        pos += 16 + length
    assert index.end == pos == len(data)
