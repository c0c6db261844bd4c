"""Where the daemon listens and mounts by default: shared by the daemon, the client and the CLI.

Root gets the system locations; anyone else a per-user directory, so `bpffsd` works unprivileged
with no options. BPFFS_SOCKET overrides the socket path for every tool. Clients look further
than the daemon listens (client_sockets): a non-root user with no daemon of their own reaches
the system daemon, whose socket is world-connectable (each operation checks SO_PEERCRED).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SYSTEM_SOCKET = "/run/bpffsd/control.sock"
SYSTEM_MOUNT = "/sys/fs/bpf"
# Root's default mount where the kernel's own bpffs already holds /sys/fs/bpf (every systemd
# host: PID 1 mounts it at boot). Containers get it bind-mounted at their /sys/fs/bpf.
SYSTEM_ALT_MOUNT = "/run/bpffsd/bpf"
SYSTEM_STATE_DIR = "/var/lib/bpffsd"


def _user_runtime_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.access(runtime, os.W_OK):
        return Path(runtime) / "bpffsd"
    return Path(f"/tmp/bpffsd-{os.getuid()}")


def default_socket() -> str:
    """Where a daemon started with no options listens: $BPFFS_SOCKET, else the system socket
    for root and the per-user one for anyone else."""
    env = os.environ.get("BPFFS_SOCKET")
    if env:
        return env
    return SYSTEM_SOCKET if os.geteuid() == 0 else str(_user_runtime_dir() / "control.sock")


def client_sockets() -> list[str]:
    """The sockets a client tries, in order: $BPFFS_SOCKET alone when set; else the caller's
    own daemon's socket when it exists, then the system daemon's (root: the system one only).
    A non-root user thus finds the system daemon without setting anything."""
    env = os.environ.get("BPFFS_SOCKET")
    if env:
        return [env]
    if os.geteuid() == 0:
        return [SYSTEM_SOCKET]
    own = str(_user_runtime_dir() / "control.sock")
    return [own, SYSTEM_SOCKET] if os.path.exists(own) else [SYSTEM_SOCKET, own]


def default_mount(system_mount: str = SYSTEM_MOUNT) -> str:
    """Where a daemon started with no options mounts. Root: /sys/fs/bpf, unless the kernel's
    own bpffs is mounted there (a systemd host), which ours must never shadow: then
    /run/bpffsd/bpf. (system_mount: the path checked, for tests.)"""
    if os.geteuid() != 0:
        return str(_user_runtime_dir() / "bpf")
    return SYSTEM_ALT_MOUNT if kernel_bpffs_at(system_mount) else system_mount


def kernel_bpffs_at(path: str, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Whether the filesystem on top at `path` is the kernel's bpffs (type "bpf" in
    mountinfo; bpftool and libbpf check the same thing as statfs f_type BPF_FS_MAGIC).
    Read from mountinfo rather than statfs, which could block on a hung FUSE mount there."""
    target = os.fsencode(os.path.normpath(os.path.abspath(path)))
    at_path: dict[bytes, tuple[bytes, bytes]] = {}  # mount id -> (parent id, fs type)
    try:
        with open(mountinfo, "rb") as f:
            for line in f:
                fields, _, rest = line.partition(b" - ")
                parts = fields.split()
                if len(parts) < 5 or not rest:
                    continue
                point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]),
                               parts[4])
                if point == target:
                    at_path[parts[0]] = (parts[1], rest.split()[0])
    except OSError:
        return False
    # The one on top is the mount at this path that no other mount at this path sits on.
    parents = {parent for parent, _ in at_path.values()}
    on_top = [fstype for mount_id, (_, fstype) in at_path.items() if mount_id not in parents]
    return bool(on_top) and on_top[-1] == b"bpf"


def default_state_dir() -> str:
    """Where a daemon started with no options keeps its journal and snapshot."""
    if os.geteuid() == 0:
        return SYSTEM_STATE_DIR
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return str(Path(state) / "bpffsd")
