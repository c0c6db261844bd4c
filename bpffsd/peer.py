"""Who is calling: credentials taken from the connection itself (SO_PEERCRED), never from
anything the client says, and the limits that follow from them.

Everything about the caller is captured when the connection is accepted: its uid and gid
(SO_PEERCRED), its supplementary groups (SO_PEERGROUPS), and, from the process that connected,
its RLIMIT_MEMLOCK, mount namespace and start time. That process may exit afterwards (connect
in a child that exits, use the socket in the parent), and its pid may come to belong to
another process: so its limit is read again at a charge, as the kernel reads current's, only
while the pid still names the same process (same start time); otherwise the limit captured at
accept holds. A non-root caller whose process cannot be read at accept time is refused (the
server answers EPERM and hangs up): falling back to the daemon's own limit would give it the
daemon's (unlimited) memlock.
"""

from __future__ import annotations

import array
import errno
import os
import resource
import select
import socket
import struct
from dataclasses import dataclass, field

from bpffs.vm.errors import BpfError
from bpffs.vm.uapi import PAGE_SIZE

_UCRED = struct.Struct("iII")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
_MEMLOCK_LINE = "Max locked memory"  # RLIMIT_MEMLOCK's row in /proc/PID/limits
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5
_GID = array.array("I").itemsize
NGROUPS_MAX = 65536


@dataclass(frozen=True)
class Peer:
    pid: int  # 0 when the caller lives in a pid namespace the daemon cannot see
    uid: int
    gid: int
    supplementary: frozenset[int] = frozenset()  # SO_PEERGROUPS at connect time
    memlock: int | None = None  # soft RLIMIT_MEMLOCK in bytes (RLIM_INFINITY); None: unknown
    mnt_ns: int | None = None  # inode of the connecting process's mount namespace; None: unknown
    start_time: int | None = None  # of the connecting process (/proc/PID/stat), to know it again
    unreadable: str | None = field(default=None, compare=False)  # why memlock is unknown

    @staticmethod
    def uid_of(sock: socket.socket) -> int:
        """Just the uid (SO_PEERCRED): what the connection limit needs, before anything
        costlier is read."""
        return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                             _UCRED.size))[1]

    @classmethod
    def of(cls, sock: socket.socket) -> Peer:
        """Credentials captured when the peer connected (or created the socketpair), and what
        the connecting process's limits were when the connection was accepted."""
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        pid, uid, gid = _UCRED.unpack(raw)
        groups = _peer_groups(sock)
        memlock, mnt_ns, start, why = _read_process(sock, pid, uid)
        return cls(pid, uid, gid, groups, memlock, mnt_ns, start, why)

    @property
    def privileged(self) -> bool:
        """Stands in for capable(CAP_SYS_ADMIN): root in the daemon's user namespace."""
        return self.uid == 0

    def groups(self) -> frozenset[int]:
        """Supplementary groups, as the connecting process had them (SO_PEERGROUPS)."""
        return self.supplementary

    def refusal(self) -> BpfError | None:
        """Why this caller may not use the daemon at all (None: it may): a non-root caller
        whose RLIMIT_MEMLOCK could not be read when it connected."""
        if self.unreadable is None or self.privileged:
            return None
        return BpfError(errno.EPERM, f"bpffsd cannot read the limits of the process that"
                        f" connected (pid {self.pid}: {self.unreadable}), so it cannot charge"
                        " its memlock; connect from the process that uses the connection,"
                        " and keep it running")

    def memlock_limit_pages(self) -> int | None:
        """The caller's RLIMIT_MEMLOCK in pages (None: unlimited): the connecting process's
        limit now if it still runs (a prlimit since counts, as on the kernel), else as it was
        at accept. Only root falls back to the daemon's own limit when it could not be read
        at accept; anyone else is refused (EPERM)."""
        soft = self.memlock
        if soft is not None and self.start_time is not None:
            now = _memlock_soft(self.pid)
            if now is not None and _start_time(self.pid) == self.start_time:
                soft = now  # read while the pid was still the connecting process
        if soft is None:
            refusal = self.refusal()
            if refusal is not None:
                raise refusal
            soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        return None if soft == resource.RLIM_INFINITY else soft // PAGE_SIZE


def _peer_groups(sock: socket.socket) -> frozenset[int]:
    """SO_PEERGROUPS: the supplementary groups the peer had at connect(). Empty when the
    kernel cannot tell (then only the primary gid counts: the safe side)."""
    for size in (64 * _GID, NGROUPS_MAX * _GID):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == errno.ERANGE:
                continue
            return frozenset()
        gids = array.array("I")
        gids.frombytes(raw[: len(raw) - len(raw) % _GID])
        return frozenset(gids)
    return frozenset()


def _read_process(sock: socket.socket, pid: int, uid: int
                  ) -> tuple[int | None, int | None, int | None, str | None]:
    """(memlock soft limit, mount namespace inode, start time, why the limit is unknown) of
    the process that connected. Its pid is pinned by SO_PEERPIDFD where the kernel has it
    (6.5): what /proc/PID said counts only if that very process is still alive after
    reading it.
    Without it, the process read must at least run as the caller's uid (a pid reused by
    someone else's process must not lend its limits)."""
    if not pid:
        return None, None, None, "its pid namespace is not visible to bpffsd"
    pidfd = None
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as e:
        if e.errno == errno.ESRCH:
            return None, None, None, "it has exited"
    try:
        start = _start_time(pid)
        soft = _memlock_soft(pid)
        try:
            mnt_ns: int | None = os.stat(f"/proc/{pid}/ns/mnt").st_ino
        except OSError:
            mnt_ns = None
        if pidfd is not None:
            poll = select.poll()
            poll.register(pidfd, select.POLLIN)
            if poll.poll(0):  # readable: the process has exited
                return None, None, None, "it has exited"
        elif _euid(pid) != uid:
            return None, None, None, "it has exited (the pid now runs as another user)"
        if soft is None or start is None:
            return None, mnt_ns, None, "it has exited or its limits are not readable"
        return soft, mnt_ns, start, None
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot): with the pid, it names one process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _euid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[2])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _memlock_soft(pid: int) -> int | None:
    """prlimit(2) on another user's process needs CAP_SYS_RESOURCE, which containers often
    drop (root without it would silently apply its own limit to everyone); /proc/PID/limits
    says the same to anyone."""
    try:
        return resource.prlimit(pid, resource.RLIMIT_MEMLOCK)[0]
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith(_MEMLOCK_LINE):
                    soft = line[len(_MEMLOCK_LINE):].split()[0]
                    return resource.RLIM_INFINITY if soft == "unlimited" else int(soft)
    except (OSError, ValueError, IndexError):
        pass
    return None
