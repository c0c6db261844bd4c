"""A client-only install: a fresh virtualenv with `pip install CHECKOUT` (no extras) gets the
library and the `bpffs` CLI without pyfuse3 (so without a compiler or libfuse3-dev), and drives
a daemon started from the main environment: the README's first example, and the Python API."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import debian_root
import pytest
from helpers import DaemonProcess

pytestmark = [pytest.mark.slow, pytest.mark.install]


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("client-only")
    src = debian_root.copy_checkout(base / "src")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python3"), "-m", "pip"]
    subprocess.run([*pip, "install", "-q", "--upgrade", "pip"], check=True, timeout=600)
    # --only-binary for every dependency: proof that none needs a compiler.
    subprocess.run([*pip, "install", "-q", "--only-binary", ":all:", "--no-binary", "bpffsd",
                    str(src)], check=True, timeout=900)
    return venv


def venv_run(venv: Path, daemon: DaemonProcess, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BPFFS_SOCKET": str(daemon.socket),
           "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    env.pop("PYTHONPATH", None)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120,
                          cwd=venv.parent)


def test_no_pyfuse3_in_the_client_venv(client_venv: Path, daemon: DaemonProcess) -> None:
    code = textwrap.dedent("""
        import importlib.util, sys
        import bpffs.client, bpffs.client.cli, bpffs.client.cli.prog, bpffs.client.cli.pcap
        print(importlib.util.find_spec("pyfuse3"), "pyfuse3" in sys.modules,
              bpffs.client.__file__.startswith(sys.prefix))
    """)
    result = venv_run(client_venv, daemon, str(client_venv / "bin" / "python3"), "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "False", "True"]


@pytest.mark.fuse
def test_cli_from_the_client_venv_drives_a_daemon(client_venv: Path,
                                                  daemon: DaemonProcess) -> None:
    assert daemon.mount is not None
    pin = str(daemon.mount / "client_only_counts")
    bpffs = str(client_venv / "bin" / "bpffs")
    for argv in (["map", "create", pin, "type", "hash", "key", "4", "value", "8", "entries",
                  "1024", "name", "counts"],
                 ["map", "update", "pinned", pin, "key", "1", "0", "0", "0", "value", "42",
                  "0", "0", "0", "0", "0", "0", "0"]):
        result = venv_run(client_venv, daemon, bpffs, *argv)
        assert result.returncode == 0, result.stderr
    dump = venv_run(client_venv, daemon, bpffs, "map", "dump", "pinned", pin)
    assert dump.returncode == 0, dump.stderr
    assert dump.stdout.splitlines() == ["key: 01 00 00 00  value: 2a 00 00 00 00 00 00 00",
                                        "Found 1 element"]
    code = textwrap.dedent(f"""
        from bpffs.client import Map, IntCodec
        m = Map.pinned({pin!r}, key=IntCodec(4), value=IntCodec(8))
        m[2] = 7
        print(sorted(m.items()))
    """)
    result = venv_run(client_venv, daemon, str(client_venv / "bin" / "python3"), "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[(1, 42), (2, 7)]"
    os.unlink(pin)


def test_a_client_only_daemon_that_mounts_says_what_to_install(client_venv: Path,
                                                                daemon: DaemonProcess,
                                                                tmp_path: Path) -> None:
    """Without pyfuse3 `bpffsd` still serves with --no-mount; asked to mount, it says in one
    line which extra to install, not the mount worker's ModuleNotFoundError traceback."""
    result = venv_run(client_venv, daemon, str(client_venv / "bin" / "bpffsd"),
                      "--socket", str(tmp_path / "c.sock"), "--mount", str(tmp_path / "bpf"),
                      "--no-persist")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "bpffsd: mounting needs pyfuse3, which this install lacks: install the daemon extra"
        " (pip install 'bpffsd[daemon]', or run install.sh without --client), or start with"
        " --no-mount"]
