"""A mount worker: one process per FUSE mount, forwarding every request to the daemon.

pyfuse3 allows one session per process, and a mount must be made from inside its target mount
namespace, so the daemon starts one of these per mount. The worker enters the namespace
(setns(2) through ctypes: Python 3.11 has no os.setns), mounts, reports the mount's device
number, then serves. It holds no state of its own beyond open directory listings: the tree
lives in the daemon, which also tells the worker (on a second socket) which kernel cache
entries to drop when the tree changes by another route, and (on a third, read by a thread of
its own) which pins to create through the mount for inotify's sake.

Every handler is wrapped: pyfuse3 only catches FUSEError, and any other exception would end
the session and leave a dead mount. The worker ends when the mount is unmounted or when the
daemon closes its notification socket (daemon shutdown: the worker unmounts).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import functools
import logging
import os
import re
import socket
import stat
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter_ns
from typing import Any

import pyfuse3
import trio

from bpffs import protocol
from bpffs.daemon import logfmt
from bpffs.daemon.fs import CLONE_NEWNS

log = logging.getLogger("bpffsd.worker")

MNT_DETACH = 2
# How long the kernel may cache entries and attributes. Changes made by other routes are
# pushed as invalidations, so this only bounds the damage of a lost notification.
CACHE_TIMEOUT = 10.0
READDIR_CHUNK = 1024
# Seconds a FUSE request waits for the daemon before the worker answers it ETIMEDOUT: with
# the daemon stopped (SIGSTOP) or hung, `ls` of the mount fails after this instead of hanging
# in D state. The environment variable, read by the worker, overrides it.
RPC_TIMEOUT = 30.0
RPC_TIMEOUT_ENV = "BPFFSD_MOUNT_TIMEOUT"
# The daemon answers a forwarded request within tens of microseconds: the worker polls for the
# reply up to REPLY_SPIN_NS before parking in trio, which saves a wake-up and a pass through
# trio's run loop on each side (~100 us -> ~40 us a hop, 2-core VM). A reply that does not come
# within the spin (a busy daemon, a loaded machine) pauses spinning for SPIN_BACKOFF requests.
REPLY_SPIN_NS = 100_000
SPIN_BACKOFF = 32
# setattr: pyfuse3's SetattrFields flag -> the change the daemon applies -> its EntryAttributes
SETATTR_FIELDS = (("update_mode", "mode", "st_mode"), ("update_uid", "uid", "st_uid"),
                  ("update_gid", "gid", "st_gid"), ("update_size", "size", "st_size"),
                  ("update_atime", "atime", "st_atime_ns"),
                  ("update_mtime", "mtime", "st_mtime_ns"))
_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def umount_detach(path: str) -> None:
    if _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount2({path}): {os.strerror(err)}")


def enter_namespace(ns_fd: int) -> None:
    """Join the mount namespace of ns_fd unless we are already in it (a non-root daemon cannot
    setns at all, and needs not to for its own namespace)."""
    if os.fstat(ns_fd).st_ino != os.stat("/proc/self/ns/mnt").st_ino:
        setns(ns_fd, CLONE_NEWNS)
    os.close(ns_fd)


def mount_device(target: bytes) -> int:
    """st_dev of the FUSE mount at target (a path resolved *before* mounting), read from
    mountinfo: any stat() of the mount would call back into this very process before it
    serves requests, and hang."""
    dev = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            fstype = line.split(b" - ", 1)[1].split()[0]
            if _unescape(fields[4]) == target and fstype.startswith(b"fuse"):
                major, minor = fields[2].split(b":")
                dev = os.makedev(int(major), int(minor))  # the last one listed is on top
    if dev is None:
        raise OSError(errno.ENOENT, f"no FUSE mount found at {target} after mounting")
    return dev


def _unescape(field: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def _attrs(raw: list[int]) -> pyfuse3.EntryAttributes:
    ino, mode, nlink, uid, gid, size, atime, mtime, ctime = raw
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = ino
    attr.st_mode = mode
    attr.st_nlink = nlink
    attr.st_uid = uid
    attr.st_gid = gid
    attr.st_size = size
    attr.st_blksize = 4096
    attr.st_blocks = 0
    attr.st_atime_ns = atime
    attr.st_mtime_ns = mtime
    attr.st_ctime_ns = ctime
    attr.entry_timeout = CACHE_TIMEOUT
    attr.attr_timeout = CACHE_TIMEOUT
    return attr


def _ctx(ctx: pyfuse3.RequestContext) -> list[int]:
    return [ctx.uid, ctx.gid, ctx.pid, ctx.umask]


def guarded(handler: Callable) -> Callable:
    """Turn any unexpected exception into EIO (logged) so the session survives."""

    @functools.wraps(handler)
    async def wrapper(*args: Any) -> Any:
        try:
            return await handler(*args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


@dataclass
class Listing:
    """An open directory: where the kernel's reading stands, and entries fetched ahead."""

    inode: int
    cursor: int = 0  # cookie of the last entry handed to the kernel
    buffered: list = field(default_factory=list)  # next entries, the nearest last
    last_chunk: bool = False  # the daemon had no more entries after `buffered`
    buffered_for_now: bool = False  # `buffered` may predate a change: not for later calls

    def drop_fetched(self) -> None:
        """Forget the entries fetched ahead: the next call fetches from `cursor` again."""
        self.buffered, self.last_chunk = [], False


class DaemonLink:
    """The worker's request channel to the daemon: one request at a time, in order. A
    request the daemon does not answer within `timeout` seconds is answered ETIMEDOUT to the
    kernel (a stopped or hung daemon must not hang every process that touches the mount);
    its late reply is recognised by its place in the order and dropped, and a pin opened
    too late is released."""

    def __init__(self, sock: socket.socket, timeout: float = RPC_TIMEOUT):
        self.sock = trio.socket.from_stdlib_socket(sock)  # non-blocking from here on
        self.raw = sock  # the same socket, for sends and polls that need no trio checkpoint
        self.lock = trio.Lock()
        self.inbox = protocol.Inbox()  # one reused receive buffer (see Inbox)
        self.timeout = timeout
        self._owed: deque[list[Any]] = deque()  # each request sent ([op, *args]), unanswered
        self._leaked: list[int] = []  # fhs of opens answered after their timeout
        self._late = False  # a request timed out and no reply came since
        self._spin_pause = 0  # requests left before polling for replies again

    async def call(self, op: str, *args: Any) -> Any:
        """The common case (the lock free, the reply caught while polling) passes no trio
        checkpoint: a request costs the daemon's work and two syscalls, not three trips
        through the run loop."""
        request = [op, *args]
        with trio.move_on_after(self.timeout):
            if self.lock.locked():
                await self.lock.acquire()
            else:
                self.lock.acquire_nowait()
            try:
                while self._leaked:
                    await self._send(["release", self._leaked[-1]])
                    self._leaked.pop()
                await self._send(request)
                while True:
                    message = self._poll()
                    if message is None:
                        message = await self.inbox.recvmsg_async(self.sock)
                    data, ancdata, flags = message
                    if not data:
                        raise pyfuse3.FUSEError(errno.ENOTCONN)
                    if self._late:
                        log.warning("the daemon answers again")
                        self._late = False
                    answered = self._owed.popleft()
                    if answered is request:
                        return self._reply(data, ancdata, flags)
                    self._late_reply(answered[0], data, ancdata, flags)
            finally:
                self.lock.release()
        if not self._late:
            log.warning("the daemon did not answer %s within %g s: ETIMEDOUT (%s=%s)", op,
                        self.timeout, RPC_TIMEOUT_ENV, self.timeout)
            self._late = True
        raise pyfuse3.FUSEError(errno.ETIMEDOUT)

    def _poll(self) -> tuple[bytes, list, int] | None:
        """The daemon's next reply if it comes within REPLY_SPIN_NS, else None (and no
        polling for the next SPIN_BACKOFF requests). Between polls the CPU is yielded: the
        scheduler often wakes the daemon on this worker's CPU, where a plain spin would only
        keep it from answering."""
        if self._spin_pause:
            self._spin_pause -= 1
            return None
        deadline = perf_counter_ns() + REPLY_SPIN_NS
        while True:
            try:
                return self.inbox.recvmsg(self.raw)
            except BlockingIOError:
                if perf_counter_ns() > deadline:
                    self._spin_pause = SPIN_BACKOFF
                    return None
                os.sched_yield()

    async def _send(self, request: list[Any]) -> None:
        with protocol.framed(protocol.pack(request)) as message:
            try:
                self.raw.sendmsg(*message)
            except BlockingIOError:
                await self.sock.sendmsg(*message)
        self._owed.append(request)  # sent (a cancelled sendmsg sends nothing)

    @staticmethod
    def _reply(data: bytes, ancdata: list, flags: int) -> Any:
        payload, fds = protocol.open_message(data, ancdata, flags)
        protocol.close_all(fds)
        reply = protocol.unpack(payload)
        if reply[0]:
            raise pyfuse3.FUSEError(reply[0])
        return reply[1]

    def _late_reply(self, op: str, data: bytes, ancdata: list, flags: int) -> None:
        """The reply to a request that timed out: dropped, but an open that succeeded after
        all holds a handle in the daemon, released with the next request."""
        try:
            result = self._reply(data, ancdata, flags)
        except pyfuse3.FUSEError:
            return
        if op == "open":
            self._leaked.append(result)


class Operations(pyfuse3.Operations):
    """Thin: each request becomes one call to the daemon (bpffsd/fs/fuse_ops.py)."""

    enable_writeback_cache = False

    def __init__(self, daemon: DaemonLink):
        super().__init__()
        self.daemon = daemon
        self.listings: dict[int, Listing] = {}  # opendir handle -> its listing
        self._next_fh = 1
        self._changes = 0  # changes seen so far (forget_fetched)
        # (parent, name) -> the thread id of our own mknod creating that pin, whose LOOKUP
        # this worker answers itself (see make_pins)
        self.creating: dict[tuple[int, bytes], int] = {}
        # Directories' attributes as the daemon returned them with this mount's last change
        # (fuse_ops.changed): the kernel asks for them right after, on its next path walk.
        # Dropped by any change and by any invalidation from the daemon.
        self.fresh: dict[int, list[int]] = {}
        self.notify: socket.socket | None = None  # the daemon's invalidations come on it
        self._notified = 0  # invalidation messages applied so far
        self.initialized = trio.Event()  # the kernel's INIT is answered (see init)

    def init(self) -> None:
        """pyfuse3 calls this while answering the kernel's INIT: only from then on does
        libfuse send the kernel notifications (before, ENOSYS, which pyfuse3's thread for
        invalidate_entry_async logs with a traceback). The daemon can send invalidations
        sooner: the worker says it is ready once mounted, and INIT comes after."""
        self.initialized.set()

    def _fh(self) -> int:
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        return fh

    def forget_fetched(self) -> None:
        """Entries fetched ahead for open listings may be stale: a READDIRPLUS reply made
        from them would give the kernel a dentry for a name already gone, or old attributes.
        Called after every change, this mount's own (its handlers) and others' (the daemon's
        invalidations). Any change, not just one to the listed directory: a chmod or a
        hard link changes an entry's attributes wherever it is listed."""
        self._changes += 1
        for listing in self.listings.values():
            listing.drop_fetched()

    def invalidated(self) -> None:
        """The daemon sent invalidations (a change by another route)."""
        self._notified += 1
        self.fresh.clear()
        self.forget_fetched()

    async def _change(self, op: str, ctx, *args: Any) -> Any:
        """A request that changes the tree or an attribute (for the handlers below)."""
        self.fresh.clear()
        try:
            return await self.daemon.call(op, _ctx(ctx), *args)
        finally:
            self.forget_fetched()

    async def _entries_change(self, op: str, ctx, *args: Any) -> Any:
        """A change of entries: its reply is [the new entry's attributes or None, those of
        the directories it changed] (fuse_ops.changed), kept in `fresh` unless invalidations
        came meanwhile (their order against the change is unknown)."""
        notified = self._notified
        entry, dirs = await self._change(op, ctx, *args)
        if notified == self._notified:
            self.fresh = {raw[0]: raw for raw in dirs}
        return entry

    def _invalidations_waiting(self) -> bool:
        """Whether the daemon has sent invalidations not applied yet (they go first)."""
        if self.notify is None:
            return False
        try:
            self.notify.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            pass
        return True

    async def _getattr(self, inode: int, ctx) -> list[int]:
        """A node's attributes: from `fresh` when the kernel asks right after this mount's
        own change (saves the daemon a round trip on each path walk after a pin, unlink,
        ...), else from the daemon."""
        raw = self.fresh.get(inode)
        if raw is None or self._invalidations_waiting():
            raw = await self.daemon.call("getattr", _ctx(ctx), inode)
        return raw

    @guarded
    async def lookup(self, parent_inode, name, ctx):
        if self.creating.get((parent_inode, name)) == ctx.pid:
            raise pyfuse3.FUSEError(errno.ENOENT)  # our mknod's own lookup: see creating
        return _attrs(await self.daemon.call("lookup", _ctx(ctx), parent_inode, name))

    @guarded
    async def getattr(self, inode, ctx):
        return _attrs(await self._getattr(inode, ctx))

    @guarded
    async def setattr(self, inode, attr, fields, fh, ctx):
        changes = {change: getattr(attr, value) for flag, change, value in SETATTR_FIELDS
                   if getattr(fields, flag)}
        return _attrs(await self._change("setattr", ctx, inode, changes))

    @guarded
    async def readlink(self, inode, ctx):
        return await self.daemon.call("readlink", _ctx(ctx), inode)

    @guarded
    async def mkdir(self, parent_inode, name, mode, ctx):
        return _attrs(await self._entries_change("mkdir", ctx, parent_inode, name, mode))

    @guarded
    async def unlink(self, parent_inode, name, ctx):
        await self._entries_change("unlink", ctx, parent_inode, name)

    @guarded
    async def rmdir(self, parent_inode, name, ctx):
        await self._entries_change("rmdir", ctx, parent_inode, name)

    @guarded
    async def symlink(self, parent_inode, name, target, ctx):
        return _attrs(await self._entries_change("symlink", ctx, parent_inode, name, target))

    @guarded
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self._entries_change("rename", ctx, parent_inode_old, name_old, parent_inode_new,
                                   name_new, flags)

    @guarded
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return _attrs(await self._entries_change("link", ctx, inode, new_parent_inode,
                                                 new_name))

    @guarded
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        # bpffs has no mknod: devices, fifos and sockets are EPERM. A regular file is the
        # daemon's to refuse (EACCES, as `touch`) unless it is a pin the daemon asked this
        # worker to create through the mount (make_pins).
        if not stat.S_ISREG(mode):
            raise pyfuse3.FUSEError(errno.EPERM)
        return _attrs(await self._entries_change("mknod", ctx, parent_inode, name, mode))

    @guarded
    async def create(self, parent_inode, name, mode, flags, ctx):
        raise pyfuse3.FUSEError(errno.EACCES)  # no regular files but pins

    @guarded
    async def open(self, inode, flags, ctx):
        fh = await self.daemon.call("open", _ctx(ctx), inode, flags)
        # direct_io: pins report size 0, yet `cat` must see the whole dump.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=False)

    @guarded
    async def read(self, fh, off, size):
        """The daemon renders a pin's text for a bounded time per request (render.PinText),
        answering None while the walk has not reached the offset yet and maybe fewer bytes
        than asked: ask again until the read is full or at the end, as a file answers. Each
        call takes the request channel anew, so other requests are served in between."""
        data = b""
        while len(data) < size:
            part = await self.daemon.call("read", fh, off + len(data), size - len(data))
            if part is None:
                continue
            if not part:
                break
            data += part
        return data

    @guarded
    async def write(self, fh, off, buf):
        raise pyfuse3.FUSEError(errno.EIO)  # as the kernel's bpffs: pins have no write path

    @guarded
    async def release(self, fh):
        await self.daemon.call("release", fh)

    @guarded
    async def opendir(self, inode, ctx):
        await self._getattr(inode, ctx)  # ENOENT / ENOTDIR now, not later
        fh = self._fh()
        self.listings[fh] = Listing(inode)
        return fh

    @guarded
    async def readdir(self, fh, start_id, token):
        """Entries carry the daemon's per-directory cookie as their readdir offset, so
        entries added or removed between calls are never skipped or repeated. The kernel asks
        for one page of entries at a time; the rest of a fetched chunk waits in the listing
        for its next call (rewinddir and seekdir fetch again)."""
        listing = self.listings[fh]
        if start_id != listing.cursor:
            listing.cursor = start_id
            listing.drop_fetched()
        while True:
            if not listing.buffered:
                if listing.last_chunk:
                    return
                changes = self._changes
                fetched = await self.daemon.call("readdir", listing.inode, listing.cursor,
                                                 READDIR_CHUNK)
                fetched.reverse()  # taken from the end
                listing.buffered = fetched
                listing.last_chunk = len(fetched) < READDIR_CHUNK
                # A change that came while fetching may be older than the chunk or newer:
                # then it serves this call only, as an unbuffered listing would.
                listing.buffered_for_now = changes != self._changes
            while listing.buffered:
                name, cookie, raw = listing.buffered[-1]
                if not pyfuse3.readdir_reply(token, name, _attrs(raw), cookie):
                    if listing.buffered_for_now:
                        listing.drop_fetched()
                    return
                listing.buffered.pop()
                listing.cursor = cookie

    @guarded
    async def releasedir(self, fh):
        self.listings.pop(fh, None)

    @guarded
    async def statfs(self, ctx):
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = data.f_bfree = data.f_bavail = 0
        data.f_files = data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    async def forget(self, inode_list):
        pass  # the daemon frees nodes by links and open handles, not by lookup counts

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        pass

    async def fsyncdir(self, fh, datasync):
        pass


def make_pins(sock: socket.socket, ops: Operations, token: trio.lowlevel.TrioToken) -> None:
    """A thread: mknod() each pin the daemon is making (BPF_OBJ_PIN over the control socket)
    on this very mount, so that the kernel fires IN_CREATE for inotify watchers: FUSE's entry
    notifications fire none. The kernel sends the MKNOD back to this process, whose event
    loop serves it, hence the thread; it reads its requests itself (blocking), so a pin
    costs one wake-up here. A success the daemon saw (it served the MKNOD); a failure it is
    told, and makes the pin itself. Ends when the daemon closes the socket or the loop ends.

    The kernel's LOOKUP before the MKNOD is answered ENOENT by the loop without a round
    trip (Operations.creating): the daemon found no such entry just before asking
    (Tree.check_pin), and an entry made since makes the MKNOD fail with EEXIST in the
    daemon, as it would have."""
    tid = threading.get_native_id()  # what FUSE requests made by this thread carry as pid
    while True:
        try:
            data = sock.recv(protocol.INLINE_MAX)
        except OSError:
            return
        if not data:
            return
        parent, name, path = protocol.unpack(data)
        ops.creating[parent, name] = tid
        try:
            os.mknod(path, stat.S_IFREG | 0o600)
            continue
        except OSError as e:
            err = e.errno or errno.EIO
        finally:
            ops.creating.pop((parent, name), None)
        try:
            trio.from_thread.run(ops.daemon.call, "created", parent, name, err,
                                 trio_token=token)
        except pyfuse3.FUSEError:
            pass  # the daemon is late: it stops waiting on its own
        except (OSError, trio.RunFinishedError, trio.Cancelled) as e:
            log.debug("pins through the mount end: %r", e)  # the daemon or the loop is gone
            return


async def listen_for_invalidations(sock: socket.socket, ops: Operations) -> None:
    """Apply the daemon's cache invalidations; the daemon closing this socket means:
    unmount."""
    tsock = trio.socket.from_stdlib_socket(sock)
    ops.notify = sock
    while True:
        data = await tsock.recv(protocol.INLINE_MAX)
        if not data:
            pyfuse3.terminate()
            return
        await ops.initialized.wait()  # at once, but for the first invalidations
        ops.invalidated()
        for kind, ino, name in protocol.unpack(data):
            try:
                if kind == "entry":
                    pyfuse3.invalidate_entry_async(ino, name, ignore_enoent=True)
                else:
                    pyfuse3.invalidate_inode(ino, attr_only=True)
            except OSError:
                pass  # the kernel no longer caches it: nothing to drop


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bpffsd-mount-worker")
    parser.add_argument("--rpc-fd", type=int)
    parser.add_argument("--notify-fd", type=int)
    parser.add_argument("--create-fd", type=int)
    parser.add_argument("--ns-fd", type=int)
    parser.add_argument("--owner-uid", type=int, default=0,
                        help="non-root callers may only mount on a directory they own")
    parser.add_argument("--owner-gid", type=int, default=0)
    parser.add_argument("--options", default="")
    parser.add_argument("--unmount", action="store_true",
                        help="detach a (dead) mount at the mountpoint and exit")
    parser.add_argument("mountpoint")
    return parser.parse_args(argv)


def clear_stale_mount(path: str) -> None:
    """A FUSE mount whose server died (a daemon killed with SIGKILL, say) answers every access
    with ENOTCONN ("Transport endpoint is not connected"): detach it so we can mount afresh."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise
        log.warning("detaching the dead mount left at %s", path)
        umount_detach(path)


def become_owner(uid: int, gid: int) -> None:
    """Serve a non-root caller's mount as that caller: libfuse then mounts through the setuid
    fusermount3 with user_id=uid, so the caller can use the mount (without allow_other) and
    unmount it with `fusermount3 -u`, as with any user FUSE mount."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def check_mountpoint(path: str, owner_uid: int) -> None:
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, f"mountpoint {path} is not a directory")
    if owner_uid != 0 and (st.st_uid != owner_uid or not os.access(path, os.W_OK)):
        raise OSError(errno.EPERM, f"mountpoint {path} is not a directory you own")


def rpc_timeout() -> float:
    """RPC_TIMEOUT, or the environment's RPC_TIMEOUT_ENV (seconds, positive)."""
    value = os.environ.get(RPC_TIMEOUT_ENV)
    if value is None:
        return RPC_TIMEOUT
    try:
        timeout = float(value)
    except ValueError:
        timeout = 0.0
    if not timeout > 0:
        log.warning("ignoring %s=%r (not a positive number of seconds)", RPC_TIMEOUT_ENV,
                    value)
        return RPC_TIMEOUT
    return timeout


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logfmt.setup(logging.WARNING)  # the daemon's format: its stderr is ours
    if args.unmount:
        if args.ns_fd is not None:
            enter_namespace(args.ns_fd)
        umount_detach(args.mountpoint)
        return 0
    rpc = socket.socket(fileno=args.rpc_fd)
    try:
        if args.ns_fd is not None:
            enter_namespace(args.ns_fd)
        clear_stale_mount(args.mountpoint)
        if args.owner_uid != 0 and os.getuid() == 0:
            become_owner(args.owner_uid, args.owner_gid)
        check_mountpoint(args.mountpoint, args.owner_uid)
        target = os.fsencode(os.path.realpath(args.mountpoint))
        options = {"fsname=bpffsd", "subtype=bpffsd", "default_permissions",
                   *filter(None, args.options.split(","))}
        ops = Operations(DaemonLink(rpc, rpc_timeout()))
        pyfuse3.init(ops, args.mountpoint, options)
    except Exception as e:
        err = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
        protocol.send_message(rpc, protocol.pack(["failed", err, str(e)]))
        return 1
    protocol.send_message(rpc, protocol.pack(["ready", mount_device(target)]))
    notify = socket.socket(fileno=args.notify_fd)
    create = socket.socket(fileno=args.create_fd) if args.create_fd is not None else None
    clean = False
    try:
        trio.run(_serve, notify, create, ops)
        clean = True
    finally:
        pyfuse3.close(unmount=clean)
    return 0


async def _serve(notify: socket.socket, create: socket.socket | None, ops: Operations) -> None:
    if create is not None:
        threading.Thread(target=make_pins, name="make_pins", daemon=True,
                         args=(create, ops, trio.lowlevel.current_trio_token())).start()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(listen_for_invalidations, notify, ops)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    sys.exit(main())
