"""Map memory shared with clients through a real daemon: reads in place, who may write, and
what a client holding the memory can and cannot do to it."""

from __future__ import annotations

import fcntl
import mmap
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import NOBODY, in_child, raises_errno

from bpffs.client import Client, Map, calls
from bpffs.client.direct import Direct
from bpffs.vm.uapi import BPF_F_MMAPABLE, MapType, ObjFlag

DATA = Path(__file__).parent / "data"


def raw_memory(client: Client, fd: int, writable: bool = False) -> tuple[dict, int]:
    """map_memory as a hostile client sees it: the reply and the memfd itself."""
    def call(session: calls.Session) -> calls.Call:
        handle, _ = yield from calls.bind(session, fd)
        return (yield calls.Request("map_memory", (handle, writable)))
    result, fds = client.run(call(client.session))
    assert len(fds) == 1
    return result, fds[0]


def daemon_fds(daemon) -> int:
    return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))


def test_reads_in_place_see_each_acknowledged_write(client) -> None:
    for map_type in (MapType.HASH, MapType.ARRAY):
        with Map.create(map_type, 4, 8, 16, key=int, value=int, client=client) as m:
            for i in range(16):
                m[i] = i * 7
                assert m[i] == i * 7, "a read right after the reply sees the write"
            assert isinstance(m.direct, Direct), m.direct_reason
            assert dict(m.items()) == {i: i * 7 for i in range(16)}
            assert m.get_next_key(None) in range(16)


def test_another_process_reads_what_this_one_wrote(client) -> None:
    with Map.create(MapType.HASH, 4, 8, 64, key=int, value=int, client=client) as m:
        for i in range(50):
            m[i] = i + 1000

        def read(fd: int) -> dict:
            other = Map(fd, key=int, value=int, client=Client(str(client.path)), owned=False)
            assert other.direct is not None, other.direct_reason
            return dict(other.items())
        assert in_child(read, m.fd) == {i: i + 1000 for i in range(50)}


def test_a_pipelined_read_waits_for_the_writes_started_before_it(client) -> None:
    fd = client.map_create(MapType.HASH, 4, 4, 8)
    try:
        client.map_update_elem(fd, b"k\0\0\0", b"old\0")
        assert client.map_lookup_elem(fd, b"k\0\0\0") == b"old\0"  # now read in place
        started = client.start(calls.map_update_elem(client.session, fd, b"k\0\0\0", b"new\0"))
        assert client.map_lookup_elem(fd, b"k\0\0\0") == b"new\0"
        started()
    finally:
        os.close(fd)


def test_maps_without_memory_and_bpffs_direct_0_say_why(client, daemon) -> None:
    with Map.create(MapType.PROG_ARRAY, 4, 4, 4, client=client) as jumps:
        assert jumps.direct is None and "only array and hash" in jumps.direct_reason
    code = ("import os, sys\nfrom bpffs.client import Client, Map\n"
            "m = Map.create(1, 4, 4, 4, client=Client(sys.argv[1]))\n"
            "m[b'abcd'] = b'wxyz'; assert m[b'abcd'] == b'wxyz'\nprint(m.direct_reason)\n")
    out = subprocess.run([sys.executable, "-c", code, str(daemon.socket)], text=True,
                         capture_output=True, env={**os.environ, "BPFFS_DIRECT": "0"},
                         check=True).stdout
    assert out.strip() == "BPFFS_DIRECT=0 is set"


def test_a_clients_hash_memory_is_read_only_whatever_it_tries(client) -> None:
    fd = client.map_create(MapType.HASH, 4, 8, 16)
    client.map_update_elem(fd, b"abcd", b"12345678")
    result, memfd = raw_memory(client, fd)
    try:
        assert result == {"size": result["size"], "writable": False}
        with pytest.raises(PermissionError):
            mmap.mmap(memfd, result["size"], mmap.MAP_SHARED, mmap.PROT_WRITE)
        with raises_errno(9):  # EBADF: not open for writing
            os.write(memfd, b"x")

        def reopen(path: str) -> int:
            return os.open(path, os.O_RDWR)
        with raises_errno(13):  # EACCES: another user cannot reopen it for writing
            in_child(reopen, f"/proc/self/fd/{memfd}", user=(1000, 1000))
        again = os.open(f"/proc/self/fd/{memfd}", os.O_RDWR)  # root can, but it is sealed:
        try:
            with pytest.raises(PermissionError):
                mmap.mmap(again, result["size"], mmap.MAP_SHARED, mmap.PROT_WRITE)
            with pytest.raises(PermissionError):
                os.pwrite(again, b"garbage", 64)
            with pytest.raises(PermissionError):
                os.ftruncate(again, 0)
            with pytest.raises(PermissionError):
                fcntl.fcntl(again, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        finally:
            os.close(again)
        assert client.map_lookup_elem(fd, b"abcd") == b"12345678"
    finally:
        os.close(memfd)
        os.close(fd)


def test_only_a_bpf_f_mmapable_array_is_writable_in_place(client) -> None:
    for map_type, flags in ((MapType.HASH, 0), (MapType.ARRAY, 0)):
        fd = client.map_create(map_type, 4, 8, 4, flags)
        try:
            with raises_errno(22):  # EINVAL, as the kernel's mmap of an array without the flag
                raw_memory(client, fd, writable=True)
        finally:
            os.close(fd)
    with Map.create(MapType.ARRAY, 4, 8, 4, flags=BPF_F_MMAPABLE, client=client) as a:
        memory = a.memory()
        assert not memory.readonly
        struct.pack_into("<Q", memory, 8 * 2, 0xDEADBEEF)
        assert client.map_lookup_elem(a.fd, struct.pack("<I", 2)) == \
            struct.pack("<Q", 0xDEADBEEF)


def test_garbage_written_everywhere_in_a_writable_array_harms_nothing_else(client, daemon
                                                                           ) -> None:
    other = Map.create(MapType.HASH, 4, 8, 8, key=int, value=int, client=client)
    other[1] = 11
    a = Map.create(MapType.ARRAY, 4, 12, 100, flags=BPF_F_MMAPABLE, client=client)
    _, memfd = raw_memory(client, a.fd, writable=True)
    try:
        memory = mmap.mmap(memfd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        memory[:] = os.urandom(len(memory))
        with pytest.raises(PermissionError):  # the size is sealed: no SIGBUS in the daemon
            os.ftruncate(memfd, 0)
        with pytest.raises(PermissionError):
            os.ftruncate(memfd, len(memory) * 2)
        assert len(dict(a.items())) == 100  # values are data: any bytes are a value
        assert client.map_lookup_elem(a.fd, struct.pack("<I", 99)) == memory[99 * 16:99 * 16 + 12]
        assert other[1] == 11 and client.status()["pid"] == daemon.proc.pid
        memory.close()
    finally:
        os.close(memfd)
        a.close()
        other.close()


def test_the_daemon_lets_go_of_map_memory_when_maps_are_freed(start_daemon) -> None:
    daemon = start_daemon()  # its own: freed maps of other tests change the fd count
    client = daemon.client()
    before = daemon_fds(daemon)
    for i in range(40):
        with Map.create(MapType.HASH if i % 2 else MapType.ARRAY, 4, 8, 64, key=int,
                        value=int, client=client) as m:
            m[1] = 2
            assert m[1] == 2
    deadline = time.monotonic() + 5
    while daemon_fds(daemon) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon_fds(daemon) <= before


@pytest.mark.fuse
def test_a_read_only_fd_gets_read_only_memory(client, bpf_dir) -> None:
    with Map.create(MapType.ARRAY, 4, 8, 4, flags=BPF_F_MMAPABLE, client=client) as a:
        a.pin(str(bpf_dir / "a"))
    fd = client.obj_get(str(bpf_dir / "a"), ObjFlag.RDONLY)
    try:
        with raises_errno(1):  # EPERM: the fd is read-only
            raw_memory(client, fd, writable=True)
        ro = Map(fd, client=client, owned=False)
        assert ro.memory().readonly
    finally:
        os.close(fd)


@pytest.mark.fuse
def test_writes_in_place_are_flushed_and_survive_a_restart(start_daemon) -> None:
    d = start_daemon(mount=True)
    with Map.create(MapType.ARRAY, 4, 8, 4, flags=BPF_F_MMAPABLE, key=int, value=int,
                    client=d.client()) as a:
        a.pin(str(d.mount / "counters"))
        struct.pack_into("<Q", a.memory(), 8, 4242)  # no request: the flush journals it
        time.sleep(0.5)  # the daemon's flush interval is 0.1 s
    d.kill()
    d.start()
    with Map.pinned(str(d.mount / "counters"), key=int, value=int, client=d.client()) as a:
        assert a[1] == 4242


@pytest.mark.fuse
def test_a_state_directory_of_the_previous_release_is_restored(start_daemon, tmp_path) -> None:
    """data/state-644e034 was written by commit 644e034 (maps in Python objects): a snapshot
    and a journal left by a kill -9 (tests/shm/data/README says how it was made)."""
    root = tmp_path / "old"
    root.mkdir()
    shutil.copytree(DATA / "state-644e034", root / "state")
    (root / "state").chmod(0o700)
    d = start_daemon(mount=True, root=root)
    c = d.client()
    with Map.pinned(str(d.mount / "flows"), key=int, value=int, client=c) as flows:
        expected = {i: i * 1000 for i in range(1, 40) if i % 4}
        expected.update({1: 111, 36: 6400})
        del expected[2]
        assert dict(flows.items()) == expected
        assert flows.direct is not None  # restored into shared memory
    with Map.pinned(str(d.mount / "dir" / "counts"), client=c) as counts:
        assert [counts[i] for i in range(8)] == \
            [bytes([i]) * 16 if i != 3 else b"\xff" * 16 for i in range(8)]
    prog = c.obj_get(str(d.mount / "seven"))
    jumps = c.obj_get(str(d.mount / "jumps"))
    try:
        assert c.prog_test_run(prog, bytes(64)).retval == 7
        assert c.obj_get_info_by_fd(jumps)["entries"] == 1
    finally:
        os.close(prog)
        os.close(jumps)


def _maps_until_refused(socket_path: str) -> tuple[int, int, str]:
    fds = []
    with Client(socket_path) as c:
        try:
            while len(fds) < 1000:
                fds.append(c.map_create(MapType.ARRAY, 4, 4, 1))
        except OSError as e:
            return len(fds), e.errno, e.strerror
        finally:
            for fd in fds:
                os.close(fd)
    return len(fds), 0, ""


def test_the_fds_a_maps_memory_holds_are_charged_to_its_creator(public_root, start_daemon
                                                                 ) -> None:
    """Each array or hash map holds two of the daemon's fds: without a charge one user's maps
    could take every fd the daemon has (only memlock, a page a map, would bound them)."""
    d = start_daemon(root=public_root / "d", args=("--max-fds-per-uid", "16"))
    made, err, message = in_child(_maps_until_refused, str(d.socket), user=NOBODY)
    assert (made, err) == (8, 24), (made, err, message)  # EMFILE after 16 / 2 maps
    assert "fds of map memory" in message and "--max-fds-per-uid" in message
    assert in_child(_maps_until_refused, str(d.socket), user=NOBODY)[0] == 8  # given back


def test_a_client_reading_many_maps_holds_no_fd_for_them_and_a_bounded_number_mapped(client
                                                                                      ) -> None:
    """A long-lived reader (the seccomp agent reads every container's maps) must not keep
    an fd or a mapping for each map it ever read."""
    before = len(os.listdir("/proc/self/fd"))
    fds = [client.map_create(MapType.HASH, 4, 4, 4) for _ in range(calls.MAX_MAPPED + 10)]
    try:
        for fd in fds:
            client.map_update_elem(fd, b"abcd", b"wxyz")
            assert client.map_lookup_elem(fd, b"abcd") == b"wxyz"
        assert len(client.session.mapped) == calls.MAX_MAPPED
        assert len(os.listdir("/proc/self/fd")) <= before + len(fds)  # the object fds only
        assert client.map_lookup_elem(fds[0], b"abcd") == b"wxyz"  # let go, mapped again
    finally:
        for fd in fds:
            os.close(fd)
