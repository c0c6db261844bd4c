"""Connecting: `async with AsyncClient()` as trio users write it, a timeout on every reply
(a SIGSTOPped daemon, issue 13), and finding the system daemon as a non-root user (issue 12)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from helpers import NOBODY, in_child, raises_errno

from bpffs import paths
from bpffs.client import AsyncClient, BpfError, Client, MapType, default_client
from bpffs.vm import asm
from bpffs.vm.isa import R1, R2, R3, R10
from bpffs.vm.uapi import Helper, ProgType


# -- AsyncClient() ------------------------------------------------------------------------------
async def test_async_client_connects_in_async_with(daemon) -> None:
    async with AsyncClient(str(daemon.socket)) as c:
        assert c.daemon_info["pid"] == daemon.proc.pid
        fd = await c.map_create(MapType.HASH, 4, 4, 4)
        await c.map_update_elem(fd, b"abcd", b"1234")
        assert await c.map_lookup_elem(fd, b"abcd") == b"1234"
        os.close(fd)
    assert c.closed
    with raises_errno(errno.ENOTCONN):
        await c.status()


async def test_async_client_connects_on_first_use_and_finds_the_daemon(daemon, monkeypatch
                                                                       ) -> None:
    monkeypatch.setenv("BPFFS_SOCKET", str(daemon.socket))
    c = AsyncClient()
    try:
        assert (await c.status())["pid"] == daemon.proc.pid
    finally:
        await c.aclose()
    old_style = await AsyncClient.connect(str(daemon.socket))  # still works
    await old_style.aclose()


async def test_async_client_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(BpfError) as info:
        async with AsyncClient(str(tmp_path / "nothing.sock")):
            pass
    assert info.value.errno == errno.ENOENT and "is the daemon running?" in str(info.value)
    with pytest.raises(TypeError, match=r"AsyncClient\.connect"):
        AsyncClient(42)  # type: ignore[arg-type]


# -- timeouts -----------------------------------------------------------------------------------
@pytest.fixture
def stopped(start_daemon) -> Iterator:
    """stopped() -> a context in which the daemon is SIGSTOPped (SIGCONT after)."""
    d = start_daemon()

    class Stop:
        def __enter__(self) -> None:
            os.kill(d.proc.pid, signal.SIGSTOP)

        def __exit__(self, *exc: object) -> None:
            os.kill(d.proc.pid, signal.SIGCONT)

    yield d, Stop
    os.kill(d.proc.pid, signal.SIGCONT)


def test_a_stopped_daemon_times_out(stopped) -> None:
    d, Stop = stopped
    c = Client(str(d.socket), timeout=0.5)
    fd = c.map_create(MapType.HASH, 4, 4, 4)
    with Stop():
        began = time.monotonic()
        with pytest.raises(BpfError) as info:
            c.map_lookup_elem(fd, b"abcd")
        assert 0.4 < time.monotonic() - began < 5
        assert info.value.errno == errno.ETIMEDOUT and "0.5 s" in str(info.value)
        assert c.closed, "a late reply would answer the next request: the connection is closed"
        with raises_errno(errno.ENOTCONN):
            c.map_lookup_elem(fd, b"abcd")
        with pytest.raises(BpfError) as info:  # a new client times out at its hello
            Client(str(d.socket), timeout=0.3)
        assert info.value.errno == errno.ETIMEDOUT
    with Client(str(d.socket), timeout=5) as again:  # SIGCONT: served again
        assert again.status()["pid"] == d.proc.pid
    os.close(fd)


def test_default_client_times_out_and_reconnects(stopped, monkeypatch) -> None:
    d, Stop = stopped
    monkeypatch.setenv("BPFFS_SOCKET", str(d.socket))
    monkeypatch.setattr("bpffs.client.sync.DEFAULT_TIMEOUT", 0.5)
    first = default_client()
    with Stop(), raises_errno(errno.ETIMEDOUT):
        first.status()
    assert default_client() is not first and default_client().status()["pid"] == d.proc.pid


async def test_async_client_times_out(stopped) -> None:
    d, Stop = stopped
    async with AsyncClient(str(d.socket), timeout=0.5) as c:
        with Stop():
            began = trio.current_time()
            with pytest.raises(BpfError) as info:
                await c.status()
            assert info.value.errno == errno.ETIMEDOUT
            assert 0.4 < trio.current_time() - began < 5
            assert c.closed


def test_a_timeout_is_positive_or_none(daemon) -> None:
    for bad in (0, -1, "5"):
        with pytest.raises(ValueError, match="timeout must be"):
            Client(str(daemon.socket), timeout=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout must be"):
            AsyncClient(str(daemon.socket), timeout=bad)  # type: ignore[arg-type]


def test_a_full_backlog_is_waited_for_not_refused(start_daemon) -> None:
    """A daemon busy for a moment lets its listen backlog fill (here: stopped, with a full
    backlog). A new client waits for room up to its timeout, as a plain blocking connect
    does; it used to fail at once with EAGAIN (a non-blocking unix connect's answer)."""
    d = start_daemon()
    os.kill(d.proc.pid, signal.SIGSTOP)
    filler = []
    waker = threading.Timer(0.5, os.kill, (d.proc.pid, signal.SIGCONT))
    try:
        while True:  # connect until the backlog is full
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.setblocking(False)
            try:
                s.connect(str(d.socket))
            except BlockingIOError:
                s.close()
                break
            filler.append(s)
        waker.start()
        began = time.monotonic()
        with Client(str(d.socket), timeout=20) as c:
            assert c.status()["pid"] == d.proc.pid
        assert time.monotonic() - began > 0.4
    finally:
        waker.cancel()
        os.kill(d.proc.pid, signal.SIGCONT)
        for s in filler:
            s.close()


def test_no_timeout_waits(stopped) -> None:
    """timeout=None: the call waits for the daemon however long it is stopped."""
    d, _ = stopped
    c = Client(str(d.socket), timeout=None)
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child wakes the daemon after 1 s
            time.sleep(1.0)
            os.kill(d.proc.pid, signal.SIGCONT)
            os._exit(0)
        began = time.monotonic()
        assert c.status()["pid"] == d.proc.pid
        assert time.monotonic() - began > 0.8
        os.waitpid(pid, 0)
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
        c.close()


def test_trace_read_waits_past_the_timeout(start_daemon) -> None:
    """trace_read waits for a program's output (the trace_pipe's read): no timeout applies,
    and the timeout is back for the next call."""
    d = start_daemon()
    lines: list = []
    with Client(str(d.socket), timeout=0.3) as reader, Client(str(d.socket)) as runner:
        thread = threading.Thread(target=lambda: lines.extend(reader.trace_read(0)))
        thread.start()
        time.sleep(1.0)
        printk = asm.program(asm.ld_imm64(R1, int.from_bytes(b"pkt %d\0\0", "little")),
                             asm.stx(8, R10, R1, -8), asm.mov64_reg(R1, R10),
                             asm.add64_imm(R1, -8), asm.mov64_imm(R2, 7),
                             asm.mov64_imm(R3, 5), asm.call(Helper.trace_printk), asm.exit())
        prog = runner.prog_load(ProgType.SOCKET_FILTER, printk)
        runner.prog_test_run(prog, bytes(60))
        os.close(prog)
        thread.join(10)
        assert lines and lines[0][1].endswith("pkt 5"), lines
        assert not reader.closed and reader.status()["pid"] == d.proc.pid
        timeval = reader.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)
        assert timeval != bytes(16), "the reply timeout is set again"


# -- finding the daemon -------------------------------------------------------------------------
@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A directory other users may enter (pytest's tmp_path is root's, mode 0700)."""
    root = Path(tempfile.mkdtemp(prefix="bpffsd-discovery-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _which_daemon() -> tuple[int, str]:
    with Client() as c:
        return c.daemon_info["pid"], c.path


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a uid 65534 process")
def test_a_user_without_a_daemon_finds_the_system_daemon(start_daemon, shared_root: Path,
                                                         monkeypatch) -> None:
    system = start_daemon(root=shared_root / "system")
    runtime = shared_root / "runtime"  # the user's XDG_RUNTIME_DIR, no daemon of theirs yet
    runtime.mkdir()
    os.chown(runtime, *NOBODY)
    monkeypatch.setattr(paths, "SYSTEM_SOCKET", str(system.socket))  # stands for /run/bpffsd
    monkeypatch.delenv("BPFFS_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    pid, path = in_child(_which_daemon, user=NOBODY)
    assert (pid, path) == (system.proc.pid, str(system.socket))
    # Once the user runs their own daemon, that one comes first.
    # (It runs as root here, its directory linked into the runtime dir: the daemon refuses a
    # state directory inside one another user owns.)
    own = start_daemon(root=shared_root / "own")
    (runtime / "bpffsd").symlink_to(own.root)
    pid, path = in_child(_which_daemon, user=NOBODY)
    assert (pid, path) == (own.proc.pid, str(runtime / "bpffsd" / "control.sock"))
    # BPFFS_SOCKET overrides both.
    monkeypatch.setenv("BPFFS_SOCKET", str(system.socket))
    assert in_child(_which_daemon, user=NOBODY)[0] == system.proc.pid


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a uid 65534 process")
def test_no_daemon_names_every_socket_tried(shared_root: Path, monkeypatch) -> None:
    runtime = shared_root / "runtime"
    runtime.mkdir()
    os.chown(runtime, *NOBODY)
    monkeypatch.delenv("BPFFS_SOCKET", raising=False)
    monkeypatch.setattr(paths, "SYSTEM_SOCKET", str(shared_root / "system.sock"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))

    def attempt() -> str:
        try:
            Client()
        except BpfError as e:
            return f"{errno.errorcode[e.errno]} {e}"
        return "connected"

    message = in_child(attempt, user=NOBODY)
    assert message.startswith("ENOENT"), message
    assert str(shared_root / "system.sock") in message
    assert str(runtime / "bpffsd" / "control.sock") in message
