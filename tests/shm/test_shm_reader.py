"""Map memory in one process: the readers of bpffs.vm.maps.reader against the maps that write
it, and against memory in states no writer leaves (mid-write, garbage)."""

from __future__ import annotations

import mmap
import os
import random
import signal
import struct
import time

import pytest

from bpffs.vm.errors import BpfError
from bpffs.vm.maps import create_map
from bpffs.vm.maps.layout import BUCKET, ELEM_HEADER, HEADER_SIZE, HashLayout, bucket_hash
from bpffs.vm.maps.reader import ArrayReader, Contended, HashReader
from bpffs.vm.uapi import BPF_F_MMAPABLE, MapType


def u32(i: int) -> bytes:
    return struct.pack("<I", i)


def hash_map(max_entries: int = 64, value_size: int = 8):
    m = create_map(MapType.HASH, 4, value_size, max_entries, 0, "h")
    return m, HashReader(m.shm.buf, 4, value_size, max_entries)


def daemon_walk(m) -> list[bytes]:
    keys, key = [], None
    while True:
        try:
            key = m.get_next_key(key)
        except BpfError:
            return keys
        keys.append(key)


def reader_walk(r: HashReader) -> list[bytes]:
    keys, key = [], None
    while (key := r.next_key(key)) is not None:
        keys.append(key)
    return keys


@pytest.mark.parametrize("seed", range(20))
def test_the_reader_agrees_with_the_map_after_random_operations(seed: int) -> None:
    rng = random.Random(seed)
    m, r = hash_map(max_entries=32)
    model: dict[bytes, bytes] = {}
    for _ in range(400):
        key, value = u32(rng.randrange(48)), rng.randbytes(8)
        if rng.random() < 0.6:
            try:
                m.update(key, value)
                model[key] = value
            except BpfError:  # full
                assert len(model) == 32 and key not in model
        elif key in model:
            m.delete(key)
            del model[key]
        probe = u32(rng.randrange(48))
        assert r.lookup(probe) == model.get(probe)
    assert dict(r.items()) == model == dict(m.items())
    assert reader_walk(r) == daemon_walk(m)  # the same get_next_key order
    assert r.count() == len(model)


def test_a_walk_from_a_key_that_is_gone_restarts_as_get_next_key_does() -> None:
    m, r = hash_map()
    for i in range(5):
        m.update(u32(i), bytes(8))
    assert r.next_key(u32(99)) == m.get_next_key(u32(99)) == reader_walk(r)[0]


def test_array_values_are_read_in_place_at_the_kernels_offsets() -> None:
    a = create_map(MapType.ARRAY, 4, 12, 5, BPF_F_MMAPABLE, "a")
    a.update(u32(3), b"x" * 12)
    r = ArrayReader(a.shm.buf, 12, 5)
    assert bytes(a.shm.buf[3 * 16:3 * 16 + 12]) == b"x" * 12  # round_up(12, 8) apart
    assert r.lookup(3) == b"x" * 12 and r.lookup(0) == bytes(12)
    assert r.lookup(5) is None and r.lookup(-1) is None
    assert r.values(2, 4) == [bytes(12), b"x" * 12]


def _bucket_of(key: bytes, layout: HashLayout) -> int:
    return layout.bucket(bucket_hash(key))


def test_a_bucket_mid_change_is_not_read() -> None:
    m, r = hash_map()
    m.update(u32(1), b"A" * 8)
    bucket = _bucket_of(u32(1), m.layout)
    seq = struct.unpack_from("<I", m.shm.buf, bucket)[0]
    struct.pack_into("<I", m.shm.buf, bucket, seq + 1)  # a writer is changing the chain
    with pytest.raises(Contended):
        r.lookup(u32(1))
    struct.pack_into("<I", m.shm.buf, bucket, seq + 2)
    assert r.lookup(u32(1)) == b"A" * 8


def test_an_element_mid_write_is_not_read() -> None:
    m, r = hash_map()
    m.update(u32(1), b"A" * 8)
    elem = m.layout.elem(m._index[u32(1)])
    seq = struct.unpack_from("<I", m.shm.buf, elem)[0]
    struct.pack_into("<I", m.shm.buf, elem, seq + 1)
    with pytest.raises(Contended):
        r.lookup(u32(1))
    with pytest.raises(Contended):
        list(r.items())


def test_a_chain_that_loops_or_points_outside_ends_in_contended_not_a_hang() -> None:
    m, r = hash_map(max_entries=8)
    m.update(u32(1), b"A" * 8)
    slot = m._index[u32(1)]
    elem = m.layout.elem(slot)
    struct.pack_into("<I", m.shm.buf, elem + 4, slot + 1)  # next -> itself
    struct.pack_into("<I", m.shm.buf, elem + 8, 0)  # and a hash no key has here
    started = time.monotonic()
    with pytest.raises(Contended):
        r.lookup(u32(1))
    struct.pack_into("<I", m.shm.buf, elem + 4, 1 << 31)  # next -> far past the table
    with pytest.raises(Contended):
        r.lookup(u32(1))
    assert time.monotonic() - started < 1


def test_garbage_anywhere_gives_bytes_none_or_contended_never_a_crash() -> None:
    rng = random.Random(7)
    m, r = hash_map(max_entries=16, value_size=16)
    for i in range(12):
        m.update(u32(i), rng.randbytes(16))
    buf = m.shm.buf
    for _ in range(300):
        for _ in range(rng.randrange(1, 20)):
            at = rng.randrange(len(buf) - 4)
            struct.pack_into("<I", buf, at, rng.choice([0, 1, 2, 0xFFFFFFFF, rng.getrandbits(32)]))
        for key in (u32(rng.randrange(16)) for _ in range(5)):
            try:
                value = r.lookup(key)
            except Contended:
                continue
            assert value is None or len(value) == 16
        try:
            for key, value in r.items():
                assert len(key) == 4 and len(value) == 16
        except Contended:
            pass


def test_the_header_describes_the_table() -> None:
    m, _ = hash_map(max_entries=100, value_size=24)
    magic, version, n_buckets, max_entries, key, value, elem, count = \
        struct.unpack_from("<4s7I", m.shm.buf)
    assert (magic, version, n_buckets, max_entries, key, value, count) == \
        (b"BPFH", 1, 128, 100, 4, 24, 0)
    assert elem == ELEM_HEADER.size + 8 + 24
    assert m.layout.elems_offset >= HEADER_SIZE + BUCKET.size * 128


def test_updates_from_another_process_are_never_seen_torn() -> None:
    """A writer process replaces a value of 4 KiB (long enough for a copy to overlap the
    write) and inserts and deletes keys in the same table, while this one reads: each value
    read is all one byte, or the read says Contended."""
    m, r = hash_map(max_entries=64, value_size=4096)
    key = u32(1)
    m.update(key, bytes([0]) * 4096)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the writer
        try:
            n = 0
            while True:
                n += 1
                m.update(key, bytes([n & 0xFF]) * 4096)
                m.update(u32(1000 + n % 50), bytes(4096))
                if n % 3 == 0:
                    m.delete(u32(1000 + (n - 1) % 50))  # the one inserted just before
        finally:
            os._exit(0)
    seen, contended, deadline = set(), 0, time.monotonic() + 2
    try:
        while time.monotonic() < deadline:
            try:
                value = r.lookup(key)
            except Contended:
                contended += 1
                continue
            assert value is not None and value == value[:1] * 4096, "a torn value was read"
            seen.add(value[0])
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert len(seen) > 10, "the writer did not get to run"


def test_a_read_only_mapping_of_map_memory_cannot_be_made_writable() -> None:
    m, _ = hash_map()
    fd = m.shm.reader_fd(writable=False)
    try:
        with pytest.raises(PermissionError):
            mmap.mmap(fd, m.shm.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        again = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)  # root may reopen it...
        try:
            with pytest.raises(PermissionError):  # ...but F_SEAL_FUTURE_WRITE holds
                mmap.mmap(again, m.shm.size, mmap.MAP_SHARED, mmap.PROT_WRITE)
            with pytest.raises(PermissionError):
                os.pwrite(again, b"x", 0)
            with pytest.raises(PermissionError):
                os.ftruncate(again, 0)  # F_SEAL_SHRINK
        finally:
            os.close(again)
    finally:
        os.close(fd)
    with pytest.raises(BpfError):
        m.shm.reader_fd(writable=True)


def test_a_freed_writable_arrays_memory_reads_zeros_where_it_was_kept() -> None:
    """Memory others may write is punched out at the free: a process that kept a mapping
    pins none of the daemon's pages."""
    a = create_map(MapType.ARRAY, 4, 8, 4, BPF_F_MMAPABLE, "a")
    a.update(u32(1), b"A" * 8)
    fd = a.shm.reader_fd(writable=True)
    kept = mmap.mmap(fd, a.shm.size, mmap.MAP_SHARED, mmap.PROT_READ)
    os.close(fd)
    a.free()
    assert kept[:] == bytes(len(kept))
    kept.close()


def test_a_walk_stops_at_the_slots_ever_used() -> None:
    """A reader's walk reads no further than the header's `used` (the daemon's high-water
    slot), bounded by max_entries whatever the header says."""
    m, r = hash_map(max_entries=200_000)
    m.update(u32(1), b"A" * 8)
    started = time.perf_counter()
    for _ in range(100):
        assert r.next_key(None) == u32(1) and r.next_key(u32(1)) is None
    assert time.perf_counter() - started < 0.5  # not 100 scans of 200,000 slots
    struct.pack_into("<I", m.shm.buf, 32, 0xFFFFFFFF)  # garbage: max_entries bounds it
    assert dict(r.items()) == {u32(1): b"A" * 8}
