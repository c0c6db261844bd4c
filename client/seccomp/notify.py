"""seccomp user notification: install a filter (ctypes), then RECV / SEND / ID_VALID / ADDFD on
its listener (fcntl.ioctl).

The kernel's structs are sized with SECCOMP_GET_NOTIF_SIZES, not with our headers: a newer
kernel may grow them, and RECV wants a zeroed buffer of its own size (EINVAL otherwise).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from dataclasses import dataclass
from typing import NamedTuple

from . import abi

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
# syscall(2) with n long arguments, one prototype per arity: converting the arguments
# (c_long objects made per call) was a third of an empty call's ~1.7 us
_SYSCALLS = [ctypes.CFUNCTYPE(ctypes.c_long, *[ctypes.c_long] * (n + 1), use_errno=True)(
    ("syscall", _libc)) for n in range(7)]


def syscall(nr: int, *args: int) -> int:
    """A raw syscall; OSError with its errno on failure."""
    r = _SYSCALLS[len(args)](nr, *args)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


@dataclass(frozen=True)
class NotifSizes:
    notif: int
    resp: int
    data: int


def notif_sizes() -> NotifSizes:
    """The running kernel's struct sizes (seccomp_notif, _resp, seccomp_data)."""
    buf = ctypes.create_string_buffer(abi.NOTIF_SIZES.size)
    syscall(abi.Nr.seccomp, abi.SECCOMP_GET_NOTIF_SIZES, 0, ctypes.addressof(buf))
    return NotifSizes(*abi.NOTIF_SIZES.unpack(buf.raw))


def install_filter(program: bytes) -> int:
    """In the process to supervise: no_new_privs (so an unprivileged caller may install a
    filter, and no setuid program escapes it), then the filter with a listener, waiting
    killably after RECV where the kernel knows that flag (5.19+; Go's SIGURG then cannot make
    a notified bpf() run twice). Returns the listener fd."""
    if _libc.prctl(abi.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(e)}")
    code = ctypes.create_string_buffer(program, len(program))
    fprog = ctypes.create_string_buffer(
        abi.SOCK_FPROG.pack(len(program) // abi.SOCK_FILTER.size, ctypes.addressof(code)))
    base = abi.SECCOMP_FILTER_FLAG_NEW_LISTENER
    for flags in (base | abi.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV, base):
        try:
            return syscall(abi.Nr.seccomp, abi.SECCOMP_SET_MODE_FILTER, flags,
                           ctypes.addressof(fprog))
        except OSError as e:
            if e.errno != errno.EINVAL or flags == base:
                raise
    raise AssertionError("unreachable")


class Notification(NamedTuple):
    """One intercepted syscall: its id, the calling thread (a TID in our pid namespace), the
    syscall and its six arguments as unsigned 64-bit values. (A tuple: made per notification,
    it costs a third of a frozen dataclass.)"""

    id: int
    pid: int
    nr: int
    arch: int
    ip: int
    args: tuple[int, ...]


class Listener:
    """The supervisor's side of a seccomp filter. The ioctls go through fcntl.ioctl on
    preallocated bytearrays: half of a ctypes call's ~1.2 us, five times per notification."""

    def __init__(self, fd: int):
        self.fd = fd
        sizes = notif_sizes()
        self._req = bytearray(max(sizes.notif, abi.NOTIF.size))
        self._zero = bytes(len(self._req))  # RECV wants a zeroed struct (EINVAL otherwise)
        self._resp = bytearray(max(sizes.resp, abi.NOTIF_RESP.size))
        self._addfd = bytearray(abi.NOTIF_ADDFD.size)
        self._id = bytearray(abi.U64.size)
        self.sync_wake_up = self._set_sync_wake_up()

    def _set_sync_wake_up(self) -> bool:
        """Ask the kernel (6.6+) to hand the CPU over at each RECV and SEND, as between the two
        ends of a synchronous call: the target waits for us and we for it, so waking either on
        another, idle CPU only adds that CPU's wake-up. Measured on the 2-core VM: a CONTINUEd
        call 60 -> 17 us, an intercepted lookup 121 -> 73 us. Older kernels: EINVAL, ignored."""
        try:
            fcntl.ioctl(self.fd, abi.SECCOMP_IOCTL_NOTIF_SET_FLAGS,
                        abi.SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)
        except OSError:
            return False
        return True

    def close(self) -> None:
        """Closing the last listener fails every pending and later notified call with ENOSYS."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def recv(self) -> Notification | None:
        """The next notification; None when its caller was interrupted or killed meanwhile."""
        self._req[:] = self._zero
        try:
            fcntl.ioctl(self.fd, abi.SECCOMP_IOCTL_NOTIF_RECV, self._req, True)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EINTR):
                return None
            raise OSError(e.errno, f"SECCOMP_IOCTL_NOTIF_RECV: {e.strerror}") from None
        nid, pid, _flags, nr, arch, ip, *args = abi.NOTIF.unpack_from(self._req)
        return Notification(nid, pid, nr, arch, ip, tuple(args))

    def id_valid(self, nid: int) -> bool:
        """Whether the caller still waits for this notification: checked after every read of
        its memory, before acting on what was read (the kernel's TOCTOU rule)."""
        abi.U64.pack_into(self._id, 0, nid)
        try:
            fcntl.ioctl(self.fd, abi.SECCOMP_IOCTL_NOTIF_ID_VALID, self._id, False)
        except OSError:
            return False
        return True

    def send(self, nid: int, val: int = 0, error: int = 0, flags: int = 0) -> bool:
        """Answer: val, or -error (a positive errno). False when the caller is gone."""
        abi.NOTIF_RESP.pack_into(self._resp, 0, nid, val, -error if error else 0, flags)
        try:
            fcntl.ioctl(self.fd, abi.SECCOMP_IOCTL_NOTIF_SEND, self._resp, False)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False
            raise OSError(e.errno, f"SECCOMP_IOCTL_NOTIF_SEND: {e.strerror}") from None
        return True

    def send_continue(self, nid: int) -> bool:
        """Let the kernel run the call (for what is not ours: the kernel re-reads its
        arguments, so this is never a decision about memory we read)."""
        return self.send(nid, flags=abi.SECCOMP_USER_NOTIF_FLAG_CONTINUE)

    def addfd_send(self, nid: int, fd: int, cloexec: bool = True) -> int | None:
        """Install our fd in the caller and answer its call with the new number, atomically
        (no fd lands in a caller that went away). None when the caller is gone."""
        abi.NOTIF_ADDFD.pack_into(self._addfd, 0, nid, abi.SECCOMP_ADDFD_FLAG_SEND, fd, 0,
                                  os.O_CLOEXEC if cloexec else 0)
        try:
            return fcntl.ioctl(self.fd, abi.SECCOMP_IOCTL_NOTIF_ADDFD, self._addfd, True)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise OSError(e.errno, f"SECCOMP_IOCTL_NOTIF_ADDFD: {e.strerror}") from None
