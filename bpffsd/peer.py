"""Who is calling: credentials taken from the connection itself (SO_PEERCRED), never from
anything the client says, and the limits that follow from them."""

from __future__ import annotations

import resource
import socket
import struct
from dataclasses import dataclass

from bpffs.vm.uapi import PAGE_SIZE

_UCRED = struct.Struct("iII")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
_MEMLOCK_LINE = "Max locked memory"  # RLIMIT_MEMLOCK's row in /proc/PID/limits


@dataclass(frozen=True)
class Peer:
    pid: int  # 0 when the caller lives in a pid namespace the daemon cannot see
    uid: int
    gid: int

    @classmethod
    def of(cls, sock: socket.socket) -> Peer:
        """Credentials captured when the peer connected (or created the socketpair)."""
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        return cls(*_UCRED.unpack(raw))

    @property
    def privileged(self) -> bool:
        """Stands in for capable(CAP_SYS_ADMIN): root in the daemon's user namespace."""
        return self.uid == 0

    def groups(self) -> frozenset[int]:
        """Supplementary groups, read from /proc (empty when the process is not visible)."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("Groups:"):
                        return frozenset(int(g) for g in line.split()[1:])
        except OSError:
            pass
        return frozenset()

    def memlock_limit_pages(self) -> int | None:
        """The caller's RLIMIT_MEMLOCK in pages (None: unlimited), read from the process that
        connected; the daemon's own limit when that process is gone or invisible."""
        soft = self._memlock_soft() if self.pid else None
        if soft is None:
            soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        return None if soft == resource.RLIM_INFINITY else soft // PAGE_SIZE

    def _memlock_soft(self) -> int | None:
        """prlimit(2) on another user's process needs CAP_SYS_RESOURCE, which containers
        often drop (root without it would silently apply its own limit to everyone);
        /proc/PID/limits says the same to anyone."""
        try:
            return resource.prlimit(self.pid, resource.RLIMIT_MEMLOCK)[0]
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        try:
            with open(f"/proc/{self.pid}/limits") as f:
                for line in f:
                    if line.startswith(_MEMLOCK_LINE):
                        soft = line[len(_MEMLOCK_LINE):].split()[0]
                        return resource.RLIM_INFINITY if soft == "unlimited" else int(soft)
        except (OSError, ValueError, IndexError):
            pass
        return None
