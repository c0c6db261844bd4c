"""Helpers of the filesystem tests: real "containers" (processes in their own mount namespace,
made with util-linux's `unshare -m`), code run inside them or as another user, the CLI, and the
store's object counts that tell whether anything was lost or leaked."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import DaemonProcess, in_child

from bpffs.client import Client
from bpffs.vm.uapi import MapType

UNPRIVILEGED = (65534, 65534)  # nobody:nogroup
CLIENT_PRELUDE = """
import errno, os, socket, sys
from bpffs.client import Client
from bpffs.vm.uapi import MapType
client = Client()
"""


def need_namespaces() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("needs root and util-linux unshare/nsenter for mount namespaces")


class Container:
    """A long-lived process alone in a private mount namespace (`unshare -m --propagation
    private sleep infinity`): what the daemon targets with --target-pid. With `uid_base`, it
    also has its own PID namespace and user namespace, whose root is host uid/gid `uid_base`
    (65536 ids mapped, as container runtimes do)."""

    def __init__(self, env: dict[str, str], uid_base: int | None = None):
        need_namespaces()
        self.env = env
        self.user_ns = uid_base is not None
        extra = ["-U", "-p", "--fork", "--kill-child"] if self.user_ns else []
        self.proc = subprocess.Popen(["unshare", "-m", *extra, "--propagation", "private",
                                      "sleep", "infinity"])
        deadline = time.monotonic() + 10
        while self.ns_ino() == os.stat("/proc/self/ns/mnt").st_ino:
            assert time.monotonic() < deadline, "unshare did not enter a new namespace"
            time.sleep(0.01)
        if self.user_ns:
            Path(f"/proc/{self.pid}/uid_map").write_text(f"0 {uid_base} 65536")
            Path(f"/proc/{self.pid}/setgroups").write_text("deny")
            Path(f"/proc/{self.pid}/gid_map").write_text(f"0 {uid_base} 65536")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ns_ino(self) -> int:
        return os.stat(f"/proc/{self.pid}/ns/mnt").st_ino

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        namespaces = ["-m", "-U"] if self.user_ns else ["-m"]  # -U: as the container's root
        result = subprocess.run(["nsenter", "-t", str(self.pid), *namespaces, *argv],
                                env=self.env, capture_output=True, text=True, timeout=60)
        if check:
            assert result.returncode == 0, f"{argv} in the container: {result.stderr}"
        return result

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("sh", "-c", script, check=check)

    def python(self, code: str, *args: str) -> str:
        """Run a client script inside the namespace (prelude: `client`, MapType); returns its
        stdout, failing the test with its stderr if it fails."""
        return self.run(sys.executable, "-c", CLIENT_PRELUDE + textwrap.dedent(code),
                        *args).stdout

    def mount(self, daemon: DaemonProcess, path: str, *options: str) -> str:
        subprocess.run(["nsenter", "-t", str(self.pid), "-m", "mkdir", "-p", path], check=True)
        return cli(daemon, "mount", path, "--target-pid", str(self.pid), *options)

    def mounted(self, path: str) -> bool:
        return self.run("mountpoint", "-q", path, check=False).returncode == 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cli(daemon: DaemonProcess, *argv: str, check: bool = True) -> str:
    """Run `bpffs ARGV` against daemon; its stdout (and stderr unless check)."""
    cmd = [sys.executable, "-c", "import sys; from bpffs.client.cli import main;"
           " sys.exit(main())", *argv]
    result = subprocess.run(cmd, env=daemon.env, capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, f"bpffs {' '.join(argv)}: {result.stderr}"
        return result.stdout
    return result.stdout + result.stderr


def as_user(cmd: list[str], user: tuple[int, int] | None) -> list[str]:
    """A command line that runs cmd as user (system tools only: root's site-packages are
    not readable by others, so Python code as another user goes through in_child)."""
    if user is None:
        return cmd
    uid, gid = user
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *cmd]


def client_call(daemon: DaemonProcess, op: str, *args: Any, user: tuple[int, int] | None = None,
                umask: int | None = None) -> Any:
    """One client operation from a new process and connection (as `user`, with `umask`)."""

    def call() -> Any:
        with Client(str(daemon.socket)) as client:
            result = getattr(client, op)(*args)
            return None if isinstance(result, int) and op == "obj_get" else result

    return in_child(call, user=user, umask=umask)


def pin_as(daemon: DaemonProcess, path: str | Path, user: tuple[int, int] | None = None,
           umask: int | None = None) -> None:
    """Create a map and pin it at path from a new process (as `user`, with `umask`)."""

    def pin() -> None:
        with Client(str(daemon.socket)) as client:
            client.obj_pin(client.map_create(MapType.HASH, 4, 4, 1), str(path))

    in_child(pin, user=user, umask=umask)


def new_map(client: Client, entries: dict[bytes, bytes] | None = None, max_entries: int = 16,
            key_size: int = 4, value_size: int = 8) -> int:
    fd = client.map_create(MapType.HASH, key_size, value_size, max_entries)
    for key, value in (entries or {}).items():
        client.map_update_elem(fd, key, value)
    return fd


def pin_new_map(client: Client, path: str | Path, **kwargs: object) -> None:
    """A map held only by its pin at path."""
    fd = new_map(client, **kwargs)  # type: ignore[arg-type]
    try:
        client.obj_pin(fd, str(path))
    finally:
        os.close(fd)


def object_count(client: Client) -> int:
    """Live objects in the store (fds whose holders closed them are reaped first)."""
    return sum(client.status()["objects"].values())


def instance_of(client: Client, mountpoint: str | Path) -> dict:
    for inst in client.status()["instances"]:
        if str(mountpoint) in inst["mounts"]:
            return inst
    raise AssertionError(f"no instance is mounted at {mountpoint}: {client.status()}")


def wait_for(condition: Callable[[], object], what: str, timeout: float = 20.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def errno_of(fn: Callable[[], object]) -> int:
    """0 when fn succeeds, else the errno of the OSError it raised."""
    try:
        fn()
    except OSError as e:
        return e.errno or -1
    return 0


def worker_of(mount: Path) -> int:
    """The pid of the mount worker serving `mount` (a child of the daemon)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"bpffs.daemon.fs.worker" in cmdline and os.fsencode(mount) in cmdline:
                return int(entry.name)
    raise AssertionError(f"no mount worker for {mount}")
