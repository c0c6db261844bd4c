"""How the daemon starts its worker processes (mount workers, the seccomp agent).

`python -m MODULE` puts the current directory first on sys.path, and the daemon's current
directory is wherever it was started: a `bpffs/` planted there would run as root in place of
ours. Workers run with -P (Python 3.11: no such entry) and find our package where the daemon
itself found it, through PYTHONPATH (an install or a checkout alike).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import bpffs

PACKAGE_ROOT = str(Path(bpffs.__file__).resolve().parents[1])  # the folder holding bpffs/


def module_command(module: str) -> list[str]:
    """The command line that runs `module` as a worker."""
    return [sys.executable, "-P", "-m", module]


def worker_env() -> dict[str, str]:
    """The daemon's environment, with our package first on the worker's module path."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": PACKAGE_ROOT + (os.pathsep + path if path else "")}
