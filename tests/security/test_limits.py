"""Adversarial: one user must not use up the daemon's fds (issue 13, finding 4).

Each attack runs as uid 65534 in a forked child that keeps what it made (connections, object
fds) until the test releases it, against a real daemon started with small limits. While the
attacker holds on, root must still be served; once it is gone, the daemon's own fd count
(/proc/PID/fd) is back where it started.
"""

from __future__ import annotations

import errno
import os
import pickle
import resource
import socket
import struct
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from attack import daemon_fds, under_probe
from helpers import NOBODY, DaemonProcess, become, in_child

from bpffs import protocol
from bpffs.client import Client
from bpffs.daemon.syscall import MAP_MEMORY_FDS
from bpffs.vm.uapi import MapType

_LEN = struct.Struct("=I")


def settled_fds(daemon: DaemonProcess) -> int:
    """The daemon's fd count once it has served root once (files it opens on first use, such
    as its journal, are open then)."""
    root_can_still_work(daemon)
    time.sleep(0.2)
    return daemon_fds(daemon)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


class Attacker:
    """A generator run as uid 65534 in a forked child: each value it yields is reported with
    step(), and the child waits there (holding every fd it has) until the next step() or
    release()."""

    def __init__(self, fn: Callable[..., Iterator[Any]], *args: Any):
        self._reports, report_w = os.pipe()
        go_r, self._go = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the attacker
            code = 0
            try:
                os.close(self._reports)
                os.close(self._go)
                become(NOBODY)
                for value in fn(*args):
                    data = pickle.dumps(value)
                    os.write(report_w, _LEN.pack(len(data)) + data)
                    if not os.read(go_r, 1):
                        break
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        os.close(report_w)
        os.close(go_r)
        self._started = False

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = os.read(self._reports, n - len(data))
            assert chunk, "the attacker failed (see its traceback above)"
            data += chunk
        return data

    def step(self) -> Any:
        if self._started:
            os.write(self._go, b"x")
        self._started = True
        return pickle.loads(self._read(_LEN.unpack(self._read(_LEN.size))[0]))

    def release(self) -> None:
        """Let the attacker exit (its fds close with it)."""
        os.close(self._go)
        os.close(self._reports)
        os.waitpid(self.pid, 0)


def root_can_still_work(daemon: DaemonProcess) -> None:
    with Client(str(daemon.socket)) as root:
        fd = root.map_create(MapType.HASH, 4, 4, 1)
        root.map_update_elem(fd, bytes(4), b"root")
        assert root.map_lookup_elem(fd, bytes(4)) == b"root"
        os.close(fd)


# -- object fds ---------------------------------------------------------------------------------
FD_LIMIT = 64


def _hoard_obj_gets(socket_path: str, pin: str) -> Iterator[tuple[int, int | None, str]]:
    """obj_get of our own pin, again and again, keeping every fd."""
    held: list[int] = []
    failure: tuple[int | None, str] = (None, "")
    with Client(socket_path) as client:
        fd = client.map_create(MapType.HASH, 4, 4, 1)
        client.obj_pin(fd, pin)
        held.append(fd)
        for _ in range(FD_LIMIT * 2):
            try:
                held.append(client.obj_get(pin))
            except OSError as e:
                failure = (e.errno, e.strerror or "")
                break
    yield (len(held), *failure)


@pytest.mark.fuse
def test_obj_get_of_ones_own_pin_is_charged_to_the_caller(public_root: Path,
                                                          start_daemon) -> None:
    """issue 13, finding 4 (obj_get route): repeated obj_get of one's own pin made object fds
    charged to nobody, until the daemon's 20,000 fds were gone and root's map_create failed
    with EMFILE. Now each is charged to the caller's uid: EMFILE at --max-fds-per-uid."""
    daemon = start_daemon(mount=True, root=public_root / "d",
                          args=("--max-fds-per-uid", str(FD_LIMIT)))
    assert daemon.mount is not None
    baseline = settled_fds(daemon)
    attacker = Attacker(_hoard_obj_gets, str(daemon.socket), str(daemon.mount / "hoard"))
    try:
        held, err, message = attacker.step()
        assert (held, err) == (FD_LIMIT, errno.EMFILE), (held, err, message)
        assert "uid 65534" in message and "--max-fds-per-uid" in message, message
        root_can_still_work(daemon)
        with Client(str(daemon.socket)) as root:  # root itself is never refused
            fds = [root.map_create(MapType.HASH, 4, 4, 1) for _ in range(FD_LIMIT + 8)]
            protocol.close_all(fds)
    finally:
        attacker.release()
    # (the pinned map stays, with its memory's fds)
    wait_until(lambda: daemon_fds(daemon) <= baseline + MAP_MEMORY_FDS,
               "the daemon's fds are back to baseline")


# -- connections that never say hello -------------------------------------------------------------
CONN_LIMIT = 16
HELLO_TIMEOUT = 2.0


def _idle_connections(socket_path: str, count: int) -> Iterator[Any]:
    """Connect `count` times and never say hello. Reports the errnos of the refusals, then
    (at the next step) how many connections the daemon has closed."""
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(socket_path)
        socks.append(s)
    time.sleep(1.0)  # HELLO_TIMEOUT is longer: only refusals have arrived
    refusals = []
    for s in socks:
        try:
            reply = s.recv(protocol.INLINE_MAX, socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        if reply:
            refusals.append(protocol.unpack(reply)[0])
    yield refusals
    closed = 0
    for s in socks:
        s.settimeout(10)
        try:
            while s.recv(protocol.INLINE_MAX):
                pass  # a refusal read above, or nothing
            closed += 1
        except OSError:
            closed += 1
    yield closed


def test_idle_connections_are_limited_and_time_out(public_root: Path, start_daemon) -> None:
    """issue 13, finding 4 (idle route): 20k connections that never said hello used up the
    daemon's fds and new clients timed out. Now a uid holds at most
    --max-connections-per-uid (the rest are refused with EAGAIN and closed) and a connection
    without a hello is closed after --hello-timeout."""
    daemon = start_daemon(root=public_root / "d", args=(
        "--max-connections-per-uid", str(CONN_LIMIT), "--hello-timeout", str(HELLO_TIMEOUT)))
    baseline = settled_fds(daemon)
    attacker = Attacker(_idle_connections, str(daemon.socket), CONN_LIMIT * 3)
    try:
        refusals = attacker.step()
        assert refusals == [errno.EAGAIN] * (CONN_LIMIT * 2), refusals
        assert daemon_fds(daemon) <= baseline + CONN_LIMIT
        root_can_still_work(daemon)
        assert attacker.step() == CONN_LIMIT * 3, "idle connections were not closed"
        wait_until(lambda: daemon_fds(daemon) <= baseline, "the idle connections are closed")
        root_can_still_work(daemon)
    finally:
        attacker.release()
    wait_until(lambda: daemon_fds(daemon) <= baseline, "the daemon's fds are back to baseline")


FLOOD = 15_000


def _flood(socket_path: str) -> int:
    """FLOOD connections at once, kept open until the process exits."""
    socks = []
    for _ in range(FLOOD):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(socket_path)
        socks.append(s)
    return len(socks)


def test_a_flood_of_connections_does_not_stall_other_clients(public_root: Path,
                                                             start_daemon) -> None:
    """issue 13, finding 4 (idle route), measured by bench/attacks.py: with the limit in
    place, 19,000 connections from one user (15,000 here: 0.6 s) still stalled other clients
    for 0.5 s, as the daemon accepted a whole backlog and read /proc for each before anyone
    else ran. Now the limit is checked from SO_PEERCRED alone at accept, one accept per pass
    of the run loop."""
    daemon = start_daemon(root=public_root / "d",
                          args=("--max-connections-per-uid", str(CONN_LIMIT)))
    made = under_probe(daemon, lambda: in_child(_flood, str(daemon.socket), user=NOBODY),
                       f"{FLOOD} connections at once")
    assert made == FLOOD
    root_can_still_work(daemon)


# -- requests parked with fds attached ------------------------------------------------------------
PARKERS = 16


def _park_with_fds(socket_path: str) -> Iterator[list[int]]:
    """PARKERS connections, each sending trace_read (which waits) with FDS_MAX fds attached,
    never reading the reply."""
    null = os.open("/dev/null", os.O_RDONLY)
    socks = []
    for _ in range(PARKERS):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(socket_path)
        s.send(protocol.pack(["hello", protocol.PROTOCOL_VERSION, "parker"]))
        s.recv(protocol.INLINE_MAX)
        s.sendmsg([protocol.pack(["trace_read", 0])],
                  protocol.encode_fds([null] * protocol.FDS_MAX))
        socks.append(s)
    yield []


def test_fds_sent_with_a_request_are_not_kept_while_it_waits(public_root: Path,
                                                             start_daemon) -> None:
    """issue 13, finding 4 (parked route): 86 connections, each parked on a request with 253
    fds attached, held the daemon's 20,000 fds. Now fds an operation does not take are
    closed on arrival, trace_read is root's only (finding 8), and the rest are closed as soon
    as the request is served or refused."""
    daemon = start_daemon(root=public_root / "d")
    baseline = settled_fds(daemon)
    attacker = Attacker(_park_with_fds, str(daemon.socket))
    try:
        attacker.step()
        time.sleep(0.5)
        assert daemon_fds(daemon) <= baseline + PARKERS, "fds of waiting requests are kept"
        root_can_still_work(daemon)
    finally:
        attacker.release()
    wait_until(lambda: daemon_fds(daemon) <= baseline, "the daemon's fds are back to baseline")
    # Root's own trace_read does wait: still, it keeps none of the fds it came with.
    null = os.open("/dev/null", os.O_RDONLY)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(str(daemon.socket))
        s.send(protocol.pack(["hello", protocol.PROTOCOL_VERSION, "root"]))
        s.recv(protocol.INLINE_MAX)
        s.sendmsg([protocol.pack(["trace_read", 1 << 40])],
                  protocol.encode_fds([null] * protocol.FDS_MAX))
        time.sleep(0.5)
        assert daemon_fds(daemon) <= baseline + 1
        root_can_still_work(daemon)
    os.close(null)
    wait_until(lambda: daemon_fds(daemon) <= baseline, "the daemon's fds are back to baseline")


# -- all other users together ---------------------------------------------------------------------
NOFILE = 256  # the daemon's RLIMIT_NOFILE in this test: half of it is kept for root


def _hoard_until_refused(socket_path: str, pin: str) -> Iterator[tuple[int, int | None, str]]:
    """_hoard_obj_gets without a stop of its own."""
    held: list[int] = []
    with Client(socket_path) as client:
        fd = client.map_create(MapType.HASH, 4, 4, 1)
        client.obj_pin(fd, pin)
        held.append(fd)
        while len(held) < NOFILE:
            try:
                held.append(client.obj_get(pin))
            except OSError as e:
                yield (len(held), e.errno, e.strerror or "")
                return
    yield (len(held), None, "")


@pytest.mark.fuse
def test_other_users_leave_root_a_reserve_of_the_daemons_fds(public_root: Path,
                                                             start_daemon) -> None:
    """issue 13, finding 4: per-uid limits alone let enough users together take every fd.
    Non-root users stop short of the daemon's RLIMIT_NOFILE by --root-reserve (at most half
    of it), so root's map_create still works."""
    daemon = start_daemon(mount=True, root=public_root / "d")
    assert daemon.mount is not None and daemon.proc is not None
    resource.prlimit(daemon.proc.pid, resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    baseline = settled_fds(daemon)
    attacker = Attacker(_hoard_until_refused, str(daemon.socket), str(daemon.mount / "hoard"))
    try:
        held, err, message = attacker.step()
        assert err == errno.EMFILE and "kept for root" in message, (held, err, message)
        assert held <= NOFILE // 2
        with Client(str(daemon.socket)) as root:
            # each map holds three of the daemon's fds (the object fd's end, its memory's two)
            fds = [root.map_create(MapType.HASH, 4, 4, 1) for _ in range(NOFILE // 8)]
            protocol.close_all(fds)
    finally:
        attacker.release()
    wait_until(lambda: daemon_fds(daemon) <= baseline + MAP_MEMORY_FDS,  # the pinned map's
               "the daemon's fds are back to baseline")
