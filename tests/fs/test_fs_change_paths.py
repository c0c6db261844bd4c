"""The short ways a change takes through the mount (issue 16, control-plane latency), and what
they must not change.

- obj_pin / obj_get resolve their path's fd on the daemon's event loop once its mount is known
  to be ours (its unique mount id): that must never wait on a FUSE server, ours included (a
  stopped worker, whose kernel attributes are stale, must not stall BPF_OBJ_GET);
- the worker answers the kernel's GETATTR of a directory right after its own change from the
  attributes the daemon sent with that change: a change by another route must still show;
- two mounts of one tree: what one changes, the other shows (from a shell).
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fs_helpers import worker_of
from helpers import DaemonProcess

from bpffs.client import Client
from bpffs.vm.uapi import MapType

pytestmark = pytest.mark.fuse


@pytest.fixture
def two_mounts(start_daemon, tmp_path: Path) -> Iterator[tuple[DaemonProcess, Path, Path]]:
    """A daemon's mount A and a second mount B of the same tree (same namespace)."""
    d = start_daemon(mount=True)
    assert d.mount is not None
    second = tmp_path / "second"
    second.mkdir()
    with d.client() as c:
        c.mount(str(second))
    yield d, d.mount, second


def _same_object(c: Client, a: int, b: int) -> bool:
    return c.obj_get_info_by_fd(a)["id"] == c.obj_get_info_by_fd(b)["id"]


@pytest.mark.parametrize("known", [False, True], ids=["first-get", "mount-known"])
def test_obj_get_never_waits_on_a_stopped_worker(two_mounts, known: bool) -> None:
    """The fd of a pin whose attributes the kernel has dropped (a chmod through the other
    mount), while its mount's worker is stopped: stat() of it hangs, BPF_OBJ_GET must not,
    whether the daemon resolves it in a thread (a mount seen for the first time) or on its
    event loop (a mount id it knows: deadlock there would stop the whole daemon)."""
    d, a, b = two_mounts
    with d.client() as c:
        fd = c.map_create(MapType.HASH, 4, 4, 1)
        c.obj_pin(fd, str(a / "m"))
        path_fd = os.open(a / "m", os.O_PATH)
        via_fd = f"/proc/self/fd/{path_fd}"  # opened without a lookup on the mount
        if known:
            os.close(c.obj_get(via_fd))
        os.chmod(b / "m", 0o640)  # the daemon invalidates A's cached attributes of m
        time.sleep(0.3)
        worker = worker_of(a)
        stats: list[os.stat_result] = []
        os.kill(worker, signal.SIGSTOP)
        try:
            stat_thread = threading.Thread(target=lambda: stats.append(os.stat(path_fd)),
                                           daemon=True)
            stat_thread.start()
            stat_thread.join(0.5)
            assert not stats, "stat() of the fd did not need the worker: the test proves nothing"
            start = time.monotonic()
            got = c.obj_get(via_fd)
            took = time.monotonic() - start
        finally:
            os.kill(worker, signal.SIGCONT)
        stat_thread.join(10)
        assert took < 2.0
        assert _same_object(c, got, fd)
        assert stats and stat.S_IMODE(stats[0].st_mode) == 0o640
        os.close(got)
        os.close(path_fd)


def test_pins_and_gets_resolve_through_a_bind_mount(start_daemon, tmp_path: Path) -> None:
    """A bind mount of the mount is another mount (another unique id) of the same FUSE
    superblock: pins and gets through it work the first time (resolved in a thread) and
    after (its id known); after it is unmounted, its path is off bpffs again (EPERM)."""
    d = start_daemon(mount=True)
    assert d.mount is not None
    (d.mount / "d").mkdir()
    bound = tmp_path / "bound"
    bound.mkdir()
    subprocess.run(["mount", "--bind", str(d.mount / "d"), str(bound)], check=True)
    try:
        with d.client() as c:
            fd = c.map_create(MapType.HASH, 4, 4, 1)
            for name in ("one", "two"):
                c.obj_pin(fd, str(bound / name))
                got = c.obj_get(str(bound / name))
                assert _same_object(c, got, fd)
                os.close(got)
            assert sorted(os.listdir(d.mount / "d")) == ["one", "two"]
    finally:
        subprocess.run(["umount", str(bound)], check=True)
    with d.client() as c, pytest.raises(OSError) as off:
        c.obj_pin(c.map_create(MapType.HASH, 4, 4, 1), str(bound / "three"))
    assert off.value.errno == errno.EPERM


def test_directory_attributes_after_a_change_are_the_daemons(two_mounts) -> None:
    """After a change through A the kernel asks A's worker for the directory's attributes,
    which it answers from the change's reply: they are the daemon's (B shows the same), and a
    change by another route since (a chmod through B) is what A shows next."""
    d, a, b = two_mounts
    with d.client() as c:
        fd = c.map_create(MapType.HASH, 4, 4, 1)
        (a / "d").mkdir()
        c.obj_pin(fd, str(a / "d" / "m"))
        c.obj_pin(fd, str(a / "d" / "n"))
    os.unlink(a / "d" / "m")
    after_a, seen_from_b = os.stat(a / "d"), os.stat(b / "d")
    assert (after_a.st_mtime_ns, after_a.st_nlink, after_a.st_mode) == (
        seen_from_b.st_mtime_ns, seen_from_b.st_nlink, seen_from_b.st_mode)
    os.unlink(a / "d" / "n")  # the worker keeps d's attributes from this reply
    os.chmod(b / "d", 0o700)
    deadline = time.monotonic() + 2
    while stat.S_IMODE(os.stat(a / "d").st_mode) != 0o700:
        assert time.monotonic() < deadline, "A still shows d's mode from before B's chmod"
        time.sleep(0.01)
    (a / "d" / "e").mkdir()  # a mkdir's reply carries the parent's new nlink
    assert os.stat(a / "d").st_nlink == os.stat(b / "d").st_nlink == 3


def test_changes_through_one_mount_show_through_the_other_from_a_shell(two_mounts) -> None:
    """Pin over the control socket into A, then `ls` and `stat` through B in the same shell
    command: the new entry is there. `rm` through A, then `stat` through B (which had the
    entry cached): ENOENT. Several times, as a shell script would."""
    d, a, b = two_mounts
    with d.client() as c:
        fd = c.map_create(MapType.HASH, 4, 4, 1)
        for k in range(10):
            name = f"m{k}"
            c.obj_pin(fd, str(a / name))
            shown = subprocess.run(["sh", "-c", f'ls "{b}" && stat -c %a "{b}/{name}"'],
                                   capture_output=True, text=True, check=True).stdout.split()
            assert name in shown and shown[-1] == "600"
            gone = subprocess.run(["sh", "-c", f'rm "{a}/{name}" && stat "{b}/{name}"'],
                                  capture_output=True, text=True)
            assert gone.returncode != 0 and "No such file" in gone.stderr, gone
            assert not (b / name).exists()


def test_a_pin_through_the_mount_is_eexist_when_the_name_appears_meanwhile(
        two_mounts) -> None:
    """The worker answers its own mknod's LOOKUP without asking the daemon (no entry was
    there when the daemon asked it to pin): a directory made through B while A's worker is
    stopped, after the daemon asked, still makes the pin fail with EEXIST, and stays."""
    d, a, b = two_mounts
    worker = worker_of(a)
    errors: list[int] = []

    def pin() -> None:
        with d.client() as c:
            try:
                c.obj_pin(c.map_create(MapType.HASH, 4, 4, 1), str(a / "x"))
                errors.append(0)
            except OSError as e:
                errors.append(e.errno or 0)

    os.kill(worker, signal.SIGSTOP)
    try:
        pinning = threading.Thread(target=pin, daemon=True)
        pinning.start()
        time.sleep(0.3)  # the daemon has checked the name and asked the stopped worker
        (b / "x").mkdir()
    finally:
        os.kill(worker, signal.SIGCONT)
    pinning.join(15)
    assert errors == [errno.EEXIST]
    assert (a / "x").is_dir() and (b / "x").is_dir()
