"""Where the daemon listens and mounts by default: shared by the daemon, the client and the CLI.

Root gets the system locations; anyone else a per-user directory, so `bpffsd` works unprivileged
with no options. BPFFS_SOCKET overrides the socket path for every tool.
"""

from __future__ import annotations

import os
from pathlib import Path

SYSTEM_SOCKET = "/run/bpffsd/control.sock"
SYSTEM_MOUNT = "/sys/fs/bpf"
SYSTEM_STATE_DIR = "/var/lib/bpffsd"


def _user_runtime_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.access(runtime, os.W_OK):
        return Path(runtime) / "bpffsd"
    return Path(f"/tmp/bpffsd-{os.getuid()}")


def default_socket() -> str:
    env = os.environ.get("BPFFS_SOCKET")
    if env:
        return env
    return SYSTEM_SOCKET if os.geteuid() == 0 else str(_user_runtime_dir() / "control.sock")


def default_mount() -> str:
    return SYSTEM_MOUNT if os.geteuid() == 0 else str(_user_runtime_dir() / "bpf")


def default_state_dir() -> str:
    if os.geteuid() == 0:
        return SYSTEM_STATE_DIR
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return str(Path(state) / "bpffsd")
