"""Fixtures shared by the whole suite: real daemons (subprocesses), real FUSE mounts, real
sockets, and the running kernel as an oracle. Nothing here is mocked.

- `daemon`: one bpffsd per test module, with a mount; tests isolate themselves with `bpf_dir`.
- `start_daemon`: start more (or differently configured) daemons inside a test.
- `kernel_bpffs`: a real `mount -t bpf` (skipped where the kernel or privileges are missing).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import DaemonProcess, fuse_available

import bpffs
from bpffs.client import Client
from bpffs.vm import kernel

REPO = Path(__file__).resolve().parents[1]


def _check_import_identity() -> None:
    """Fail loudly when `bpffs` comes from anywhere but this checkout: another checkout's
    editable install, or an old copy in site-packages, would be tested in its place."""
    for name, module in (("bpffs", bpffs), ("bpffs.client", bpffs.client),
                         ("bpffs.vm", bpffs.vm)):
        where = Path(module.__file__).resolve()
        if not where.is_relative_to(REPO):
            raise pytest.UsageError(
                f"{name} is imported from {where}, not from this checkout ({REPO}): run pytest"
                f" as `python3 -m pytest` from {REPO}, or `pip install -e {REPO}`")


_check_import_identity()


def _check_log(daemon: DaemonProcess) -> None:
    text = daemon.log_text()
    assert "Traceback" not in text, f"bpffsd logged a traceback:\n{text}"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    if not fuse_available():
        pytest.skip("needs /dev/fuse and fusermount3")
    d = DaemonProcess(tmp_path_factory.mktemp("bpffsd")).start()
    yield d
    status = d.stop()
    left = d.cleanup_mount()
    _check_log(d)
    assert status == 0, f"bpffsd exited with {status}:\n{d.log_text()}"
    assert not left, "bpffsd left its mount behind on SIGTERM"


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator:
    """start_daemon(mount=True, args=()) -> DaemonProcess, stopped after the test."""
    started: list[DaemonProcess] = []

    def start(mount: bool = True, args: tuple[str, ...] = (), root: Path | None = None
              ) -> DaemonProcess:
        if mount and not fuse_available():
            pytest.skip("needs /dev/fuse and fusermount3")
        d = DaemonProcess(root or tmp_path / f"d{len(started)}", mount, args).start()
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
        d.cleanup_mount()
    for d in started:
        _check_log(d)


@pytest.fixture
def public_root() -> Iterator[Path]:
    """A directory every user may search (pytest's tmp_path is root's 0700)."""
    root = Path(tempfile.mkdtemp(prefix="bpffsd-pub-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def public_daemon(public_root: Path, start_daemon) -> DaemonProcess:
    """A daemon under public_root: one whose socket uid 65534 can reach."""
    return start_daemon(root=public_root / "d")


@pytest.fixture
def client(daemon: DaemonProcess) -> Iterator[Client]:
    with daemon.client() as c:
        yield c


@pytest.fixture
def bpf_dir(daemon: DaemonProcess) -> Iterator[Path]:
    """A fresh directory on the module daemon's mount (names may not contain dots)."""
    assert daemon.mount is not None
    path = daemon.mount / f"t{uuid.uuid4().hex[:12]}"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def use_daemon(daemon: DaemonProcess, monkeypatch: pytest.MonkeyPatch) -> DaemonProcess:
    """Point the module-level libbpf calls (default_client) at the module daemon."""
    monkeypatch.setenv("BPFFS_SOCKET", str(daemon.socket))
    return daemon


@pytest.fixture
def kernel_bpffs(tmp_path: Path) -> Iterator[Path]:
    """A real kernel bpffs, the oracle for shell-tool behaviour."""
    if os.geteuid() != 0:
        pytest.skip("mounting a kernel bpffs needs root")
    path = tmp_path / "kernel_bpf"
    path.mkdir()
    if subprocess.run(["mount", "-t", "bpf", "bpf", str(path)], capture_output=True).returncode:
        pytest.skip("this kernel cannot mount bpffs here")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


requires_kernel = pytest.mark.skipif(not kernel.available(),
                                     reason="needs the running kernel's bpf(2) (root)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("kernel"):
            item.add_marker(requires_kernel)
