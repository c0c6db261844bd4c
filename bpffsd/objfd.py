"""Object fds: one user reference each, carried by a real file descriptor.

An fd handed to a client is one end of a socketpair; the daemon keeps the other end and
watches it. dup, fork and SCM_RIGHTS share the client's end like any fd, and when the last
copy anywhere closes (or its holder dies, SIGKILL included) the daemon's end sees end-of-file
and drops the reference. The client's end is identified by its socket inode: a client proves
it holds an object fd by sending it once per connection ("bind"), after which requests name it
by that inode.

Perf event objects also use their socket as the event channel: the daemon writes each sample
to its end, the holder reads it from the fd.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import stat
from dataclasses import dataclass

import trio

from bpffs.vm.errors import BpfError

from .store import BpfObject, Store

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ObjectFd:
    obj: BpfObject
    ino: int  # inode of the client's end: the handle requests use
    sock: socket.socket  # the daemon's end
    flags: int = 0  # ObjFlag.RDONLY / WRONLY, as the fd was opened (BPF_OBJ_GET file_flags)
    closed: bool = False


class ObjectFds:
    def __init__(self, store: Store):
        self.store = store
        self.by_ino: dict[int, ObjectFd] = {}
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
        it."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        ref = ObjectFd(obj, os.fstat(theirs.fileno()).st_ino, ours, int(flags))
        self.store.hold(obj, user=True)
        self.by_ino[ref.ino] = ref
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
        """The object fd a client sent: EBADF-like EINVAL if it is some other file."""
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise BpfError(errno.EBADF, f"cannot stat the fd sent: {e.strerror}") from None
        ref = self.by_ino.get(st.st_ino)
        if ref is None or ref.closed:
            if stat.S_ISSOCK(st.st_mode):
                raise BpfError(errno.EBADF, "the fd sent is not an object fd of this bpffsd:"
                               " if it came from an earlier bpffsd, that daemon has exited"
                               " (restarted?); get the object again from its pin")
            raise BpfError(errno.EINVAL, "the fd sent is not a bpffs object fd")
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
