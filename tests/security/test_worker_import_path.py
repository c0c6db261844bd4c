"""A `bpffs` package planted in bpffsd's current directory must never run as root.

`python -m MODULE` puts the current directory first on sys.path. The daemon starts its mount
workers and its seccomp agent that way, and its current directory is wherever it was started
(a user's directory, say): before workers ran with -P, a planted bpffs/__init__.py ran as root
in the mount worker and the agent (finding of the review of the seccomp agent).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import START_TIMEOUT, is_mounted

pytestmark = pytest.mark.fuse

PLANTED = '''
import os, pathlib
pathlib.Path(os.environ["PLANTED_MARKER"]).write_text(f"ran in pid {os.getpid()}")
'''


def test_workers_ignore_a_bpffs_package_in_the_daemons_directory(tmp_path: Path) -> None:
    planted_dir = tmp_path / "cwd"
    (planted_dir / "bpffs").mkdir(parents=True)
    (planted_dir / "bpffs" / "__init__.py").write_text(PLANTED)
    marker = tmp_path / "planted-ran"
    mount, agent = tmp_path / "bpf", tmp_path / "agent.sock"
    # Started as a console script is (bpffsd on PATH), not with -m, so that only the
    # workers' module path is under test.
    bpffsd = Path(sys.executable).parent / "bpffsd"
    cmd = [str(bpffsd), "--socket", str(tmp_path / "control.sock"), "--state-dir",
           str(tmp_path / "state"), "--mount", str(mount), "--seccomp-agent", str(agent)]
    env = {"PLANTED_MARKER": str(marker), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    with open(tmp_path / "bpffsd.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=planted_dir, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not (is_mounted(mount) and agent.exists()):
                assert proc.poll() is None, (tmp_path / "bpffsd.log").read_text()
                assert time.monotonic() < deadline, (tmp_path / "bpffsd.log").read_text()
                time.sleep(0.05)
            time.sleep(0.5)  # the agent has imported what it needs once it listens
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    assert not marker.exists(), marker.read_text()
    assert not is_mounted(mount)
