"""Fixtures of the CLI tests: `bpffs` run as a user runs it (a subprocess, found on PATH),
against the module's daemon, and bpftool on a kernel bpffs as the oracle."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_helpers import CLI
from helpers import DaemonProcess


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding a `bpffs` that runs this working tree's CLI with this interpreter
    (the installed console script may belong to another checkout)."""
    path = tmp_path_factory.mktemp("bin")
    script = path / "bpffs"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -c '{CLI}' \"$@\"\n")
    script.chmod(0o755)
    return path


@pytest.fixture
def cli_env(daemon: DaemonProcess, bin_dir: Path) -> dict[str, str]:
    """The environment of a user of the test's daemon: its socket, tc pins on its mount (a
    test marked fuse)."""
    mount = {"TC_BPF_MNT": str(daemon.mount)} if daemon.mount else {}
    return {**daemon.env, **mount, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture
def bpffs(cli_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess]:
    """bpffs(*words, input=None, timeout=60) -> the finished `bpffs` subprocess."""
    def run(*words: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["bpffs", *words], env=cli_env, capture_output=True, text=True,
                              timeout=timeout, **kwargs)

    return run
