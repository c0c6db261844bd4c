"""One supervised thread, as the handlers see it: its memory, its fds and its paths.

Every read of the target's memory may be stale by the time it is used (a signal handler can
reuse the stack), so the handlers call `check()` (SECCOMP_IOCTL_NOTIF_ID_VALID) between reading
and acting, and `write` checks again right before it writes. Memory goes through a
/proc/TID/mem fd opened once per thread, beside a PIDFD_THREAD pidfd of that thread, and
validated with ID_VALID after both opens (so both name the caller, not a recycled TID).

A cached entry is keyed by TID, but a TID is a thread's only while it lives: once it exits,
the TID may name a thread of another process, while the old mem fd still maps the old
process's memory as long as that process lives (its other threads keep the mm). So before a
notification uses any cached entry (mem fd, pidfd, tgid) a zero-timeout poll on the cached
thread pidfd (one syscall) tells whether that thread exited: then every entry of the TID is
dropped and opened again. No race: the caller holds the TID, so a thread that held it before
has exited by the time we poll.
(Before 6.9 there are no thread pidfds, and nothing is reused across notifications.)

After an execve the old fd reads and writes nothing, never the new image's bytes: so a cached
fd of a live thread is used as it is, and only when an access through it fails does a one-byte
probe at the notification's instruction pointer (mapped in the current image) tell a stale fd,
opened again, from a bad pointer. (Probing before every use cost a syscall per notification.)
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import stat
from dataclasses import dataclass

from bpffs.vm.uapi import PAGE_SIZE

from . import abi
from .notify import Listener, Notification, syscall


class Fault(Exception):
    """The target named memory that cannot be read or written: the kernel answers EFAULT."""


def read_status(tid: int) -> dict[bytes, bytes]:
    """/proc/TID/status, field -> value (OSError when the thread is not there)."""
    with open(f"/proc/{tid}/status", "rb") as f:
        return {key: value.strip() for key, _, value in (line.partition(b":") for line in f)}


class Gone(Exception):
    """The notification is no longer valid (the target was killed or interrupted): no answer
    is sent, and nothing read from its memory may be acted on."""


class Threads:
    """Per-thread handles shared by the notifications of one listener: /proc/TID/mem fds,
    pidfds and thread-group ids. A cache keyed by TID: an entry is used only after `valid`
    says its thread still lives (a TID is reused once its thread exits), and dropped when
    found stale."""

    LIMIT = 512  # cached threads; beyond this the caches start again (threads come and go)

    def __init__(self) -> None:
        self.mem: dict[int, int] = {}
        self.pidfds: dict[int, int] = {}
        self.tgids: dict[int, int] = {}
        self.pidfd_info = True  # PIDFD_GET_INFO works (6.13+) until the kernel says otherwise
        self.pidfd_thread = True  # PIDFD_THREAD works (6.9+) until the kernel says otherwise
        self.info_buf = bytearray(abi.PIDFD_INFO.size)
        own = os.stat("/proc/self/ns/user")
        self.user_ns = (own.st_dev, own.st_ino)

    def forget(self, tid: int) -> None:
        for table in (self.mem, self.pidfds):
            fd = table.pop(tid, None)
            if fd is not None:
                os.close(fd)
        self.tgids.pop(tid, None)

    def valid(self, tid: int) -> bool:
        """Whether tid's cached entries (if any) are still its current thread's; if not they
        are dropped. The thread pidfd cached beside them is polled: readable once the thread
        it names exited, after which the TID may be another process's thread."""
        pidfd = self.pidfds.get(tid)
        if pidfd is None:
            if tid not in self.mem and tid not in self.tgids:
                return True  # nothing cached
        elif self.pidfd_thread:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            if not poller.poll(0):
                return True  # the thread that held the TID when cached still lives
        self.forget(tid)  # exited, a process pidfd (before 6.9), or entries without a pidfd
        return False

    def close(self) -> None:
        for tid in list({*self.mem, *self.pidfds, *self.tgids}):
            self.forget(tid)

    def trim(self) -> None:
        if len(self.mem) + len(self.pidfds) > self.LIMIT:
            self.close()


@dataclass(frozen=True)
class Privileges:
    """What the kernel's permission checks look at in a caller: its effective capabilities
    (none outside our user namespace: they do not count in ours, where bpffsd's root is) and
    its filesystem ids."""

    caps: int
    fsuid: int
    fsgid: int
    groups: frozenset[int]

    def capable(self, *any_of: int) -> bool:
        return any(self.caps >> cap & 1 for cap in any_of)

    def permits(self, st: os.stat_result, want: int) -> bool:
        """generic_permission() on a file with st (want: os.R_OK | W_OK | X_OK bits)."""
        if self.capable(abi.CAP_DAC_OVERRIDE) and (not want & os.X_OK or stat.S_ISDIR(
                st.st_mode) or st.st_mode & 0o111):
            return True
        if self.fsuid == st.st_uid:
            bits = st.st_mode >> 6
        elif self.fsgid == st.st_gid or st.st_gid in self.groups:
            bits = st.st_mode >> 3
        else:
            bits = st.st_mode
        if bits & want == want:
            return True
        # CAP_DAC_READ_SEARCH: read any file, read and search any directory
        return self.capable(abi.CAP_DAC_READ_SEARCH) and not want & os.W_OK and (
            stat.S_ISDIR(st.st_mode) or not want & os.X_OK)


class Target:
    """The caller of one notification."""

    def __init__(self, listener: Listener, notif: Notification, threads: Threads):
        self.listener = listener
        self.notif = notif
        self.tid = notif.pid
        self.threads = threads
        self._mem_fd: int | None = None
        self._mem_probed = False
        self._privileges: Privileges | None = None
        self._status: dict[bytes, bytes] | None = None
        self._validated = False

    def _cached(self) -> None:
        """Before the first use of a cached entry in this notification: drop the TID's
        entries if the thread they were made for exited (then the TID may be this caller's
        while the old entries name another process)."""
        if not self._validated:
            self._validated = True
            self.threads.valid(self.tid)

    def _unreachable(self, what: str, e: OSError | None = None) -> OSError:
        """The error for a caller we cannot reach (its memory or fds): Gone when the
        notification went away meanwhile, else EPERM (a caller outside our pid namespace, or
        one that made itself non-dumpable). Never silence: a caller not answered hangs."""
        self.check()
        reason = e.strerror if e is not None else "not visible in our pid namespace"
        return OSError(errno.EPERM, f"cannot reach the caller's {what}: {reason}")

    # -- validity -------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise Gone unless the caller still waits for this notification."""
        if not self.listener.id_valid(self.notif.id):
            raise Gone

    # -- memory ---------------------------------------------------------------------------------
    def _mem(self) -> int:
        if self._mem_fd is not None:
            return self._mem_fd
        self._cached()
        fd = self.threads.mem.get(self.tid)
        if fd is not None:
            self._mem_fd = fd
            self._mem_probed = False  # a cached fd: probed if an access through it fails
            return fd
        return self._open_mem()

    def _stale(self) -> bool:
        """After a failed access through a cached fd: whether the fd is stale (then it is
        opened again, and the access retried), rather than the address bad."""
        if self._mem_probed:
            return False
        self._mem_probed = True
        try:
            if len(os.pread(self._mem(), 1, self.notif.ip)) == 1:
                return False
        except OSError:
            pass
        self.threads.forget(self.tid)  # the thread exec'd (or the TID was reused)
        self._mem_fd = None  # closed by forget
        self._open_mem()
        return True

    def _open_mem(self) -> int:
        self.threads.trim()
        if self.tid == 0:
            raise self._unreachable("memory")
        self._pidfd()  # cached beside the mem fd: it tells when the thread exits (valid)
        try:
            fd = os.open(f"/proc/{self.tid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise self._unreachable("memory", e) from None
        try:
            self.check()  # the fd is the caller's only if the notification outlived the open
        except Gone:
            os.close(fd)
            raise
        self.threads.mem[self.tid] = self._mem_fd = fd
        self._mem_probed = True  # opened for this notification: it is the caller's
        return fd

    def read(self, addr: int, size: int) -> bytes:
        """size bytes at addr, or Fault (NULL, unmapped, or not a user address)."""
        if size == 0:
            return b""
        if addr == 0 or addr + size > abi.USER_ADDRESS_END:
            raise Fault
        while True:
            try:
                data = os.pread(self._mem(), size, addr)
            except OSError:
                data = b""
            if len(data) == size:
                return data
            if not self._stale():
                raise Fault

    def read_string(self, addr: int, limit: int = abi.PATH_MAX) -> bytes:
        """A NUL-terminated string, page by page (a string ending just before an unmapped page
        is not a fault, as strncpy_from_user); ENAMETOOLONG when no NUL comes within limit."""
        out = b""
        while len(out) < limit:
            chunk = min(PAGE_SIZE - addr % PAGE_SIZE, limit - len(out))
            data = self.read(addr, chunk)
            nul = data.find(b"\0")
            if nul >= 0:
                return out + data[:nul]
            out += data
            addr += chunk
        raise OSError(errno.ENAMETOOLONG, "name too long")

    def write(self, addr: int, data: bytes) -> None:
        """Write into a buffer the target's own attr named, after checking it still waits.
        (/proc/TID/mem writes through read-only mappings where copy_to_user would EFAULT.)"""
        if not data:
            return
        if addr == 0 or addr + len(data) > abi.USER_ADDRESS_END:
            raise Fault
        self.check()
        while True:
            try:
                n = os.pwrite(self._mem(), data, addr)
            except OSError:
                n = 0
            if n == len(data):
                return
            if not self._stale():
                raise Fault

    def same_credentials(self) -> bool:
        """Whether the caller still has the user and group `bpffs exec` was started with. The
        supervisor acts with those (it is their bpffsd client); a caller that dropped them
        (no_new_privs lets it only drop) must not act with them through us."""
        return self._effective_ids() == (os.geteuid(), os.getegid())

    def _effective_ids(self) -> tuple[int, int]:
        """(euid, egid): PIDFD_GET_INFO on the thread's cached pidfd (one ioctl, and exact for
        a non-dumpable caller too), else the owner of /proc/TID, which is the task's effective
        ids (root's when it made itself non-dumpable)."""
        buf = self.threads.info_buf
        for attempt in (0, 1):
            if not self.threads.pidfd_info:
                break
            abi.U64.pack_into(buf, 0, abi.PIDFD_INFO_CREDS)  # the mask asked for
            try:
                fcntl.ioctl(self._pidfd(), abi.PIDFD_GET_INFO, buf, True)
            except OSError as e:
                if e.errno == errno.ESRCH and not attempt:
                    self.threads.forget(self.tid)  # a cached pidfd of a dead thread
                    continue
                if e.errno in (errno.EINVAL, errno.ENOTTY):
                    self.threads.pidfd_info = False  # before 6.13
                    break
                raise self._unreachable("credentials", e) from None
            info = abi.PIDFD_INFO.unpack_from(buf)
            return info[abi.PIDFD_INFO_EUID], info[abi.PIDFD_INFO_EUID + 1]
        try:
            st = os.stat(f"/proc/{self.tid}")
        except OSError as e:
            raise self._unreachable("credentials", e) from None
        return st.st_uid, st.st_gid

    def status(self) -> dict[bytes, bytes]:
        """The caller's /proc/TID/status, field -> value, read once for this notification
        (credentials, Tgid, Umask); OSError when it cannot be read. What is read is the
        waiting caller's only once check() has passed after it."""
        if self._status is None:
            self._status = read_status(self.tid)
        return self._status

    def privileges(self) -> Privileges:
        """The caller's capabilities and filesystem ids, read from /proc/TID/status while it
        waits for us (a thread's credentials change only by its own calls, so they are what
        its bpf() would be checked with), then validated: the TID was not reused meanwhile."""
        if self._privileges is not None:
            return self._privileges
        try:
            fields = self.status()
            ns = os.stat(f"/proc/{self.tid}/ns/user")
        except OSError as e:
            raise self._unreachable("credentials", e) from None
        self.check()
        ours = (ns.st_dev, ns.st_ino) == self.threads.user_ns
        self._privileges = Privileges(
            int(fields[b"CapEff"], 16) if ours else 0, int(fields[b"Uid"].split()[3]),
            int(fields[b"Gid"].split()[3]), frozenset(map(int, fields[b"Groups"].split())))
        return self._privileges

    # -- fds and paths --------------------------------------------------------------------------
    def _pidfd(self) -> int:
        self._cached()
        fd = self.threads.pidfds.get(self.tid)
        if fd is None:
            if self.tid == 0:
                raise self._unreachable("fds")
            try:
                fd = None
                if self.threads.pidfd_thread:
                    try:
                        fd = syscall(abi.Nr.pidfd_open, self.tid, abi.PIDFD_THREAD)
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            raise
                        self.threads.pidfd_thread = False
                if fd is None:
                    fd = syscall(abi.Nr.pidfd_open, self.tgid, 0)  # before 6.9: the leader
            except OSError as e:
                raise self._unreachable("fds", e) from None
            try:
                self.check()
            except Gone:
                os.close(fd)
                raise
            self.threads.pidfds[self.tid] = fd
        return fd

    def getfd(self, number: int) -> int:
        """A dup of the target's fd `number` (ours to close): EBADF when it has none."""
        if not 0 <= number <= abi.INT_MAX:
            raise OSError(errno.EBADF, f"fd {number} is not open")
        for attempt in (0, 1):
            try:
                return syscall(abi.Nr.pidfd_getfd, self._pidfd(), number, 0)
            except OSError as e:
                if e.errno == errno.ESRCH and not attempt:
                    self.threads.forget(self.tid)  # a cached pidfd of a dead thread
                    continue
                if e.errno in (errno.ESRCH, errno.EPERM):
                    raise self._unreachable("fds", e) from None
                raise
        raise AssertionError("unreachable")

    @property
    def tgid(self) -> int:
        """The caller's process (for /proc/PID/... paths naming it)."""
        self._cached()
        tgid = self.threads.tgids.get(self.tid)
        if tgid is None:
            try:
                tgid = int(self.status().get(b"Tgid", self.tid))
            except OSError as e:
                raise self._unreachable("process", e) from None
            if self.threads.pidfd_thread and self.tid not in self.threads.pidfds:
                try:
                    self._pidfd()  # beside the tgid: it tells when the thread exits (valid)
                except OSError:
                    return tgid  # not cached: valid would drop a tgid without a pidfd
            self.threads.tgids[self.tid] = tgid
        return tgid

    def resolve(self, path: bytes, dirfd: int = abi.AT_FDCWD, follow: bool = True) -> int:
        """An O_PATH fd for the caller's path, resolved in its own root and cwd (or dirfd):
        absolute paths from /proc/TID/root with RESOLVE_IN_ROOT, so '..' and absolute
        symlinks stay inside a container's root. Caveat: an absolute symlink met on a
        relative walk resolves against our root."""
        if not path:
            raise OSError(errno.ENOENT, "empty path")
        resolve = 0
        if path.startswith(b"/"):
            base, resolve = os.open(f"/proc/{self.tid}/root", abi.O_PATH | os.O_CLOEXEC), \
                abi.RESOLVE_IN_ROOT
        elif dirfd == abi.AT_FDCWD:
            base = os.open(f"/proc/{self.tid}/cwd", abi.O_PATH | os.O_CLOEXEC)
        else:
            base = self.getfd(dirfd)
        flags = abi.O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
        how = ctypes.create_string_buffer(abi.OPEN_HOW.pack(flags, 0, resolve))
        name = ctypes.create_string_buffer(path)
        try:
            return syscall(abi.Nr.openat2, base, ctypes.addressof(name), ctypes.addressof(how),
                           abi.OPEN_HOW.size)
        finally:
            os.close(base)

