"""The daemon's half of FUSE: each request a mount worker forwards, served on a tree.

Permission checks on these requests are the kernel's (mounts use default_permissions); what
remains here is bpffs's own behaviour: which operations exist, their errnos, and what reading
a pin shows (the one place we go further than the kernel, which answers EIO).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from bpffs import protocol
from bpffs.vm.errors import BpfError

from .render import PinText
from .tree import Caller, Dir, Node, Pin, Symlink, Tree

if TYPE_CHECKING:
    from .instance import Instance

# The requests a mount worker sends (worker.py), with their arguments' types as in
# protocol.OPS: ctx is the FUSE caller [uid, gid, pid, umask], a node is its inode number, a
# name is bytes. None carries fds. FuseOps has a method of each name. A change of entries
# answers [the new entry's attributes or None, the attributes of the directories it changed]
# (see changed).
OPS: dict[str, tuple[str, ...]] = {
    "lookup": ("list", "int", "bytes"),  # ctx, parent, name
    "getattr": ("list", "int"),  # ctx, ino
    "setattr": ("list", "int", "dict"),  # ctx, ino, {change: value}
    "readlink": ("list", "int"),
    "mkdir": ("list", "int", "bytes", "int"),  # ctx, parent, name, mode
    "unlink": ("list", "int", "bytes"),
    "rmdir": ("list", "int", "bytes"),
    "symlink": ("list", "int", "bytes", "bytes"),  # ctx, parent, name, target
    "rename": ("list", "int", "bytes", "int", "bytes", "int"),  # ..., flags
    "link": ("list", "int", "int", "bytes"),  # ctx, ino, new parent, new name
    "open": ("list", "int", "int"),  # ctx, ino, flags
    "read": ("int", "int", "int"),  # fh, offset, size
    "release": ("int",),  # fh
    "readdir": ("int", "int", "int"),  # ino, after (cookie), count
    "mknod": ("list", "int", "bytes", "int"),  # ctx, parent, name, mode
    "created": ("int", "bytes", "int"),  # parent, name, errno
}
REQUESTS = protocol.Schema(OPS)


def attrs(node: Node) -> list[int]:
    """Every size is 0, symlinks' included (bpffs never sets i_size)."""
    return [node.ino, node.mode, node.nlink, node.uid, node.gid, 0, node.atime, node.mtime,
            node.ctime]


def changed(*dirs: Dir) -> list[list[int]]:
    """The attributes of the directories a change of entries made through a mount touched,
    sent back with its reply: the kernel drops its cached attributes of those directories
    after such a change (fuse_dir_changed) and asks for them on the next path walk through
    them, a GETATTR the worker can then answer itself (worker.Operations.fresh)."""
    return [attrs(d) for d in dict.fromkeys(dirs)]


def _caller(ctx: list[int]) -> Caller:
    uid, gid, _pid, umask = ctx
    return Caller(uid, gid, umask)


@dataclass
class PendingPin:
    """A pin made over the control socket, which the mount worker creates through the mount
    (mknod) so that the kernel tells inotify watchers, as bpffs does (IN_CREATE)."""

    obj: Any
    caller: Caller
    done: trio.Event = field(default_factory=trio.Event)
    node: Pin | None = None  # created by the mount's mknod
    error: BpfError | None = None  # the tree refused it (EEXIST, ...): the caller's answer


class FuseOps:
    """Requests of one mount (of one instance). An open pin's text is made as it is read."""

    def __init__(self, instance: Instance, describe_object: Any):
        self.instance = instance
        self.describe_object = describe_object
        self._open: dict[int, tuple[Pin, PinText]] = {}
        self.pending: dict[tuple[int, bytes], PendingPin] = {}  # (parent ino, name) -> pin
        self._next_fh = 1

    @property
    def tree(self) -> Tree:
        return self.instance.tree

    def handlers(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in OPS}

    def lookup(self, ctx: list[int], parent: int, name: bytes) -> list[int]:
        return attrs(self.tree.lookup(self.tree.dir(parent), name))

    def getattr(self, ctx: list[int], ino: int) -> list[int]:
        return attrs(self.tree.node(ino))

    def setattr(self, ctx: list[int], ino: int, changes: dict[str, int]) -> list[int]:
        node = self.tree.node(ino)
        if "mode" in changes:
            self.tree.chmod(node, changes["mode"])
        if "uid" in changes or "gid" in changes:
            self.tree.chown(node, changes.get("uid"), changes.get("gid"))
        if "size" in changes and isinstance(node, Dir):
            raise BpfError(errno.EISDIR, "cannot truncate a directory")
        # A pin's size stays 0: truncate(2) on a pin succeeds and changes nothing (as bpffs).
        if "atime" in changes:
            node.atime = changes["atime"]
        if "mtime" in changes:
            node.mtime = changes["mtime"]
        return attrs(node)

    def readlink(self, ctx: list[int], ino: int) -> bytes:
        node = self.tree.node(ino)
        if not isinstance(node, Symlink):
            raise BpfError(errno.EINVAL, "not a symlink")
        return node.target

    def mkdir(self, ctx: list[int], parent: int, name: bytes, mode: int) -> list[Any]:
        d = self.tree.dir(parent)
        return [attrs(self.tree.mkdir(d, name, mode, _caller(ctx))), changed(d)]

    def unlink(self, ctx: list[int], parent: int, name: bytes) -> list[Any]:
        d = self.tree.dir(parent)
        self.tree.unlink(d, name)
        return [None, changed(d)]

    def rmdir(self, ctx: list[int], parent: int, name: bytes) -> list[Any]:
        d = self.tree.dir(parent)
        self.tree.rmdir(d, name)
        return [None, changed(d)]

    def symlink(self, ctx: list[int], parent: int, name: bytes, target: bytes) -> list[Any]:
        d = self.tree.dir(parent)
        return [attrs(self.tree.symlink(d, name, target, _caller(ctx))), changed(d)]

    def rename(self, ctx: list[int], old_parent: int, old_name: bytes, new_parent: int,
               new_name: bytes, flags: int) -> list[Any]:
        old, new = self.tree.dir(old_parent), self.tree.dir(new_parent)
        self.tree.rename(old, old_name, new, new_name, flags)
        return [None, changed(old, new)]

    def link(self, ctx: list[int], ino: int, new_parent: int, new_name: bytes) -> list[Any]:
        d = self.tree.dir(new_parent)
        return [attrs(self.tree.link(self.tree.node(ino), d, new_name, _caller(ctx))),
                changed(d)]

    def mknod(self, ctx: list[int], parent: int, name: bytes, mode: int) -> list[Any]:
        """A regular file: only the pin obj_pin asked this mount's worker to create (as
        `touch`, EACCES otherwise: bpffs has no regular files but pins)."""
        pending = self.pending.get((parent, name))
        if pending is None or pending.done.is_set():
            raise BpfError(errno.EACCES, "bpffs has no regular files but pins")
        try:
            d = self.tree.dir(parent)
            pending.node = self.tree.pin(d, name, pending.obj, pending.caller, check=True)
        except BpfError as e:
            pending.error = e
            raise
        finally:
            pending.done.set()
        return [attrs(pending.node), changed(d)]

    def created(self, parent: int, name: bytes, err: int) -> None:
        """The worker's mknod for a pending pin failed with errno `err` before reaching us
        (the kernel refused the worker, or the path does not resolve): obj_pin makes it."""
        pending = self.pending.get((parent, name))
        if pending is not None:
            pending.done.set()

    def open(self, ctx: list[int], ino: int, flags: int) -> int:
        node = self.tree.node(ino)
        if not isinstance(node, Pin):
            raise BpfError(errno.EISDIR if isinstance(node, Dir) else errno.EIO, "not a pin")
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise BpfError(errno.EIO, "pins cannot be written")
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        self._open[fh] = (node, PinText(node.obj, self.describe_object))
        self.tree.opened(node, +1)
        return fh

    def read(self, fh: int, off: int, size: int) -> bytes | None:
        """Bytes at off; None: not rendered yet, ask again (render.PinText.read)."""
        return self._open[fh][1].read(off, size)

    def release(self, fh: int) -> None:
        opened = self._open.pop(fh, None)
        if opened is not None:
            self.tree.opened(opened[0], -1)

    def release_all(self) -> None:
        """A mount went away: its open files are closed with it."""
        for fh in list(self._open):
            self.release(fh)

    def readdir(self, ino: int, after: int, count: int) -> list[list[Any]]:
        d = self.tree.dir(ino)
        return [[name, cookie, attrs(node)] for name, cookie, node in d.listing(after, count)]

