"""bpffs over FUSE: instances per mount namespace, their mounts, and BPF_OBJ_PIN / BPF_OBJ_GET.

Paths are resolved by the kernel, never by the daemon: a client opens the pin's parent
directory (OBJ_PIN) or the pin itself (OBJ_GET) with O_PATH and sends the fd. Its (st_dev,
st_ino) names the mount and the node, so relative paths, symlinks and bind mounts into
containers all resolve as the caller sees them, and a path on any other filesystem is EPERM,
as in the kernel. fstat() of such an fd may call into one of our own mounts, whose worker asks
this daemon: it runs in a thread, never on the event loop, unless the fd's mount is one of
ours already seen (by its never-reused mount id), where a statx that asks no filesystem
(AT_STATX_DONT_SYNC, honoured by FUSE) is safe on the loop and saves the thread's hand-offs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import inspect
import logging
import os
import re
import struct
from collections.abc import Coroutine, Iterator
from typing import TYPE_CHECKING, Any

import trio

from bpffs.vm.errors import BpfError
from bpffs.vm.uapi import ObjFlag

from ..store import BpfObject
from .instance import Instance
from .mount import Mount
from .tree import MAY_READ, MAY_WRITE, ROOT, Caller, Dir, Node, NodeQuota, Pin, show

if TYPE_CHECKING:
    from ..daemon import Daemon
    from ..server import Connection

log = logging.getLogger(__name__)

NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3)
CLONE_NEWNS = 0x00020000
DEFAULT_INSTANCE = "default"
FSTAT_TIMEOUT = 10.0
REAP_INTERVAL = 2.0  # seconds between looks for mounts in namespaces nobody lives in


# statx(2) of an fd, from the inode the kernel has cached: AT_STATX_DONT_SYNC keeps FUSE from
# asking the filesystem (our own mount, whose attributes a pin has just invalidated) again.
# STATX_MNT_ID_UNIQUE (Linux 6.8) also asks for the id of the fd's mount that is never reused.
AT_EMPTY_PATH, AT_STATX_DONT_SYNC, STATX_MASK_INO = 0x1000, 0x4000, 0x100
STATX_MNT_ID_UNIQUE = 0x4000
STATX_SIZE = 256  # sizeof(struct statx)
STATX_MASK = (0, struct.Struct("<I"))  # stx_mask: what the kernel filled in
STATX_INO = (32, struct.Struct("<Q"))  # offset of stx_ino, its format
STATX_DEV = (136, struct.Struct("<II"))  # stx_dev_major, stx_dev_minor
STATX_MNT_ID = (144, struct.Struct("<Q"))
# name_to_handle_at(2) of an fd, for its mount's unique id (AT_HANDLE_MNT_ID_UNIQUE, Linux
# 6.12): the VFS and the filesystem's encode_fh make it from memory, never asking the
# filesystem (FUSE's fuse_encode_fh included); AT_HANDLE_FID serves filesystems that cannot
# export handles. An id met before on one of our mounts is proof that statx(fd) cannot reach
# a FUSE server, so the fd can be resolved on the event loop (Filesystems._resolve).
AT_HANDLE_MNT_ID_UNIQUE, AT_HANDLE_FID = 0x001, 0x200
FILE_HANDLE_SIZE = 8 + 128  # struct file_handle with MAX_HANDLE_SZ bytes of f_handle
KNOWN_MOUNT_IDS_MAX = 4096  # ids remembered (bind mounts of ours made in user namespaces)
_libc = ctypes.CDLL(None, use_errno=True)


def _statx(fd: int, mask: int) -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(STATX_SIZE)
    if _libc.statx(fd, b"", AT_EMPTY_PATH | AT_STATX_DONT_SYNC, mask, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return buf


def _dev_ino(buf: ctypes.Array[ctypes.c_char]) -> tuple[int, int]:
    (dev_offset, dev_format), (ino_offset, ino_format) = STATX_DEV, STATX_INO
    major, minor = dev_format.unpack_from(buf, dev_offset)
    return os.makedev(major, minor), ino_format.unpack_from(buf, ino_offset)[0]


def fd_identity(fd: int) -> tuple[int, int]:
    """(st_dev, st_ino) of what an O_PATH fd names, without a round trip to its filesystem
    (if that honours AT_STATX_DONT_SYNC, as FUSE does: some cluster filesystems do not)."""
    return _dev_ino(_statx(fd, STATX_MASK_INO))


def fd_place(fd: int) -> tuple[int, int, int | None]:
    """fd_identity and the unique id of the fd's mount (None before Linux 6.8)."""
    buf = _statx(fd, STATX_MASK_INO | STATX_MNT_ID_UNIQUE)
    mask = STATX_MASK[1].unpack_from(buf, STATX_MASK[0])[0]
    mnt_id = STATX_MNT_ID[1].unpack_from(buf, STATX_MNT_ID[0])[0]
    return (*_dev_ino(buf), mnt_id if mask & STATX_MNT_ID_UNIQUE else None)


def mount_id_of(fd: int) -> int | None:
    """The unique id of the mount an fd is on, asking no filesystem (see
    AT_HANDLE_MNT_ID_UNIQUE); None where the kernel cannot say (before Linux 6.12)."""
    handle = ctypes.create_string_buffer(FILE_HANDLE_SIZE)
    struct.pack_into("<I", handle, 0, FILE_HANDLE_SIZE - 8)
    mnt_id = ctypes.c_uint64()
    if _libc.name_to_handle_at(fd, b"", handle, ctypes.byref(mnt_id), AT_EMPTY_PATH
                               | AT_HANDLE_FID | AT_HANDLE_MNT_ID_UNIQUE) != 0:
        return None
    return mnt_id.value


async def in_thread(fn: Any, *args: Any) -> Any:
    """Run a call that may block (on a FUSE mount, maybe our own) off the event loop; if it
    hangs, cancellation abandons the thread (named abandon_on_cancel since trio 0.23)."""
    return await trio.to_thread.run_sync(fn, *args, **_ABANDON)


_ABANDON = ({"abandon_on_cancel": True} if "abandon_on_cancel" in
            inspect.signature(trio.to_thread.run_sync).parameters else {"cancellable": True})


_MNT_NS_LINK = re.compile(r"mnt:\[(\d+)\]")


def mount_namespace_of(fd: int) -> int | None:
    """The inode of the mount namespace fd names; None for anything else. The fd's
    /proc/self/fd link is read first: the kernel makes it from the dentry without asking the
    filesystem, "mnt:[INO]" for a mount namespace and a path ("/...") for a file on any
    filesystem, a FUSE mount included. Only an nsfs fd then gets the nsfs ioctl."""
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    found = _MNT_NS_LINK.fullmatch(link)
    if found is None:
        return None
    try:
        if fcntl.ioctl(fd, NS_GET_NSTYPE) != CLONE_NEWNS:
            return None
    except OSError:
        return None
    return int(found.group(1))


def namespaces_in_use(exclude_pids: set[int]) -> set[int]:
    """Inodes of the mount namespaces the visible processes (but exclude_pids) live in."""
    used = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) not in exclude_pids:
            try:
                used.add(os.stat(f"/proc/{entry.name}/ns/mnt").st_ino)
            except OSError:
                pass  # gone, or not ours to see
    return used


class Filesystems:
    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.named: dict[str, Instance] = {}
        self.by_ns: dict[int, Instance] = {}  # mount namespace inode -> its instance
        self.mounts: dict[int, Mount] = {}  # st_dev of a live mount -> mount
        self._nursery: trio.Nursery | None = None
        self._origin: Mount | None = None
        self._known: dict[int, int] = {}  # unique mount id -> st_dev, of mounts of ours
        limits = daemon.config.limits  # entries made in any instance count for their maker
        self.quota = NodeQuota(limits.max_fs_nodes_per_uid, limits.max_symlink_bytes_per_uid)

    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Own the mounts: on cancellation each worker is asked to unmount."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self._reap_abandoned(nursery)

    def all_mounts(self) -> list[Mount]:
        return [m for inst in {*self.named.values(), *self.by_ns.values()} for m in inst.mounts]

    async def _reap_abandoned(self, nursery: trio.Nursery) -> None:
        """Unmount what we mounted into namespaces no process lives in any more (a container
        that exited). The kernel would have torn those mounts down with the namespace; ours
        keep it alive (the daemon holds its fd to restart a crashed worker, and the worker
        lives in it), so the daemon notices instead, and an unnamed instance dies with them."""
        own_ns = os.stat("/proc/self/ns/mnt").st_ino
        while True:
            await trio.sleep(REAP_INTERVAL)
            mounts = [m for m in self.all_mounts() if m.ns_ino != own_ns and not m.stopping]
            if not mounts:
                continue
            workers = {m.process.pid for m in self.all_mounts() if m.process is not None}
            inhabited = await in_thread(namespaces_in_use, workers)
            for mount in mounts:
                if mount.ns_ino not in inhabited:
                    log.info("no process is left in the mount namespace of %s: unmounting",
                             mount.describe())
                    nursery.start_soon(mount.stop)

    # -- instances ----------------------------------------------------------------------------
    def instance(self, name: str | None) -> Instance:
        """The named instance (created on first use), or a new unnamed one."""
        if name is None:
            return self._new_instance(None)
        if name not in self.named:
            self.named[name] = self._new_instance(name)
        return self.named[name]

    def _new_instance(self, name: str | None) -> Instance:
        inst = Instance(name, self.daemon.store)
        inst.tree.quota = self.quota
        inst.tree.on_change.append(lambda *change: self._tree_changed(inst, *change))
        if self.daemon.persistence is not None:
            self.daemon.persistence.watch(inst)
        return inst

    def describe(self) -> list[dict]:
        seen = {*self.named.values(), *self.by_ns.values()}
        return [{"name": inst.name, "pins": sum(isinstance(n, Pin) for n in
                                                inst.tree.nodes.values()),
                 "mounts": sorted(m.describe() for m in inst.mounts)} for inst in seen]

    # -- mounting -----------------------------------------------------------------------------
    async def mount_default(self, mountpoint: str) -> Mount:
        """The daemon's own mount of the default (named, persistent) instance."""
        os.makedirs(mountpoint, exist_ok=True)
        ns_fd = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        return await self._mount(self.instance(DEFAULT_INSTANCE), os.fsencode(mountpoint),
                                 ns_fd, (os.getuid(), os.getgid()),
                                 "allow_other" if os.getuid() == 0 else "")

    async def mount(self, conn: Connection, mountpoint: bytes, name: str | None,
                    options: dict) -> dict:
        ns_fd = os.dup(conn.take_fd("the target mount namespace (an open /proc/PID/ns/mnt)"))
        try:
            ns_ino = self._check_namespace(conn, ns_fd)
            current = self.by_ns.get(ns_ino)
            inst = self.instance(name) if name is not None else current or self.instance(None)
            if current is not None and current is not inst:
                raise BpfError(errno.EBUSY, f"this mount namespace already shows"
                               f" {current.describe()} (one bpffs instance per mount namespace)")
        except BaseException:
            os.close(ns_fd)
            raise
        allow_other = conn.peer.privileged or options.get("allow_other", False)
        mount = await self._mount(inst, mountpoint, ns_fd, (conn.peer.uid, conn.peer.gid),
                                  "allow_other" if allow_other and os.getuid() == 0 else "")
        return {"dev": mount.dev, "instance": inst.name}

    def _check_namespace(self, conn: Connection, ns_fd: int) -> int:
        """The inode of the mount namespace ns_fd names, which an unprivileged caller must
        live in. Nothing here can reach a FUSE mount (ours included): see mount_namespace_of."""
        ns_ino = mount_namespace_of(ns_fd)
        if ns_ino is None:
            raise BpfError(errno.EINVAL, "the fd sent is not a mount namespace (/proc/PID/ns/mnt)")
        if not conn.peer.privileged:
            own = conn.peer.mnt_ns  # captured when it connected
            if own is None:
                raise BpfError(errno.EPERM, "cannot confirm the caller's own mount namespace"
                               " (its process is gone or changed); mounting into another"
                               " process's mount namespace needs CAP_SYS_ADMIN")
            if own != ns_ino:
                raise BpfError(errno.EPERM, "mounting into another process's mount namespace"
                               " needs CAP_SYS_ADMIN")
        return ns_ino

    async def _mount(self, inst: Instance, mountpoint: bytes, ns_fd: int,
                     owner: tuple[int, int], options: str) -> Mount:
        assert self._nursery is not None, "Filesystems.run() is not running"
        ns_ino = os.fstat(ns_fd).st_ino
        mount = Mount(self, inst, mountpoint, ns_fd, ns_ino, owner, options)
        return await self._nursery.start(mount.run)

    def mount_live(self, mount: Mount) -> None:
        """A worker has mounted (first start or restart)."""
        assert mount.dev is not None
        self.mounts[mount.dev] = mount
        mount.instance.mounts.add(mount)
        self.by_ns[mount.ns_ino] = mount.instance

    def mount_down(self, mount: Mount) -> None:
        """A worker is gone (it may be restarted)."""
        if mount.dev is not None and self.mounts.get(mount.dev) is mount:
            del self.mounts[mount.dev]

    def mount_gone(self, mount: Mount) -> None:
        """A mount is gone for good: unbind its namespace when nothing else of the instance is
        mounted there; an unnamed instance with no mounts left releases its pins."""
        self.mount_down(mount)
        inst = mount.instance
        inst.mounts.discard(mount)
        if mount.ns_ino not in inst.namespaces() and self.by_ns.get(mount.ns_ino) is inst:
            del self.by_ns[mount.ns_ino]
        if not inst.mounts and not inst.persistent:
            inst.tree.clear()
        log.info("unmounted %s", mount.describe())

    # -- pin and get --------------------------------------------------------------------------
    def _resolve_now(self, fd: int) -> tuple[Mount, Node] | None:
        """_resolve without leaving the event loop, for an fd on a mount already seen to be
        one of ours (self._known): statx cannot reach a FUSE server then (AT_STATX_DONT_SYNC),
        so cannot deadlock on our own worker nor hang. None: not known, resolve in a thread.
        The thread costs a pin or get ~45 us of hand-offs (2-core VM)."""
        mnt_id = mount_id_of(fd)
        dev = self._known.get(mnt_id) if mnt_id is not None else None
        if dev is None:
            return None
        found, ino = fd_identity(fd)
        mount = self.mounts.get(dev)
        if found != dev or mount is None:
            return None  # a mount restarted since: the thread decides
        return mount, mount.instance.tree.node(ino)

    async def _resolve(self, fd: int, off_mount: int = errno.EPERM) -> tuple[Mount, Node]:
        """The mount and node an O_PATH fd names; a path off our mounts fails with off_mount
        (the kernel: EPERM to pin there, EACCES to get a file that is not a pin). The mount's
        unique id is remembered when it is ours, for _resolve_now: unique ids are never
        reused, so an id seen on one of our FUSE superblocks stays on it."""
        with trio.move_on_after(FSTAT_TIMEOUT):
            dev, ino, mnt_id = await in_thread(fd_place, fd)
            mount = self.mounts.get(dev)
            if mount is None:
                raise BpfError(off_mount, "the path is not on a bpffs (bpffsd) mount")
            if mnt_id is not None:
                if len(self._known) >= KNOWN_MOUNT_IDS_MAX:
                    self._known.clear()
                self._known[mnt_id] = dev
            return mount, mount.instance.tree.node(ino)
        raise BpfError(errno.EIO, "timed out resolving the path (its filesystem hangs)")

    def obj_pin(self, conn: Connection, handle: int, name: bytes, umask: int) -> Any:
        """BPF_OBJ_PIN, made through the mount the caller named when it can be, so that
        inotify watchers of the directory see IN_CREATE as on bpffs (Mount.pin_through_mount).
        Not async itself: the path resolves on the loop when it can (_resolve_now), and only
        what has to wait returns an awaitable (the pipeline awaits what a handler returns)."""
        obj = conn.resolve(handle).obj
        fd = conn.take_fd("the pin's parent directory (O_PATH)")
        caller = Caller(conn.peer.uid, conn.peer.gid, umask & 0o777, conn.peer.groups())
        found = self._resolve_now(fd)
        if found is None:
            return self._pin_resolved_in_thread(fd, obj, name, caller)
        return self._pin(*found, name, obj, caller)

    async def _pin_resolved_in_thread(self, fd: int, obj: BpfObject, name: bytes,
                                      caller: Caller) -> None:
        pinning = self._pin(*await self._resolve(fd), name, obj, caller)
        if pinning is not None:
            await pinning

    def _pin(self, mount: Mount, parent: Node, name: bytes, obj: BpfObject,
             caller: Caller) -> Coroutine[Any, Any, None] | None:
        """Pin now, or return what waits for the worker to pin through the mount."""
        if not isinstance(parent, Dir):
            raise BpfError(errno.ENOTDIR, "the pin's parent is not a directory")
        mount.instance.tree.check_pin(parent, name, caller)  # refused before any round trip
        path = mount.pin_path(parent, name)
        if path is None:
            mount.instance.tree.pin(parent, name, obj, caller, check=True)
            return None
        return self._pin_through(mount, parent, name, obj, caller, path)

    @staticmethod
    async def _pin_through(mount: Mount, parent: Dir, name: bytes, obj: BpfObject,
                           caller: Caller, path: bytes) -> None:
        if not await mount.pin_through_mount(parent, name, obj, caller, path):
            mount.instance.tree.pin(parent, name, obj, caller, check=True)

    def obj_get(self, conn: Connection, file_flags: int) -> Any:
        """BPF_OBJ_GET: answered on the loop when the path resolves there (_resolve_now),
        else by an awaitable that resolves it in a thread."""
        if file_flags & ~(ObjFlag.RDONLY | ObjFlag.WRONLY) or file_flags == (ObjFlag.RDONLY
                                                                            | ObjFlag.WRONLY):
            raise BpfError(errno.EINVAL, f"invalid file_flags {file_flags:#x}"
                           " (BPF_F_RDONLY or BPF_F_WRONLY, not both)")
        fd = conn.take_fd("the pin's path (O_PATH)")
        found = self._resolve_now(fd)
        if found is None:
            return self._get_resolved_in_thread(conn, fd, file_flags)
        return self._get(conn, found[1], file_flags)

    async def _get_resolved_in_thread(self, conn: Connection, fd: int, file_flags: int) -> Any:
        _mount, node = await self._resolve(fd, errno.EACCES)
        return self._get(conn, node, file_flags)

    def _get(self, conn: Connection, node: Node, file_flags: int) -> Any:
        if not isinstance(node, Pin) or node.obj is None:
            raise BpfError(errno.EACCES, f"the path is a {node.kind}, not a pinned object")
        want = {0: MAY_READ | MAY_WRITE, ObjFlag.RDONLY: MAY_READ,
                ObjFlag.WRONLY: MAY_WRITE}[file_flags]
        caller = Caller(conn.peer.uid, conn.peer.gid, 0, conn.peer.groups())
        if not node.permits(caller, want):
            raise BpfError(errno.EACCES, f"permission denied: pin mode {node.mode & 0o7777:o},"
                           f" owner {node.uid}:{node.gid}")
        return self.daemon.syscalls.new_fd(conn, node.obj, file_flags)

    def pin_paths(self, obj: BpfObject, caller: Caller = ROOT) -> list[str]:
        """Where obj is pinned, as caller could look it up (root: everywhere)."""
        paths = []
        for inst in {*self.named.values(), *self.by_ns.values()}:
            pins = [node for node in obj.pins if inst.tree.nodes.get(node.ino) is node]
            for node in pins:
                for rel in inst.tree.path_of(node, caller):
                    paths += [show(m.mountpoint.rstrip(b"/") + b"/" + rel)
                              for m in inst.mounts] or [f"{inst.describe()}:/{show(rel)}"]
        return paths

    def object_id(self, impl: Any) -> int:
        return self.daemon.store.of(impl).id

    # -- invalidation -------------------------------------------------------------------------
    @contextlib.contextmanager
    def origin(self, mount: Mount) -> Iterator[None]:
        """Changes made by a mount's own request need no invalidation in that mount."""
        self._origin = mount
        try:
            yield
        finally:
            self._origin = None

    def _tree_changed(self, inst: Instance, what: str, parent: Dir | None, name: bytes,
                      node: Node | None) -> None:
        items: list[list[Any]] = []
        if parent is not None:
            items += [["entry", parent.ino, name], ["inode", parent.ino, b""]]
        if node is not None and what != "create":
            items.append(["inode", node.ino, b""])
        for mount in inst.mounts:
            if mount is not self._origin:
                mount.invalidate(items)
