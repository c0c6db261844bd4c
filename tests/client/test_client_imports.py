"""The client side loads no daemon code: `bpffs version` reads the distribution's version
(pyproject.toml's, the one the daemon reports) instead of importing the daemon package."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version


def test_the_client_and_its_cli_load_no_daemon_code() -> None:
    code = ("import sys\n"
            "from bpffs.client import cli\n"
            "from bpffs.client.cli import map, pcap, prog\n"
            "from bpffs.client import libbpf, replay\n"
            "from bpffs.client.loader import collection, load\n"
            "assert cli.main(['version']) == 0\n"
            "print(sorted(m for m in sys.modules if m.startswith('bpffs.daemon')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.splitlines() == [f"bpffs v{version('bpffsd')}", "[]"], done.stdout
