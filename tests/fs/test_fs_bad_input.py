"""Bad input on the mount: odd names, long names and paths, deep trees, races from many
processes, a mount worker killed with SIGKILL, unmounting while busy; and what `cat` shows.
Nothing of it may crash the daemon (the fixture checks its log) or lose an object."""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import subprocess
from pathlib import Path

import pytest
from fs_helpers import errno_of, new_map, pin_new_map, wait_for

from bpffs.client import Client

pytestmark = pytest.mark.fuse


@pytest.mark.parametrize("name,expected", [
    (b"with.dot", errno.EPERM), (b"a" * 256, errno.ENAMETOOLONG), (b"..", errno.EEXIST),
    (b".", errno.EEXIST),
])
def test_bad_names_for_mkdir_and_pin(bpf_dir: Path, client, name: bytes, expected: int) -> None:
    path = os.fsencode(bpf_dir) + b"/" + name
    assert errno_of(lambda: os.mkdir(path)) == expected
    fd = new_map(client)
    try:
        assert errno_of(lambda: client.obj_pin(fd, path)) == expected
    finally:
        os.close(fd)


def test_longest_names_and_non_utf8_names_work(bpf_dir: Path, client) -> None:
    longest = os.fsencode(bpf_dir) + b"/" + b"n" * 255
    odd = os.fsencode(bpf_dir) + b"/caf\xe9-\xff"
    for path in (longest, odd):
        fd = new_map(client)
        client.obj_pin(fd, path)
        os.close(fd)
        os.close(client.obj_get(path))
    assert sorted(os.listdir(os.fsencode(bpf_dir))) == sorted([b"n" * 255, b"caf\xe9-\xff"])


def test_a_deep_tree_and_a_path_past_path_max(bpf_dir: Path, client) -> None:
    path = bpf_dir
    for depth in range(60):
        path = path / f"d{depth}"
        path.mkdir()
    pin_new_map(client, path / "deep")
    os.close(client.obj_get(str(path / "deep")))
    too_long = "/".join(["x" * 200] * 25)  # 5,000 bytes: ENAMETOOLONG from the kernel
    assert errno_of(lambda: client.obj_get(str(bpf_dir / too_long))) == errno.ENAMETOOLONG
    subprocess.run(["rm", "-r", str(bpf_dir / "d0")], check=True)
    assert os.listdir(bpf_dir) == []


def _race(socket_path: str, directory: str, worker: int, rounds: int) -> None:
    with Client(socket_path) as client:
        fd = client.map_create(1, 4, 4, 1)
        for n in range(rounds):
            name = f"{directory}/p{n % 4}"
            ops = (lambda: client.obj_pin(fd, name), lambda: os.unlink(name),  # noqa: B023
                   lambda: os.rename(name, f"{directory}/r{worker}"),  # noqa: B023
                   lambda: os.close(client.obj_get(name)))  # noqa: B023
            for op in ops:
                try:
                    op()
                except OSError as e:
                    assert e.errno in (errno.EEXIST, errno.ENOENT), e
        os.close(fd)


def test_concurrent_pin_unlink_rename_from_many_processes(daemon, bpf_dir: Path,
                                                          client) -> None:
    before = object_ids(client)
    procs = [multiprocessing.Process(target=_race, args=(str(daemon.socket), str(bpf_dir),
                                                         w, 60)) for w in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    left = os.listdir(bpf_dir)
    for name in left:
        os.unlink(bpf_dir / name)
    wait_for(lambda: object_ids(client) == before, "every raced map to be freed")


def object_ids(client) -> list[int]:
    ids, last = [], 0
    while True:
        try:
            last = client.get_next_id("map", last)
        except OSError:
            return ids
        ids.append(last)


def test_a_killed_mount_worker_is_restarted_and_nothing_is_lost(daemon, bpf_dir: Path,
                                                                client) -> None:
    pin_new_map(client, bpf_dir / "kept", entries={b"\1\0\0\0": b"\2\0\0\0\0\0\0\0"})
    workers = subprocess.run(["pgrep", "-f", "bpffs.daemon.fs.worker"], capture_output=True,
                             text=True).stdout.split()
    mine = [pid for pid in workers
            if str(daemon.mount) in Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")]
    assert mine, "no mount worker for the daemon's mount"
    os.kill(int(mine[0]), signal.SIGKILL)
    def served() -> bool:
        try:
            return (bpf_dir / "kept").exists()
        except OSError:  # ENOTCONN until the daemon has mounted again
            return False

    wait_for(served, "the mount to be served again", timeout=30)
    fd = client.obj_get(str(bpf_dir / "kept"))
    assert client.map_lookup_elem(fd, b"\1\0\0\0") == b"\2\0\0\0\0\0\0\0"
    os.close(fd)


def test_changes_right_after_an_external_unmount_do_not_hurt_the_daemon(start_daemon,
                                                                          tmp_path: Path
                                                                          ) -> None:
    """`umount -l` of a second mount, then at once a pin whose cache invalidation goes to that
    mount's exiting worker (it used to kill the daemon with EPIPE)."""
    d = start_daemon(mount=True)
    second = tmp_path / "second"
    second.mkdir()
    with d.client() as c:
        subprocess.run(["bpffs", "mount", str(second)], env=d.env, check=True,
                       capture_output=True)
        subprocess.run(["umount", "-l", str(second)], check=True)
        for n in range(20):
            pin_new_map(c, d.mount / f"m{n}")
        assert sorted(os.listdir(d.mount)) == sorted(f"m{n}" for n in range(20))
    assert d.stop() == 0, d.log_text()


def test_cat_of_a_pinned_map_shows_its_elements(bpf_dir: Path, client) -> None:
    pin_new_map(client, bpf_dir / "m", entries={b"\1\0\0\0": b"\x2a" + bytes(7)})
    text = (bpf_dir / "m").read_text()
    assert text.splitlines()[0].startswith("# hash map id ")
    assert "01 00 00 00: 2a 00 00 00 00 00 00 00" in text.splitlines()


def test_a_busy_mount_is_detached_lazily_on_daemon_stop(start_daemon) -> None:
    d = start_daemon(mount=True)
    with d.client() as c:
        pin_new_map(c, d.mount / "m")
    holder = os.open(d.mount / "m", os.O_PATH)  # keeps the mount busy across the stop
    try:
        assert d.stop() == 0
        wait_for(lambda: not os.path.ismount(d.mount), "the busy mount to go")
    finally:
        os.close(holder)
