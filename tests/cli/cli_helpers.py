"""Helpers of the CLI tests: bpftool, the oracle, and the command that runs this tree's CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CLI = "import sys; from bpffs.client.cli import main; sys.exit(main(sys.argv[1:]))"
REPO = Path(__file__).resolve().parents[2]

needs_bpftool = pytest.mark.skipif(shutil.which("bpftool") is None or os.geteuid() != 0,
                                   reason="needs bpftool and root (install.sh installs it)")


def bpftool(*words: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["bpftool", *words], capture_output=True, text=True, timeout=30,
                          **kwargs)
