"""Fixtures of the `bpffs exec` tests: unmodified tools run under the seccomp supervisor against
the module's daemon, and the same tools run plainly on a kernel bpffs as the oracle."""

from __future__ import annotations

import subprocess

import pytest
from helpers import DaemonProcess
from seccomp_helpers import BPFFS_EXEC, REPO, Run, bpftool_path, seccomp_unavailable


@pytest.fixture(scope="session")
def seccomp_ok() -> None:
    reason = seccomp_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def bpftool(seccomp_ok: None) -> str:
    path = bpftool_path()
    if path is None:
        pytest.skip("bpftool is not installed (Debian: apt-get install bpftool)")
    return path


@pytest.fixture
def under_exec(daemon: DaemonProcess, seccomp_ok: None) -> Run:
    """under_exec(*argv, timeout=60) -> argv run by `bpffs exec` against the module's daemon
    (this checkout's CLI)."""
    def run(*argv: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        cmd = [*BPFFS_EXEC, "--socket", str(daemon.socket), "--", *argv]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              **kwargs)
    return run


@pytest.fixture
def plain() -> Run:
    """plain(*argv) -> argv run directly (the kernel's answers)."""
    def run(*argv: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              **kwargs)
    return run
