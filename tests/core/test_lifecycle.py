"""The daemon's life: clean shutdown on SIGTERM/SIGINT, systemd's readiness notification and
socket activation (a NOTIFY_SOCKET and a LISTEN_FDS socket made here, as systemd would), a
stale socket left by a crash, a second daemon on a live socket, and the default socket path
of an unprivileged user."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import NOBODY, become, in_child, is_mounted

from bpffs import paths
from bpffs.client import Client
from bpffs.daemon.main import main as daemon_main
from bpffs.vm.uapi import MapType


@pytest.mark.fuse
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_shuts_down_cleanly(start_daemon, sig: signal.Signals) -> None:
    d = start_daemon(mount=True)
    with d.client() as client:
        client.map_create(MapType.HASH, 4, 4, 1)  # an object and a connection still open
        d.kill(sig)
    assert d.proc.returncode == 0, d.log_text()
    assert f"{sig.name}: shutting down" in d.log_text()
    assert not d.socket.exists(), "the socket the daemon made is removed"
    assert not is_mounted(d.mount), "the mount is gone"


def notify_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    return sock


def test_sd_notify_ready_and_stopping(start_daemon, tmp_path: Path, monkeypatch) -> None:
    sock = notify_socket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    d = start_daemon()
    ready = sock.recv(4096).decode().split("\n")
    assert ready[0] == "READY=1" and ready[1] == f"STATUS=serving on {d.socket}"
    # READY=1 comes only once the socket accepts requests
    with d.client() as client:
        assert client.status()["pid"] == d.proc.pid
    d.kill(signal.SIGTERM)
    assert sock.recv(4096) == b"STOPPING=1"
    sock.close()


def test_sd_notify_to_an_abstract_socket(start_daemon, monkeypatch) -> None:
    name = f"bpffs-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    start_daemon()
    assert sock.recv(4096).startswith(b"READY=1\n")
    sock.close()


# The wrapper puts the listening socket at fd 3 and sets LISTEN_PID to the pid that execs the
# daemon, as systemd does.
ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="control")
os.execv(sys.executable, [sys.executable, "-m", "bpffs.daemon.main", *sys.argv[2:]])
"""


def test_socket_activation(tmp_path: Path) -> None:
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen()
    log = open(tmp_path / "log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-c", ACTIVATE, str(listener.fileno()),
         "--socket", str(tmp_path / "unused.sock"), "--no-mount", "--no-persist"],
        pass_fds=[listener.fileno()], stdout=log, stderr=subprocess.STDOUT)
    listener.close()  # the daemon holds it now
    try:
        client = _connect_when_ready(path, proc)
        fd = client.map_create(MapType.ARRAY, 4, 4, 1)
        assert client.map_lookup_elem(fd, bytes(4)) == bytes(4)
        assert client.status()["pid"] == proc.pid
        client.close()
        assert not (tmp_path / "unused.sock").exists(), "no socket of its own"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        log.close()
    assert path.exists(), "the activated socket is systemd's: the daemon leaves it"
    assert "Traceback" not in (tmp_path / "log").read_text()


def _connect_when_ready(path: Path, proc: subprocess.Popen) -> Client:
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, "the daemon exited"
        try:
            return Client(str(path))
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_stale_socket_is_replaced(start_daemon, tmp_path: Path) -> None:
    root = tmp_path / "stale"
    root.mkdir()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dead.bind(str(root / "control.sock"))  # a crashed daemon's socket: nobody listens
    dead.close()
    d = start_daemon(root=root)
    with d.client() as client:
        assert client.status()["pid"] == d.proc.pid


def run_daemon(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bpffs.daemon.main", "--no-mount",
                           "--no-persist", *args], capture_output=True, text=True, timeout=60)


def test_a_live_socket_is_not_taken_over(start_daemon) -> None:
    d = start_daemon()
    second = run_daemon("--socket", str(d.socket))
    assert second.returncode == 1
    assert f"a bpffsd already serves {d.socket}" in second.stderr
    with d.client() as client:
        assert client.status()["pid"] == d.proc.pid, "the first daemon is untouched"


def test_a_socket_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    path.write_text("not a socket")
    result = run_daemon("--socket", str(path))
    assert result.returncode == 1 and "exists and is not a socket" in result.stderr
    assert path.read_text() == "not a socket"


# -- default paths ------------------------------------------------------------------------------
def test_default_paths(monkeypatch) -> None:
    monkeypatch.delenv("BPFFS_SOCKET", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert paths.default_socket() == "/run/bpffsd/control.sock"  # root
    assert in_child(paths.default_socket, user=NOBODY) == "/tmp/bpffsd-65534/control.sock"
    monkeypatch.setenv("BPFFS_SOCKET", "/somewhere/else.sock")
    assert in_child(paths.default_socket, user=NOBODY) == "/somewhere/else.sock"


def test_an_unprivileged_daemon_on_its_default_socket(monkeypatch) -> None:
    """bpffsd started by nobody with no --socket listens on nobody's runtime path, and the
    client library finds it there with no configuration. (Forked, not exec'ed: nobody cannot
    read root's Python installation to import it again.)"""
    monkeypatch.delenv("BPFFS_SOCKET", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    runtime = Path("/tmp/bpffsd-65534")
    shutil.rmtree(runtime, ignore_errors=True)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the daemon, as nobody
        code = 1
        try:
            become(NOBODY)
            code = daemon_main(["--no-mount", "--no-persist"])
        finally:
            os._exit(code)
    try:
        deadline = time.monotonic() + 30
        while not (runtime / "control.sock").exists():
            assert time.monotonic() < deadline, "no socket at the default path"
            time.sleep(0.05)
        time.sleep(0.2)  # bound before listen(): let it start listening

        def use_default() -> list:
            with Client() as client:
                fd = client.map_create(MapType.HASH, 4, 4, 1)
                return [client.path, client.status()["pid"], fd > 0]

        assert in_child(use_default, user=NOBODY) == [str(runtime / "control.sock"), pid, True]
        assert os.stat(runtime / "control.sock").st_uid == 65534
    finally:
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        shutil.rmtree(runtime, ignore_errors=True)
    assert os.waitstatus_to_exitcode(status) == 0


def test_bpffs_socket_env_names_the_socket_for_daemon_client_and_cli(tmp_path: Path,
                                                                     monkeypatch) -> None:
    """No --socket anywhere: the daemon listens where BPFFS_SOCKET says, and the library's
    default connection and the CLI find it there."""
    path = tmp_path / "from-env.sock"
    monkeypatch.setenv("BPFFS_SOCKET", str(path))
    proc = subprocess.Popen([sys.executable, "-m", "bpffs.daemon.main", "--no-mount",
                             "--no-persist"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        client = _connect_when_ready(path, proc)
        assert client.path == str(path) and client.status()["pid"] == proc.pid
        client.close()
        shown = subprocess.run(["bpffs", "status"], capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and f"(pid {proc.pid}) on {path}" in shown.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err
    assert not path.exists()
