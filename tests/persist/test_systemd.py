"""The systemd units: `systemd-analyze verify` accepts them, and the daemon runs under
socket activation (the listening socket from LISTEN_FDS, as bpffsd.socket hands it over)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bpffs.client import Client
from bpffs.vm.uapi import MapType

UNITS = Path(__file__).parents[2] / "systemd"


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    daemon = shutil.which("bpffsd")
    assert daemon, "the bpffsd console script is not installed"
    for name in ("bpffsd.service", "bpffsd.socket"):  # ExecStart names this install's bpffsd
        text = (UNITS / name).read_text().replace("/usr/local/bin/bpffsd", daemon)
        (tmp_path / name).write_text(text)
    result = subprocess.run([analyze, "verify", str(tmp_path / "bpffsd.service"),
                             str(tmp_path / "bpffsd.socket")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "bpffsd.socket" in (UNITS / "bpffsd.service").read_text()


def test_the_tmpfiles_entry_names_the_state_and_runtime_directories() -> None:
    lines = [line.split() for line in (UNITS / "bpffsd.conf").read_text().splitlines()
             if line and not line.startswith("#")]
    assert ["d", "/var/lib/bpffsd", "0700", "root", "root", "-"] in lines
    assert ["d", "/run/bpffsd", "0755", "root", "root", "-"] in lines


def test_socket_activation(tmp_path: Path) -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    sock = tmp_path / "control.sock"
    proc = subprocess.Popen([activate, "--seqpacket", "-l", str(sock), sys.executable, "-m",
                             "bpffs.daemon.main", "--no-mount", "--no-persist", "--socket",
                             str(tmp_path / "unused.sock")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.05)
        with Client(str(sock)) as client:  # the first connection starts the daemon
            fd = client.map_create(MapType.ARRAY, 4, 4, 1)
            assert client.status()["socket"]
            os.close(fd)
        assert not (tmp_path / "unused.sock").exists(), "the daemon bound its own socket"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
