"""Adversarial: what identifies an object fd (issue 13, findings 1 and 2).

The attacker is uid 65534 in a forked child (helpers.in_child), talking to a real daemon over
its real control socket; the victim's fds are root's, held by this test process. The daemon
lives under a world-searchable directory so that the attacker can reach its socket.
"""

from __future__ import annotations

import errno
import os
import socket
import time

import pytest
from helpers import NOBODY, DaemonProcess, in_child

from bpffs import protocol
from bpffs.client import Client
from bpffs.daemon.fs.worker import CACHE_TIMEOUT
from bpffs.vm.uapi import MapType

SECRET = b"secret!!"
FORGE_BUDGET = 60.0  # seconds the attacker may spend creating files to reach an inode number


def _forge(target: int) -> int | None:
    """Create files in /dev/shm until one has inode number `target` (tmpfs numbers its
    inodes in sequence); its fd, or None when the counter is already past it."""
    path = f"/dev/shm/bpffs-forge-{os.getpid()}"
    deadline = time.monotonic() + FORGE_BUDGET
    while time.monotonic() < deadline:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.unlink(path)
        ino = os.fstat(fd).st_ino
        if ino == target:
            return fd
        os.close(fd)
        if ino > target:
            return None
    return None


def _forge_and_use(socket_path: str, target: int) -> tuple:
    """As the attacker: forge an fd with the victim fd's inode number, bind it, read and
    write through it. Returns ("overshot",) or ("tried", outcome of read, outcome of write)
    where an outcome is ("ok", value) or ("errno", errno)."""
    fd = _forge(target)
    if fd is None:
        return ("overshot",)
    outcomes = []
    with Client(socket_path) as client:
        for call in (lambda: client.map_lookup_elem(fd, bytes(4)),
                     lambda: client.map_update_elem(fd, bytes(4), b"pwned!!!")):
            try:
                outcomes.append(("ok", call()))
            except OSError as e:
                outcomes.append(("errno", e.errno))
    os.close(fd)
    return ("tried", *outcomes)


def test_a_forged_inode_number_takes_over_no_object_fd(public_daemon: DaemonProcess) -> None:
    """issue 13, finding 1: a /dev/shm file with the inode number of root's object fd socket,
    sent with `bind`, was taken for that fd: uid 65534 read and overwrote root's map. The fd
    is now recognised by its socket cookie: a non-socket is EINVAL and nothing is read."""
    with public_daemon.client() as root:
        for _attempt in range(3):  # someone else's /dev/shm files may overtake the counter
            victim = root.map_create(MapType.ARRAY, 4, 8, 1)
            root.map_update_elem(victim, bytes(4), SECRET)
            outcome = in_child(_forge_and_use, str(public_daemon.socket),
                               os.fstat(victim).st_ino, user=NOBODY)
            try:
                if outcome[0] == "tried":
                    assert outcome[1] == ("errno", errno.EINVAL), f"read through a forged fd:" \
                        f" {outcome[1]}"
                    assert outcome[2] == ("errno", errno.EINVAL), f"wrote through a forged fd:" \
                        f" {outcome[2]}"
                    assert root.map_lookup_elem(victim, bytes(4)) == SECRET
                    return
            finally:
                os.close(victim)
    pytest.skip("could not reach the victim's inode number in /dev/shm")


def test_an_unrelated_socket_with_any_inode_is_ebadf(public_daemon: DaemonProcess) -> None:
    """issue 13, finding 1: a socket the daemon never handed out is EBADF, whatever its
    number; an O_PATH fd of a real object fd is no object fd either (EBADF, as the kernel's
    fdget of an O_PATH fd)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with public_daemon.client() as c:
        fd = c.map_create(MapType.ARRAY, 4, 8, 1)
        path_fd = os.open(f"/proc/self/fd/{fd}", os.O_PATH)
        try:
            for bogus in (a.fileno(), path_fd):
                with public_daemon.client() as other, pytest.raises(OSError) as info:
                    other.map_lookup_elem(bogus, bytes(4))  # a new connection: not yet bound
                assert info.value.errno == errno.EBADF, info.value
            assert c.map_lookup_elem(fd, bytes(4)) == bytes(8)  # the real one still works
        finally:
            protocol.close_all([fd, path_fd])
            a.close()
            b.close()


class Raw:
    """A greeted control connection driven by hand (no client-side fstat of what it sends)."""

    def __init__(self, daemon: DaemonProcess, timeout: float):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(timeout)
        self.sock.connect(str(daemon.socket))
        self.inbox = protocol.Inbox()
        assert self.request("hello", protocol.PROTOCOL_VERSION, "raw")[0] == 0

    def request(self, *msg: object, fds: tuple[int, ...] = ()) -> list:
        self.sock.sendmsg([protocol.pack(list(msg))], protocol.encode_fds(list(fds)))
        reply, fds_back = protocol.recv_message(self.sock, self.inbox)
        protocol.close_all(fds_back)
        return protocol.unpack(reply)


@pytest.mark.fuse
@pytest.mark.slow
def test_fds_on_our_own_mount_sent_to_the_daemon_cannot_deadlock_it(
        public_daemon: DaemonProcess) -> None:
    """issue 13, finding 2: `bind` fstat'ed the fd sent on the event loop. An O_PATH fd on the
    daemon's own mount, once its cached attributes expire, turns that fstat into a FUSE
    GETATTR to our own worker, which waits for the daemon: every client hung for good.
    getsockopt never reaches a filesystem: the bind fails at once and others are served.
    The other requests that take an fd (obj_get, obj_pin, mount) are tried the same way."""
    assert public_daemon.mount is not None
    pin = public_daemon.mount / "pin"
    with public_daemon.client() as c:
        fd = c.map_create(MapType.ARRAY, 4, 8, 1)
        c.obj_pin(fd, str(pin))
    probe = Raw(public_daemon, timeout=1.0)
    handle = probe.request("bind", fds=(fd,))[1]["handle"]
    pin_path = os.open(pin, os.O_PATH)
    dir_path = os.open(public_daemon.mount, os.O_PATH | os.O_DIRECTORY)
    pin_open = os.open(pin, os.O_RDONLY)
    attacks = [(("bind",), pin_path, errno.EBADF), (("bind",), dir_path, errno.EBADF),
               (("bind",), pin_open, errno.EINVAL),
               (("mount", os.fsencode(public_daemon.root), None, {}), pin_open, errno.EINVAL),
               (("obj_pin", handle, b"again", 0o022), dir_path, 0),
               (("obj_get", 0), pin_path, 0)]
    time.sleep(CACHE_TIMEOUT + 1)  # the kernel's cached attributes of all three have expired
    try:
        attacker = Raw(public_daemon, timeout=5.0)
        attacker.request("bind", fds=(fd,))  # obj_pin names the map by its handle
        for request, sent, expected in attacks:
            reply = attacker.request(*request, fds=(sent,))
            assert reply[0] == expected, (request, reply)
            started = time.monotonic()
            assert probe.request("map_lookup", handle, bytes(4)) == [0, bytes(8)]
            assert time.monotonic() - started < 1.0
    finally:
        protocol.close_all([fd, pin_path, dir_path, pin_open])
