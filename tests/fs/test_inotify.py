"""inotify on the mount, compared with the kernel's bpffs (issue 12, filesystem).

A real inotify watch (inotify_init1/inotify_add_watch through ctypes) on a directory of the
mount sees what the same watch on a kernel bpffs (fixture kernel_bpffs) sees, for a pin made
over the control socket (BPF_OBJ_PIN) and for shell operations through the mount.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fs_helpers import worker_of

from bpffs.client import Client
from bpffs.daemon.fs.mount import PIN_THROUGH_MOUNT_TIMEOUT
from bpffs.vm import kernel
from bpffs.vm.uapi import MapType

pytestmark = pytest.mark.fuse

IN_CREATE, IN_DELETE, IN_NONBLOCK, IN_CLOEXEC = 0x100, 0x200, 0o4000, 0o2000000
IN_ISDIR = 0x40000000
EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name
EVENT_WAIT = 2.0  # seconds to wait for an event that should come
_libc = ctypes.CDLL(None, use_errno=True)


class Watch:
    """An inotify watch on one directory, for IN_CREATE and IN_DELETE."""

    def __init__(self, path: Path):
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0 or _libc.inotify_add_watch(self.fd, os.fsencode(path),
                                                  IN_CREATE | IN_DELETE) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def events(self, wait: float = EVENT_WAIT) -> list[tuple[str, str]]:
        """(event, name) pairs read within `wait` seconds of the first (or none)."""
        found: list[tuple[str, str]] = []
        while select.select([self.fd], [], [], wait)[0]:
            data = os.read(self.fd, 65536)
            offset = 0
            while offset < len(data):
                _wd, mask, _cookie, size = EVENT.unpack_from(data, offset)
                name = data[offset + EVENT.size:offset + EVENT.size + size].rstrip(b"\0")
                kind = "IN_CREATE" if mask & IN_CREATE else "IN_DELETE"
                found.append((kind + ("|IN_ISDIR" if mask & IN_ISDIR else ""), name.decode()))
                offset += EVENT.size + size
            wait = 0.2
        return found

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def watched(bpf_dir: Path) -> Iterator[tuple[Path, Watch]]:
    watch = Watch(bpf_dir)
    yield bpf_dir, watch
    watch.close()


def test_a_pin_over_the_control_socket_fires_in_create(watched, client: Client) -> None:
    """issue 12, filesystem: a pin made with BPF_OBJ_PIN fired no inotify event (the tree
    changed in the daemon; FUSE's entry notifications fire none). The mount worker now
    creates the pin through the mount itself, so the kernel reports IN_CREATE, as bpffs."""
    path, watch = watched
    fd = client.map_create(MapType.HASH, 4, 4, 1)
    client.obj_pin(fd, str(path / "pinned"))
    assert watch.events() == [("IN_CREATE", "pinned")]
    assert os.stat(path / "pinned").st_mode & 0o777 == 0o600
    os.unlink(path / "pinned")
    assert watch.events() == [("IN_DELETE", "pinned")]


def test_pins_keep_their_errnos_through_the_mount(watched, client: Client) -> None:
    """issue 12, filesystem: making pins through the mount changes none of obj_pin's answers:
    EEXIST onto an existing name (no event), EPERM for a dotted name, and no regular file
    can be made with mknod or touch."""
    path, watch = watched
    fd = client.map_create(MapType.HASH, 4, 4, 1)
    client.obj_pin(fd, str(path / "p"))
    with pytest.raises(OSError) as exists:
        client.obj_pin(fd, str(path / "p"))
    with pytest.raises(OSError) as dotted:
        client.obj_pin(fd, str(path / "a.b"))
    with pytest.raises(OSError) as made:
        os.mknod(path / "plain", 0o600)
    assert (exists.value.errno, dotted.value.errno, made.value.errno) == (
        errno.EEXIST, errno.EPERM, errno.EACCES)
    assert watch.events() == [("IN_CREATE", "p")]


@pytest.mark.kernel
def test_the_same_events_as_the_kernels_bpffs(watched, client: Client,
                                              kernel_bpffs: Path) -> None:
    """issue 12, filesystem: the oracle. The same pin, mkdir, rmdir and unlink on a kernel
    bpffs (the pin through bpf(2)) and on our mount give the same inotify events."""
    path, watch = watched
    oracle = Watch(kernel_bpffs)
    try:
        kfd = kernel.map_create(MapType.HASH, 4, 4, 1)
        fd = client.map_create(MapType.HASH, 4, 4, 1)
        for root, pin in ((kernel_bpffs, lambda p: kernel.obj_pin(kfd, str(p))),
                          (path, lambda p: client.obj_pin(fd, str(p)))):
            pin(root / "m")
            (root / "d").mkdir()
            (root / "d").rmdir()
            os.unlink(root / "m")
        os.close(kfd)
        expected = oracle.events()
    finally:
        oracle.close()
    assert expected == [("IN_CREATE", "m"), ("IN_CREATE|IN_ISDIR", "d"),
                        ("IN_DELETE|IN_ISDIR", "d"), ("IN_DELETE", "m")]
    assert watch.events() == expected


def test_a_pin_is_made_even_when_the_mount_cannot(start_daemon) -> None:
    """issue 12, filesystem: the route through the mount is for inotify only. With the mount
    worker stopped (SIGSTOP), obj_pin still pins, after PIN_THROUGH_MOUNT_TIMEOUT, without
    the event; the worker's late mknod is then refused and changes nothing."""
    d = start_daemon(mount=True)
    assert d.mount is not None
    worker = worker_of(d.mount)
    with d.client() as c:
        fd = c.map_create(MapType.HASH, 4, 4, 1)
        os.kill(worker, signal.SIGSTOP)
        try:
            start = time.monotonic()
            c.obj_pin(fd, str(d.mount / "m"))
            took = time.monotonic() - start
        finally:
            os.kill(worker, signal.SIGCONT)
        assert PIN_THROUGH_MOUNT_TIMEOUT <= took < PIN_THROUGH_MOUNT_TIMEOUT + 5
        assert os.listdir(d.mount) == ["m"]
        got = c.obj_get(str(d.mount / "m"))
        assert c.obj_get_info_by_fd(got)["id"] == c.obj_get_info_by_fd(fd)["id"]
        os.close(got)
        c.obj_pin(fd, str(d.mount / "again"))  # the worker serves pins again
        assert sorted(os.listdir(d.mount)) == ["again", "m"]
