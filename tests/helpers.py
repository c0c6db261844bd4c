"""Test helpers importable from any test module: the daemon subprocess and errno checks."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bpffs.client import Client

START_TIMEOUT = 30.0
NOBODY = (65534, 65534)  # uid and gid of nobody:nogroup, the unprivileged caller of many tests


def fuse_available() -> bool:
    """Whether tests may mount FUSE. BPFFSD_TEST_HIDE_FUSE=1 answers no, to measure what
    runs on a machine without /dev/fuse."""
    if os.environ.get("BPFFSD_TEST_HIDE_FUSE") == "1":
        return False
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


def is_mounted(path: Path) -> bool:
    target = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split()[4] == target for line in f)


class DaemonProcess:
    """A bpffsd subprocess with its own socket, state directory and (mount=True) mount under
    `root`."""

    def __init__(self, root: Path, mount: bool = False, args: tuple[str, ...] = ()):
        self.root = root
        self.socket = root / "control.sock"
        self.mount = root / "bpf" if mount else None
        self.state_dir = root / "state"
        self.log_path = root / "bpffsd.log"
        self.args = args
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "BPFFS_SOCKET": str(self.socket)}

    def start(self) -> DaemonProcess:
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "bpffs.daemon.main", "--socket", str(self.socket),
               "--state-dir", str(self.state_dir), "-v", *self.args]
        cmd += ["--mount", str(self.mount)] if self.mount else ["--no-mount"]
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"bpffsd exited with {self.proc.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"bpffsd did not become ready:\n{self.log_text()}")
            time.sleep(0.05)
        return self

    def _ready(self) -> bool:
        if not self.socket.exists() or (self.mount and not is_mounted(self.mount)):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            try:
                s.connect(str(self.socket))
            except OSError:
                return False
        return True

    def client(self) -> Client:
        return Client(str(self.socket))

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL; returns the exit status. A mount left behind is detached
        (and reported by the caller's assertions, not hidden)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def cleanup_mount(self) -> bool:
        """Detach the mount if the daemon left it; True when it had to."""
        if self.mount and is_mounted(self.mount):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mount)], check=False)
            return True
        return False


@contextlib.contextmanager
def raises_errno(err: int) -> Iterator[pytest.ExceptionInfo[OSError]]:
    """Expect an OSError carrying exactly this errno (`as info`: info.value is the error)."""
    with pytest.raises(OSError) as info:
        yield info
    assert info.value.errno == err, f"expected errno {err}, got {info.value!r}"


def become(user: tuple[int, int], groups: tuple[int, ...] = ()) -> None:
    """Drop this (forked) process to uid and gid `user`, with these supplementary groups."""
    os.setgroups(list(groups))
    os.setresgid(user[1], user[1], user[1])
    os.setresuid(user[0], user[0], user[0])


def in_child(fn: Callable[..., Any], *args: Any, user: tuple[int, int] | None = None,
             umask: int | None = None) -> Any:
    """fn(*args) in a forked child (as `user`, with `umask`): its result, or the OSError it
    raised, re-raised here. Forking (not exec) keeps the imported modules: another user could
    not read root's site-packages to import them again."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(read_end)
            if umask is not None:
                os.umask(umask)
            if user is not None:
                become(user)
            try:
                outcome: tuple = ("ok", fn(*args))
            except OSError as e:
                outcome = ("error", e.errno, str(e))
            with os.fdopen(write_end, "wb") as f:
                pickle.dump(outcome, f)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the child process failed"
    outcome = pickle.loads(data)
    if outcome[0] == "error":
        raise OSError(outcome[1], outcome[2])
    return outcome[1]
