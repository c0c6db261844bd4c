"""Where the packets of a classic pcap file are: the native walk (llvmlite) and the Python
walk find the same records, in either byte order, a chunk at a time, and stop at the same
place before a record that overruns the file."""

from __future__ import annotations

import random
import struct

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


def walk(data: bytes, big_endian: bool, count: int) -> list[pcap_index.Index]:
    """Every record, `count` at a time."""
    chunks, pos = [], 24
    while True:
        chunks.append(pcap_index.index(data, pos, pos, count, big_endian))
        if len(chunks[-1].offsets) < count:
            return chunks
        pos = chunks[-1].end


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("cut", [0, 1, 10, 20])
@pytest.mark.parametrize("count", [1, 7, 1000])
def test_the_native_walk_finds_what_the_python_walk_finds(big_endian: bool, cut: int,
                                                          count: int, monkeypatch) -> None:
    pytest.importorskip("llvmlite")
    data = capture(cut * 31 + count, big_endian, cut=cut)
    native = walk(data, big_endian, count)
    monkeypatch.setattr(pcap_index, "_native", lambda: None)
    assert native == walk(data, big_endian, count)
    assert any(chunk.truncated for chunk in native)
    assert max(chunk.longest for chunk in native) == 9000
    found, end = sum(len(chunk.offsets) for chunk in native), native[-1].end
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
