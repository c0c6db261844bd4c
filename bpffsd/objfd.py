"""Object fds: one user reference each, carried by a real file descriptor.

An fd handed to a client is one end of a socketpair; the daemon keeps the other end and
watches it. dup, fork and SCM_RIGHTS share the client's end like any fd, and when the last
copy anywhere closes (or its holder dies, SIGKILL included) the daemon's end sees end-of-file
and drops the reference. A client proves it holds an object fd by sending it once per
connection ("bind"), after which requests name it by a handle, its socket inode number.

The fd sent is recognised by its SO_COOKIE, never by its inode: inode numbers are not unique
across filesystems (a tmpfs file can have any socket's number), while a socket cookie is the
kernel's 64-bit id of that one socket. getsockopt() also never reaches a filesystem, so a
client cannot make the event loop wait on a FUSE mount (our own, maybe) with what it sends.
Each fd is charged to the uid it was made for (limits.caller_uid), as RLIMIT_NOFILE would.

Perf event objects also use their socket as the event channel: the daemon writes each sample
to its end, the holder reads it from the fd.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import socket
import struct
from dataclasses import dataclass

import trio

from bpffs.vm.errors import BpfError

from .limits import Limits, caller_uid
from .store import BpfObject, Store

log = logging.getLogger(__name__)

SO_COOKIE = getattr(socket, "SO_COOKIE", 57)  # Linux 4.12+; Python's socket may lack it
_COOKIE = struct.Struct("=Q")
_libc = ctypes.CDLL(None, use_errno=True)
_getsockopt = _libc.getsockopt
_getsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                        ctypes.POINTER(ctypes.c_uint32)]


def socket_cookie(fd: int) -> int:
    """SO_COOKIE of the socket an fd refers to, by fd number: no socket object (Python's
    would probe the fd and take ownership of it), no stat. OSError as getsockopt(2) fails:
    ENOTSOCK for any other file, EBADF for an O_PATH fd."""
    buf = ctypes.create_string_buffer(_COOKIE.size)
    size = ctypes.c_uint32(_COOKIE.size)
    if _getsockopt(fd, socket.SOL_SOCKET, SO_COOKIE, buf, ctypes.byref(size)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return _COOKIE.unpack(buf.raw)[0]


@dataclass(eq=False)
class ObjectFd:
    obj: BpfObject
    ino: int  # inode of the client's end: the handle requests use
    sock: socket.socket  # the daemon's end
    flags: int = 0  # ObjFlag.RDONLY / WRONLY, as the fd was opened (BPF_OBJ_GET file_flags)
    closed: bool = False
    cookie: int = 0  # SO_COOKIE of the client's end: how a bound fd is recognised
    uid: int | None = None  # charged to this uid (None: not charged)


class ObjectFds:
    def __init__(self, store: Store, limits: Limits):
        self.store = store
        self.limits = limits
        self.by_ino: dict[int, ObjectFd] = {}
        self.by_cookie: dict[int, ObjectFd] = {}
        self._of_object: dict[BpfObject, set[ObjectFd]] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Own the watcher tasks; on cancellation every watcher closes its reference."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def open(self, obj: BpfObject, flags: int = 0) -> tuple[ObjectFd, socket.socket]:
        """A new fd reference on obj. Returns it and the client's end: send that, then close
        it. EMFILE when the caller's uid holds as many as it may."""
        uid = caller_uid.get()
        if uid is not None:
            self.limits.charge(self.limits.fds, uid)
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except BaseException as e:
            if uid is not None:
                self.limits.fds.uncharge(uid)
            if isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE):
                # The daemon's own table is full: to its callers, a system-wide limit.
                log.warning("out of fds for object fds: %s", e.strerror)
                raise BpfError(errno.ENFILE, f"bpffsd is out of file descriptors"
                               f" ({e.strerror}): close some object fds") from None
            raise
        ours.setblocking(False)
        ref = ObjectFd(obj, os.fstat(theirs.fileno()).st_ino, ours, int(flags),
                       cookie=socket_cookie(theirs.fileno()), uid=uid)
        self.store.hold(obj, user=True)
        self.by_ino[ref.ino] = ref
        self.by_cookie[ref.cookie] = ref
        self._of_object.setdefault(obj, set()).add(ref)
        assert self._nursery is not None, "ObjectFds.run() is not running"
        self._nursery.start_soon(self._watch, ref)
        return ref, theirs

    def resolve(self, ino: int) -> ObjectFd:
        ref = self.by_ino.get(ino)
        if ref is None or ref.closed:
            raise BpfError(errno.EBADF, f"handle {ino} is not an open bpffs object fd")
        return ref

    def identify(self, fd: int) -> ObjectFd:
        """The object fd a client sent, by its socket cookie (see the module's doc): EINVAL
        for a file that is no socket (the kernel's answer to a map fd that is no map), EBADF
        for an O_PATH fd or a socket that is no live object fd of this daemon."""
        try:
            cookie = socket_cookie(fd)
        except OSError as e:
            if e.errno == errno.ENOTSOCK:
                raise BpfError(errno.EINVAL, "the fd sent is not a bpffs object fd") from None
            raise BpfError(errno.EBADF, f"the fd sent is not a bpffs object fd: {e.strerror}"
                           " (an O_PATH fd?)") from None
        ref = self.by_cookie.get(cookie)
        if ref is None or ref.closed:
            raise BpfError(errno.EBADF, "the fd sent is not an object fd of this bpffsd:"
                           " if it came from an earlier bpffsd, that daemon has exited"
                           " (restarted?); get the object again from its pin")
        return ref

    async def _watch(self, ref: ObjectFd) -> None:
        try:
            while not ref.closed:  # reap() may close it before this task first runs
                await trio.lowlevel.wait_readable(ref.sock)
                if self._hung_up(ref):
                    return
        except trio.ClosedResourceError:
            pass  # reap() closed it while we waited
        finally:
            self._close(ref)

    @staticmethod
    def _hung_up(ref: ObjectFd) -> bool:
        try:
            return not ref.sock.recv(65536)  # data a holder wrote is discarded
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _close(self, ref: ObjectFd) -> None:
        if ref.closed:
            return
        ref.closed = True
        del self.by_ino[ref.ino]
        del self.by_cookie[ref.cookie]
        if ref.uid is not None:
            self.limits.fds.uncharge(ref.uid)
        refs = self._of_object[ref.obj]
        refs.discard(ref)
        if not refs:
            del self._of_object[ref.obj]
        # Wake the watcher parked on this fd first: a closed fd number that trio still
        # watches, once reused by a new connection, fails that connection's wait (and the
        # daemon) with BusyResourceError.
        trio.lowlevel.notify_closing(ref.sock)
        ref.sock.close()
        self.store.put(ref.obj, user=True)

    def reap(self) -> None:
        """Drop now every reference whose fds are all closed, without waiting for the watcher
        tasks to run: makes listings (ids, status) as synchronous as the kernel's close()."""
        refs = list(self.by_ino.values())
        poller = select.poll()
        for ref in refs:
            poller.register(ref.sock, select.POLLIN | select.POLLHUP)
        by_fd = {ref.sock.fileno(): ref for ref in refs}
        for fd, _events in poller.poll(0):
            ref = by_fd[fd]
            if self._hung_up(ref):
                self._close(ref)

    def send_event(self, obj: BpfObject, record: bytes) -> int:
        """Deliver one perf sample to every fd of obj; returns how many readers got it."""
        delivered = 0
        for ref in list(self._of_object.get(obj, ())):
            if not ref.closed:
                try:
                    ref.sock.send(record)
                    delivered += 1
                except (BlockingIOError, OSError):
                    pass  # reader too slow or gone: the sample is lost, as on a full ring
        return delivered
