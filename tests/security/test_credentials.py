"""Adversarial: the caller's credentials and limits are those it had when it connected.

The daemon used to read RLIMIT_MEMLOCK and the supplementary groups from /proc/PID of the
process that connected, at each request. That process may be gone by then: connect in a child
that exits, use the socket in the parent. The daemon then fell back to its own memlock limit
(unlimited under the shipped systemd unit) and to no groups. Now all of it is captured at
accept time (SO_PEERGROUPS, SO_PEERPIDFD where the kernel has it) and kept on the Peer; a
non-root caller whose process is already gone when the daemon accepts is refused with EPERM.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import socket
import threading
from pathlib import Path

import pytest
from helpers import NOBODY, become, in_child

from bpffs import protocol
from bpffs.daemon.peer import Peer
from bpffs.vm.uapi import MapType

MEMLOCK = 64 * 1024  # the attacker's RLIMIT_MEMLOCK (soft = hard, as an admin would set it)


def _connect_in_child(path: str) -> socket.socket:
    """A connection made by a child process that has exited (and been reaped) since."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            s.connect(path)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return s


def _call(s: socket.socket, inbox: protocol.Inbox, *msg: object) -> list:
    try:
        protocol.send_message(s, protocol.pack(list(msg)))
    except OSError:
        pass  # refused and closed already: the refusal is waiting to be read
    try:
        data, fds = protocol.recv_message(s, inbox)
    except ConnectionResetError:  # it hung up with our request unread: reported first,
        data, fds = protocol.recv_message(s, inbox)  # then what it sent before
    protocol.close_all(fds)
    return protocol.unpack(data) if data else [errno.ECONNRESET, "hung up"]


def _big_map_via_dead_connector(path: str, ready_fd: int | None, go_fd: int | None
                                ) -> tuple[list, list]:
    """As uid 65534 with a 64 KiB RLIMIT_MEMLOCK: connect in a child that exits, then
    create a 1 MiB array map over that connection. Returns (hello reply, map_create
    reply)."""
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (MEMLOCK, MEMLOCK))
    s = _connect_in_child(path)
    if ready_fd is not None and go_fd is not None:
        os.write(ready_fd, b"x")  # connected, and the connector is reaped
        os.read(go_fd, 1)  # the daemon runs again
    s.settimeout(10)
    inbox = protocol.Inbox()
    hello = _call(s, inbox, "hello", protocol.PROTOCOL_VERSION, "attacker")
    if hello[0]:
        return hello[:2], []
    created = _call(s, inbox, "map_create", MapType.ARRAY, 4, 4096, 256, 0, "x")
    return hello[:2], created[:2]


def test_memlock_is_not_escaped_by_connecting_from_a_dead_child(public_root: Path,
                                                               start_daemon) -> None:
    """red-team review, finding 2: a process with a 64 KiB RLIMIT_MEMLOCK connects in a
    child that exits and uses the socket itself; the daemon read the limit of the gone
    process at each map_create, fell back to its own (unlimited under systemd) and let it
    lock 1 MiB maps until --memory-limit was full. Now the limit is the connector's, read at
    accept (64 KiB here), or, if the daemon could not read it, the connection is refused:
    either way EPERM, and no map."""
    daemon = start_daemon(root=public_root / "d")
    hello, created = in_child(_big_map_via_dead_connector, str(daemon.socket), None, None,
                              user=NOBODY)
    assert hello[0] == errno.EPERM or created[0] == errno.EPERM, (hello, created)


def test_a_connection_whose_connector_is_gone_at_accept_is_refused(public_root: Path,
                                                                  start_daemon) -> None:
    """red-team review, finding 2 (made deterministic): the daemon is stopped while the
    child connects and exits, so it accepts a connection whose process no longer exists. It
    used to serve it with its own memlock limit; now the hello is answered EPERM, saying
    why, and the connection is closed."""
    daemon = start_daemon(root=public_root / "d")
    assert daemon.proc is not None
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()

    def resume_daemon() -> None:
        os.read(ready_r, 1)
        os.kill(daemon.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        os.write(go_w, b"x")

    resumer = threading.Thread(target=resume_daemon, daemon=True)
    resumer.start()
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        hello, created = in_child(_big_map_via_dead_connector, str(daemon.socket), ready_w,
                                  go_r, user=NOBODY)
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
        resumer.join(10)
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)
    assert hello[0] == errno.EPERM, (hello, created)
    assert "cannot read the limits of the process that connected" in hello[1], hello
    # root is not refused, and the daemon still serves others
    s = _connect_in_child(str(daemon.socket))
    with s:
        s.settimeout(10)
        inbox = protocol.Inbox()
        assert _call(s, inbox, "hello", protocol.PROTOCOL_VERSION, "root")[0] == 0
        assert _call(s, inbox, "map_create", MapType.ARRAY, 4, 4, 1, 0, "r")[0] == 0


def test_the_peer_is_captured_at_accept_and_kept(public_root: Path) -> None:
    """red-team review, finding 2 (groups and mount namespace): Peer.groups() read
    /proc/PID/status at each use, empty once the connector had exited, and the mount check
    read /proc/PID/ns/mnt the same way. Now groups come from SO_PEERGROUPS and the rest is
    read once, at accept: a connector that exits afterwards changes nothing, and one gone
    before accept is unreadable (EPERM for non-root), never the daemon's own limit."""
    path = str(public_root / "listen.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    os.chmod(path, 0o666)
    listener.listen(4)
    hold_r, hold_w = os.pipe()
    with listener:
        # 1. alive at accept: its limit, groups and namespace; kept after it exits
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the connector
            try:
                os.close(hold_w)
                resource.setrlimit(resource.RLIMIT_MEMLOCK, (MEMLOCK, MEMLOCK))
                become(NOBODY, groups=(4242,))
                c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                c.connect(path)
                os.read(hold_r, 1)
            finally:
                os._exit(0)
        os.close(hold_r)
        conn, _ = listener.accept()
        with conn:
            peer = Peer.of(conn)
            os.close(hold_w)
            os.waitpid(pid, 0)  # gone now: nothing changes
            assert (peer.uid, peer.groups()) == (NOBODY[0], frozenset({4242}))
            assert peer.memlock_limit_pages() == MEMLOCK // 4096
            assert peer.mnt_ns == os.stat("/proc/self/ns/mnt").st_ino
            assert peer.refusal() is None
        # 2. gone before accept: groups still known (from the socket), the limit refused
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the connector
            try:
                become(NOBODY, groups=(4242,))
                socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET).connect(path)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        conn, _ = listener.accept()
        with conn:
            peer = Peer.of(conn)
            assert peer.groups() == frozenset({4242})
            refusal = peer.refusal()
            assert refusal is not None and refusal.errno == errno.EPERM
            with pytest.raises(OSError) as info:
                peer.memlock_limit_pages()
            assert info.value.errno == errno.EPERM


def test_an_honest_caller_keeps_its_limit(public_root: Path, start_daemon) -> None:
    """The connection of a live process is charged its own RLIMIT_MEMLOCK (a 64 KiB caller
    cannot lock 1 MiB) and can lock what fits."""
    daemon = start_daemon(root=public_root / "d")

    def honest(path: str) -> tuple[int, int]:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (MEMLOCK, MEMLOCK))
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(10)
            s.connect(path)
            inbox = protocol.Inbox()
            assert _call(s, inbox, "hello", protocol.PROTOCOL_VERSION, "honest")[0] == 0
            big = _call(s, inbox, "map_create", MapType.ARRAY, 4, 4096, 256, 0, "big")[0]
            small = _call(s, inbox, "map_create", MapType.ARRAY, 4, 8, 1, 0, "small")[0]
            return big, small

    assert in_child(honest, str(daemon.socket), user=NOBODY) == (errno.EPERM, 0)
