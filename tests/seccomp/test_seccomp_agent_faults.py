"""The seccomp agent under faults (findings of the agent's review): a full fd table makes
accept() fail, which must not end the agent (every container it serves would lose its
supervisor); its soft open-files limit is raised to the hard one; a bpffsd that answers the
hello with nonsense leaves no listener open with nobody reading it (the container's calls
would hang; a closed listener fails them with ENOSYS).

The "containers" are children of the test forked under bpffs's filter: each hands its
listener to the agent as runc does (the state JSON naming "seccompFd", the fd with it), then
makes one raw bpf() call when told to."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import DaemonProcess

from bpffs.client.seccomp import abi
from bpffs.client.seccomp import filter as seccomp_filter
from bpffs.client.seccomp.agent import Credentials, acting_as, supervise
from bpffs.client.seccomp.notify import install_filter, syscall
from bpffs.client.seccomp.target import read_status

AGENT = [sys.executable, "-m", "bpffs.client.seccomp.agent"]
WAIT = 20.0
FILLERS = 4  # containers holding the agent's fds (a listener and a bpffsd connection each)
# BPF_MAP_CREATE of an ARRAY map of one u32, as bpf(2) takes it
MAP_CREATE = struct.pack("<IIIIIII16sI", 2, 4, 4, 1, 0, 0, 0, b"faults", 0)


def _wait(what: str, done: Callable[[], bool], log: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + WAIT
    while not done():
        assert time.monotonic() < deadline, f"{what}, after {WAIT} s\n{log()}"
        time.sleep(0.05)


class Container:
    """A forked child under the filter that gives its listener to `give` (in the child),
    then waits: call() has it make bpf(BPF_MAP_CREATE) and returns the result (an fd, or
    -errno); end() kills and reaps it (its listener then hangs up in the agent)."""

    def __init__(self, give: Callable[[int], None]):
        attr = ctypes.create_string_buffer(MAP_CREATE, len(MAP_CREATE))  # made before fork
        go_r, self.go = os.pipe()
        self.result, result_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child
            status = 1
            try:
                os.close(self.go)
                os.close(self.result)
                listener = install_filter(seccomp_filter.build())
                give(listener)
                os.close(listener)
                if os.read(go_r, 1) == b"b":
                    try:
                        r = syscall(abi.Nr.bpf, 0, ctypes.addressof(attr), len(MAP_CREATE))
                    except OSError as e:
                        r = -(e.errno or 0)
                    os.write(result_w, str(r).encode())
                status = 0
            finally:
                os._exit(status)
        os.close(go_r)
        os.close(result_w)

    def call(self) -> int:
        os.write(self.go, b"b")
        readable, _, _ = select.select([self.result], [], [], WAIT)
        assert readable, f"the container's bpf() got no answer in {WAIT} s"
        return int(os.read(self.result, 32))

    def end(self) -> None:
        if self.go < 0:
            return
        os.close(self.go)
        os.close(self.result)
        self.go = -1
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


def runtime(agent_socket: Path, name: str) -> Callable[[int], None]:
    """What runc does with a container's listener: connect, send the state and the fd, hang
    up (in the child)."""
    def give(listener: int) -> None:
        state = {"ociVersion": "1.0.2", "fds": [abi.OCI_SECCOMP_FD_NAME], "pid": os.getpid(),
                 "metadata": "", "state": {"id": name, "pid": os.getpid(), "status": "running"}}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(agent_socket))
            socket.send_fds(s, [json.dumps(state).encode()], [listener])
    return give


@contextlib.contextmanager
def containers() -> Iterator[list[Container]]:
    made: list[Container] = []
    try:
        yield made
    finally:
        for c in made:
            c.end()


class Agent:
    def __init__(self, proc: subprocess.Popen, socket_path: Path, log_path: Path):
        self.proc, self.socket, self.log_path = proc, socket_path, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def fds(self) -> set[int]:
        return {int(fd) for fd in os.listdir(f"/proc/{self.proc.pid}/fd")}

    def limits(self) -> tuple[int, int]:
        return resource.prlimit(self.proc.pid, resource.RLIMIT_NOFILE)


@pytest.fixture
def agent(daemon: DaemonProcess, seccomp_ok: None, tmp_path: Path) -> Iterator[Agent]:
    """The agent as bpffsd runs it (verbose), started with a soft open-files limit of 64
    under a hard one of 4096."""
    path, log_path = tmp_path / "agent.sock", tmp_path / "agent.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*AGENT, "--listen", str(path), "--socket", str(daemon.socket), "-v"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 4096)))
    a = Agent(proc, path, log_path)
    try:
        _wait("no agent socket", lambda: path.exists() or proc.poll() is not None, a.log)
        assert proc.poll() is None, a.log()
        yield a
    finally:
        proc.terminate()
        proc.wait(WAIT)


def test_the_agent_raises_its_soft_open_files_limit(agent: Agent) -> None:
    assert agent.limits() == (4096, 4096)


def test_a_full_fd_table_does_not_end_the_agent(agent: Agent) -> None:
    """FILLERS containers hold agent fds; then its open-files limit is lowered to the fd its
    blocked accept() holds reserved (the kernel takes it before waiting: the lowest fd not
    listed), so that after one more connection (refused: it sends nothing) the next accept()
    fails with EMFILE. The agent logs it once and keeps trying; once the fillers end and the
    limit is back, the runtime waiting in the backlog is served."""
    with containers() as made:
        for i in range(FILLERS):
            made.append(Container(runtime(agent.socket, f"filler{i}")))
            line = f"container filler{i} (pid {made[-1].pid}): supervising"
            _wait(f"filler {i} not supervised", lambda: line in agent.log(),  # noqa: B023
                  agent.log)
        fds = agent.fds()
        reserved = min(set(range(max(fds) + 2)) - fds)
        resource.prlimit(agent.proc.pid, resource.RLIMIT_NOFILE, (reserved, 4096))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as nudge:
            nudge.connect(str(agent.socket))  # accepted on the reserved fd, then refused
        _wait("no accept failure logged",
              lambda: "cannot accept" in agent.log() or agent.proc.poll() is not None,
              agent.log)
        probe = Container(runtime(agent.socket, "probe"))
        made.append(probe)
        time.sleep(3 * abi.AGENT_ACCEPT_PAUSE)
        assert agent.proc.poll() is None, f"the agent exited:\n{agent.log()}"
        assert agent.log().count("Too many open files") == 1, agent.log()  # logged once
        for filler in made[:FILLERS]:
            filler.end()
        resource.prlimit(agent.proc.pid, resource.RLIMIT_NOFILE, (4096, 4096))
        assert probe.call() >= 0, agent.log()  # accepted and served
        assert "accepting runtimes' connections again" in agent.log()
        assert "container probe" in agent.log()
        probe.end()
        latecomer = Container(runtime(agent.socket, "latecomer"))
        made.append(latecomer)
        assert latecomer.call() >= 0, agent.log()
    assert agent.proc.poll() is None, agent.log()
    assert "Traceback" not in agent.log(), agent.log()


@pytest.fixture
def nonsense_daemon(tmp_path: Path) -> Iterator[Path]:
    """A socket where bpffsd's would be, answering every hello with bytes that are no
    reply (its connections are kept open: a hang-up would be an OSError)."""
    path = tmp_path / "nonsense.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(str(path))
    server.listen(8)
    conns: list[socket.socket] = []

    def answer() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                conns.append(conn)
                conn.recv(1 << 16)
                conn.send(b"\xc1 this is not msgpack")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(WAIT)
        for conn in conns:
            conn.close()


def test_a_hello_answered_with_nonsense_closes_the_listener(seccomp_ok: None,
                                                            nonsense_daemon: Path) -> None:
    """supervise() cannot make its bpffsd connection (ProtocolError, not an OSError): it
    logs, closes the listener, and the container's bpf() fails with ENOSYS at once instead
    of waiting for ever for a supervisor."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs, containers() as made:
        made.append(Container(lambda fd: socket.send_fds(theirs, [b"L"], [fd])))
        _, [listener], _, _ = socket.recv_fds(ours, 1, 1)
        supervise(listener, {"pid": made[0].pid, "state": {"id": "nonsense"}},
                  str(nonsense_daemon))
        with pytest.raises(OSError) as closed:
            os.fstat(listener)
        assert closed.value.errno == errno.EBADF
        assert made[0].call() == -errno.ENOSYS


def _fs_ids(tid: int | str) -> tuple[int, int]:
    with open(f"/proc/{tid}/status") as f:
        lines = dict(line.split(":", 1) for line in f)
    return int(lines["Uid"].split()[3]), int(lines["Gid"].split()[3])


@pytest.mark.skipif(os.geteuid() != 0, reason="setfsuid to another user needs root")
def test_paths_are_walked_with_the_callers_file_system_ids() -> None:
    """A caller whose fsuid/fsgid differ from its euid/egid (setfsuid, as file servers do):
    the agent reads them (field 4 of Uid:/Gid:) and walks its paths with them."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: root with nobody's file-system ids
        syscall(abi.Nr.setfsgid, 65534)
        syscall(abi.Nr.setfsuid, 65534)
        os.write(ready_w, b"x")
        time.sleep(WAIT)
        os._exit(0)
    try:
        os.read(ready_r, 1)
        creds = Credentials.of_status(read_status(pid))
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(ready_w)
    assert (creds.uids[1], creds.gids[1], creds.fsuid, creds.fsgid) == (0, 0, 65534, 65534)
    own = _fs_ids("thread-self")
    with acting_as(creds, files_only=True):
        assert _fs_ids("thread-self") == (65534, 65534)
    assert _fs_ids("thread-self") == own
