"""A bpffs tree: directories, pins and symlinks, with the kernel's rules (kernel/bpf/inode.c).

Every operation the filesystem offers lives here once, whether it arrives from a shell tool
through FUSE or from a client through the control socket, and fails with the errno the kernel's
bpffs gives (measured on this machine, see DESIGN.md):
- names containing '.' are EPERM (bpf_lookup), '.'/'..' as a new name EEXIST, > 255 bytes
  ENAMETOOLONG; pins are regular empty files, mode 0600 minus umask; directories keep the
  creator's mode; the root is 1777;
- a pin holds one reference on its object, held as long as any hard link names it (and while
  the file is open): the object can outlive the last link by nothing else.

Inode numbers are never reused, so an entry the kernel still caches can never name another
node; nodes leave the table when their last link and last open handle are gone.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from bpffs.vm.errors import BpfError

NAME_MAX = 255
ROOT_INO = 1
ROOT_MODE = stat.S_IFDIR | stat.S_ISVTX | 0o777
PIN_PERM = 0o600
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1


@dataclass(frozen=True)
class Caller:
    """Who performs an operation: from SO_PEERCRED (control socket) or the FUSE request."""

    uid: int
    gid: int
    umask: int = 0o022
    groups: frozenset[int] = frozenset()

    @property
    def root(self) -> bool:
        return self.uid == 0

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups


ROOT = Caller(0, 0, 0)

MAY_EXEC, MAY_WRITE, MAY_READ = 1, 2, 4


def _now() -> int:
    return time.time_ns()


@dataclass(eq=False)
class Node:
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int = 1
    atime: int = field(default_factory=_now)
    mtime: int = 0
    ctime: int = 0
    opened: int = 0  # open file handles (FUSE open/opendir)

    def __post_init__(self) -> None:
        self.mtime = self.ctime = self.atime

    def touch(self, modified: bool = True) -> None:
        now = _now()
        if modified:
            self.mtime = now
        self.ctime = now

    def permits(self, caller: Caller, mask: int) -> bool:
        """generic_permission(): owner, group, other bits; root passes all but exec, which
        needs some x bit on files."""
        if caller.root:
            return not (mask & MAY_EXEC) or stat.S_ISDIR(self.mode) or bool(self.mode & 0o111)
        if caller.uid == self.uid:
            bits = (self.mode >> 6) & 7
        elif caller.in_group(self.gid):
            bits = (self.mode >> 3) & 7
        else:
            bits = self.mode & 7
        return bits & mask == mask

    @property
    def kind(self) -> str:
        return "node"


# readdir cookies: '.' and '..' come first, children are numbered from FIRST_COOKIE on.
DOT_COOKIE, DOTDOT_COOKIE, FIRST_COOKIE = 1, 2, 3


@dataclass(eq=False)
class Dir(Node):
    """Children in insertion order, each with a readdir cookie that never changes while the
    entry exists: a listing resumed after cookie c neither skips nor repeats an entry."""

    parent: Dir | None = None
    children: dict[bytes, Node] = field(default_factory=dict)
    _cookie: dict[bytes, int] = field(default_factory=dict)
    _order: list[tuple[int, bytes]] = field(default_factory=list)  # stale entries skipped
    _next_cookie: int = FIRST_COOKIE
    charged: dict[bytes, int] = field(default_factory=dict)  # name -> uid its entry counts for

    @property
    def kind(self) -> str:
        return "directory"

    def add(self, name: bytes, node: Node, charged: int | None = None) -> None:
        cookie, self._next_cookie = self._next_cookie, self._next_cookie + 1
        self.children[name] = node
        if charged is not None:
            self.charged[name] = charged
        self._cookie[name] = cookie
        self._order.append((cookie, name))

    def remove(self, name: bytes) -> Node:
        node = self.children.pop(name)
        del self._cookie[name]
        self.charged.pop(name, None)
        if len(self._order) > 64 + 2 * len(self.children):
            self._order = [(c, n) for c, n in self._order if self._cookie.get(n) == c]
        return node

    def listing(self, after: int, count: int) -> list[tuple[bytes, int, Node]]:
        """Up to count (name, cookie, node) with cookies above `after`, '.' and '..' first."""
        out: list[tuple[bytes, int, Node]] = []
        if after < DOT_COOKIE:
            out.append((b".", DOT_COOKIE, self))
        if after < DOTDOT_COOKIE:
            out.append((b"..", DOTDOT_COOKIE, self.parent or self))
        start = bisect.bisect_right(self._order, after, key=lambda entry: entry[0])
        for cookie, name in itertools.islice(self._order, start, None):
            if len(out) >= count:
                break
            if self._cookie.get(name) == cookie:
                out.append((name, cookie, self.children[name]))
        return out[:count]


@dataclass(eq=False)
class Pin(Node):
    obj: Any = None  # the BpfObject this pin holds a reference on

    @property
    def kind(self) -> str:
        return "pin"


@dataclass(eq=False)
class Symlink(Node):
    target: bytes = b""
    charged: int | None = None  # the uid its target's bytes count for


    @property
    def kind(self) -> str:
        return "symlink"


def check_name(name: bytes) -> None:
    """What bpffs (and the VFS before it) allow as a new entry's name."""
    if name in (b".", b".."):
        raise BpfError(errno.EEXIST, f"{name.decode()!r} always exists")
    if not name or b"/" in name or b"\0" in name:
        raise BpfError(errno.EINVAL, f"invalid name {name!r}: one path component, no '/' or NUL")
    if len(name) > NAME_MAX:
        raise BpfError(errno.ENAMETOOLONG, f"name of {len(name)} bytes exceeds {NAME_MAX}")
    if b"." in name:
        raise BpfError(errno.EPERM, f"bpffs names may not contain '.' ({name!r}): dots are"
                       " reserved, as in the kernel's bpffs")


class NodeQuota:
    """Entries (names) made in bpffs trees and bytes of symlink targets, counted per uid that
    made them, across every instance: the kernel's bpffs inodes are kernel memory charged to
    the creator's memcg; ours are the daemon's memory, so each user gets a share
    (--max-fs-nodes-per-uid, --max-symlink-bytes-per-uid) and is refused beyond it with
    EDQUOT, as a filesystem refuses a user over its inode quota. A count is released when
    the entry is removed (the bytes with the symlink's last link). Root is never refused nor
    counted. Trees rebuilt from the state directory count each entry for its owner and are
    never refused: what was acknowledged stays."""

    def __init__(self, max_entries: int | None = None, max_symlink_bytes: int | None = None):
        self.max_entries, self.max_symlink_bytes = max_entries, max_symlink_bytes
        self.entries: Counter[int] = Counter()
        self.symlink_bytes: Counter[int] = Counter()

    def check(self, uid: int, nbytes: int = 0) -> None:
        """Raise EDQUOT unless uid may make one more entry (with nbytes of symlink target)."""
        if uid == 0:
            return
        if self.max_entries is not None and self.entries[uid] + 1 > self.max_entries:
            raise BpfError(errno.EDQUOT, f"uid {uid} has made {self.entries[uid]} bpffs"
                           " entries (directories, pins, symlinks, links), the most bpffsd"
                           f" allows a user (--max-fs-nodes-per-uid {self.max_entries})")
        if (nbytes and self.max_symlink_bytes is not None
                and self.symlink_bytes[uid] + nbytes > self.max_symlink_bytes):
            raise BpfError(errno.EDQUOT, f"uid {uid} has {self.symlink_bytes[uid]} bytes of"
                           f" symlink targets in bpffs; {nbytes} more would exceed what"
                           " bpffsd allows a user (--max-symlink-bytes-per-uid"
                           f" {self.max_symlink_bytes})")

    def charge(self, uid: int, entries: int = 0, nbytes: int = 0) -> int | None:
        """Count for uid; returns the uid charged (None: root, not counted)."""
        if uid == 0:
            return None
        if entries:
            self.entries[uid] += entries
        if nbytes:
            self.symlink_bytes[uid] += nbytes
        return uid

    def uncharge(self, uid: int | None, entries: int = 0, nbytes: int = 0) -> None:
        if uid is None:
            return
        for counter, n in ((self.entries, entries), (self.symlink_bytes, nbytes)):
            if n:
                counter[uid] -= n
                if counter[uid] <= 0:
                    del counter[uid]


def _live(caller: Caller, ino: int | None) -> int | None:
    """The uid whose quota a creation is checked against: the caller's, unless the creation
    restores a given inode from the state directory (never refused)."""
    return caller.uid if ino is None else None


def show(name: bytes) -> str:
    """A name or path for messages and listings: non-UTF-8 bytes as \\x escapes."""
    return name.decode(errors="backslashreplace")


class Tree:
    """The nodes of one bpffs instance. `hold`/`release` are the store's reference calls on
    pinned objects; `on_change` hears of every change (mount invalidation, journal)."""

    def __init__(self, hold: Callable[[Any], None], release: Callable[[Any], None],
                 mode: int = ROOT_MODE, uid: int = 0, gid: int = 0):
        self._hold, self._release = hold, release
        self.root = Dir(ROOT_INO, mode | stat.S_IFDIR, uid, gid, nlink=2)
        self.nodes: dict[int, Node] = {ROOT_INO: self.root}
        self._next_ino = ROOT_INO + 1
        self.quota = NodeQuota()  # unlimited unless the daemon shares its own (Filesystems)
        self.on_change: list[Callable[[str, Dir, bytes, Node | None], None]] = []
        # Every successful mutation as (operation, args): the journal replays them.
        self.on_op: list[Callable[[str, tuple], None]] = []

    # -- lookup -------------------------------------------------------------------------------
    def node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise BpfError(errno.ENOENT, f"inode {ino} no longer exists")
        return node

    def dir(self, ino: int) -> Dir:
        node = self.node(ino)
        if not isinstance(node, Dir):
            raise BpfError(errno.ENOTDIR, f"inode {ino} is a {node.kind}, not a directory")
        return node

    def lookup(self, parent: Dir, name: bytes) -> Node:
        if b"." in name and name not in (b".", b".."):
            raise BpfError(errno.EPERM, f"bpffs names may not contain '.' ({show(name)!r})")
        if name == b".":
            return parent
        if name == b"..":
            return parent.parent or parent
        node = parent.children.get(name)
        if node is None:
            raise BpfError(errno.ENOENT, f"no entry {show(name)!r} in this directory")
        return node

    def walk(self, path: bytes) -> Node:
        """Resolve a path from the root, following no symlinks (for internal use: the
        journal, tc's conventions). Clients resolve paths through the kernel."""
        node: Node = self.root
        for part in [p for p in path.split(b"/") if p]:
            if not isinstance(node, Dir):
                raise BpfError(errno.ENOTDIR, f"{show(path)!r}: a component is not a directory")
            node = self.lookup(node, part)
        return node

    def path_of(self, node: Node, caller: Caller = ROOT) -> list[bytes]:
        """Every path naming node (hard links give several), relative to the root, that
        caller could look up: a directory it may not search hides what is below it."""
        found: list[bytes] = []

        def visit(d: Dir, prefix: bytes) -> None:
            if not d.permits(caller, MAY_EXEC):
                return
            for name, child in d.children.items():
                if child is node:
                    found.append(prefix + name)
                if isinstance(child, Dir):
                    visit(child, prefix + name + b"/")

        if node is self.root:
            return [b""]
        visit(self.root, b"")
        return found

    def entries(self) -> Iterator[tuple[bytes, Node]]:
        """Every (path, node) below the root, parents before children."""
        stack: list[tuple[bytes, Dir]] = [(b"", self.root)]
        while stack:
            prefix, d = stack.pop()
            for name, child in d.children.items():
                yield prefix + name, child
                if isinstance(child, Dir):
                    stack.append((prefix + name + b"/", child))

    # -- creation -----------------------------------------------------------------------------
    def _new_ino(self, ino: int | None = None) -> int:
        """A fresh inode number, or `ino` when replaying the journal."""
        if ino is None:
            ino = self._next_ino
        elif ino in self.nodes:
            raise BpfError(errno.EEXIST, f"inode {ino} exists already")
        self._next_ino = max(self._next_ino, ino + 1)
        return ino

    def _op(self, name: str, *args: Any) -> None:
        for hook in self.on_op:
            hook(name, args)

    def _check_create(self, parent: Dir, name: bytes, caller: Caller | None,
                      quota: int | None = None, nbytes: int = 0) -> None:
        """quota: the uid the new entry counts for, checked against its NodeQuota (None: a
        restore from the state directory, never refused)."""
        check_name(name)
        if name in parent.children:
            raise BpfError(errno.EEXIST, f"{show(name)!r} already exists")
        if caller is not None and not parent.permits(caller, MAY_WRITE | MAY_EXEC):
            raise BpfError(errno.EACCES, f"no write permission on the directory to create"
                           f" {show(name)!r}")
        if parent.nlink == 0:
            raise BpfError(errno.ENOENT, "the directory has been removed")
        if quota is not None:
            self.quota.check(quota, nbytes)

    def _attach(self, parent: Dir, name: bytes, node: Node, uid: int) -> Node:
        """Add the entry, counted for uid in the quota."""
        parent.add(name, node, self.quota.charge(uid, entries=1))
        parent.touch()
        self.nodes[node.ino] = node
        self._changed("create", parent, name, node)
        return node

    def mkdir(self, parent: Dir, name: bytes, mode: int, caller: Caller,
              check: bool = False, ino: int | None = None) -> Dir:
        """mode arrives with the umask applied (by the VFS, or by the client)."""
        self._check_create(parent, name, caller if check else None, _live(caller, ino))
        node = Dir(self._new_ino(ino), stat.S_IFDIR | (mode & 0o7777), caller.uid,
                   self._inherit_gid(parent, caller), nlink=2, parent=parent)
        parent.nlink += 1
        self._attach(parent, name, node, caller.uid)
        self._op("mkdir", parent.ino, name, node.mode, caller.uid, caller.gid, node.ino)
        return node

    def check_pin(self, parent: Dir, name: bytes, caller: Caller) -> None:
        """Raise what pin(..., check=True) would refuse, creating nothing."""
        self._check_create(parent, name, caller, caller.uid)

    def pin(self, parent: Dir, name: bytes, obj: Any, caller: Caller, check: bool = False,
            mode: int | None = None, ino: int | None = None) -> Pin:
        """BPF_OBJ_PIN: a new regular file holding a reference on obj."""
        self._check_create(parent, name, caller if check else None, _live(caller, ino))
        perm = PIN_PERM & ~caller.umask if mode is None else mode & 0o7777
        node = Pin(self._new_ino(ino), stat.S_IFREG | perm, caller.uid,
                   self._inherit_gid(parent, caller), obj=obj)
        self._hold(obj)
        obj.pins.add(node)
        self._attach(parent, name, node, caller.uid)
        self._op("pin", parent.ino, name, obj, node.mode, caller.uid, caller.gid, node.ino)
        return node

    def symlink(self, parent: Dir, name: bytes, target: bytes, caller: Caller,
                ino: int | None = None) -> Symlink:
        if not target or b"\0" in target or len(target) >= 4096:
            raise BpfError(errno.EINVAL if target else errno.ENOENT, "invalid symlink target")
        self._check_create(parent, name, None, _live(caller, ino), len(target))
        node = Symlink(self._new_ino(ino), stat.S_IFLNK | 0o777, caller.uid,
                       self._inherit_gid(parent, caller), target=target,
                       charged=self.quota.charge(caller.uid, nbytes=len(target)))
        self._attach(parent, name, node, caller.uid)
        self._op("symlink", parent.ino, name, target, caller.uid, caller.gid, node.ino)
        return node

    def link(self, node: Node, parent: Dir, name: bytes, caller: Caller | None = None) -> Node:
        """caller: who links (its entry counts for it); None: a restore, counted for the
        node's owner."""
        if isinstance(node, Dir):
            raise BpfError(errno.EPERM, "hard links to directories are not allowed")
        self._check_create(parent, name, None, caller.uid if caller is not None else None)
        if node.nlink == 0:
            raise BpfError(errno.ENOENT, "the file has been removed")
        node.nlink += 1
        node.touch(modified=False)
        self._attach(parent, name, node, caller.uid if caller is not None else node.uid)
        self._op("link", node.ino, parent.ino, name)
        return node

    @staticmethod
    def _inherit_gid(parent: Dir, caller: Caller) -> int:
        return parent.gid if parent.mode & stat.S_ISGID else caller.gid

    # -- removal ------------------------------------------------------------------------------
    def unlink(self, parent: Dir, name: bytes) -> None:
        node = self.lookup(parent, name)
        if isinstance(node, Dir):
            raise BpfError(errno.EISDIR, f"{show(name)!r} is a directory (use rmdir)")
        self._detach(parent, name, node)
        self._op("unlink", parent.ino, name)

    def rmdir(self, parent: Dir, name: bytes) -> None:
        if name == b".":
            raise BpfError(errno.EINVAL, "cannot remove '.'")
        if name == b"..":
            raise BpfError(errno.ENOTEMPTY, "cannot remove '..'")
        node = self.lookup(parent, name)
        if not isinstance(node, Dir):
            raise BpfError(errno.ENOTDIR, f"{show(name)!r} is a {node.kind}, not a directory")
        if node.children:
            raise BpfError(errno.ENOTEMPTY, f"directory {show(name)!r} is not empty")
        parent.nlink -= 1
        node.nlink = 0
        self._remove_entry(parent, name)
        parent.touch()
        self._changed("remove", parent, name, node)
        self._maybe_drop(node)
        self._op("rmdir", parent.ino, name)

    def _remove_entry(self, parent: Dir, name: bytes) -> Node:
        """Remove an entry for good (not moved): its count in the quota is released."""
        self.quota.uncharge(parent.charged.get(name), entries=1)
        return parent.remove(name)

    def _detach(self, parent: Dir, name: bytes, node: Node) -> None:
        self._remove_entry(parent, name)
        parent.touch()
        node.nlink -= 1
        node.touch(modified=False)
        self._changed("remove", parent, name, node)
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        """Forget a node with no link left; a pin's reference goes with its last link and
        last open handle (the kernel's evict_inode)."""
        if node.nlink > 0 or node.opened > 0:
            return
        self.nodes.pop(node.ino, None)
        if isinstance(node, Symlink):
            self.quota.uncharge(node.charged, nbytes=len(node.target))
            node.charged = None
        if isinstance(node, Pin) and node.obj is not None:
            obj, node.obj = node.obj, None
            obj.pins.discard(node)
            self._release(obj)

    def opened(self, node: Node, delta: int) -> None:
        node.opened += delta
        if delta < 0:
            self._maybe_drop(node)

    # -- rename -------------------------------------------------------------------------------
    def rename(self, old_parent: Dir, old_name: bytes, new_parent: Dir, new_name: bytes,
               flags: int = 0) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (RENAME_NOREPLACE
                                                                      | RENAME_EXCHANGE):
            raise BpfError(errno.EINVAL, f"unsupported rename flags {flags:#x}")
        node = self.lookup(old_parent, old_name)
        self._rename(old_parent, old_name, node, new_parent, new_name, flags)
        self._op("rename", old_parent.ino, old_name, new_parent.ino, new_name, flags)

    def _rename(self, old_parent: Dir, old_name: bytes, node: Node, new_parent: Dir,
                new_name: bytes, flags: int) -> None:
        if new_name in (b".", b".."):
            raise BpfError(errno.EBUSY if old_name in (b".", b"..") else errno.EEXIST,
                           "cannot rename over '.' or '..'")
        check_name(new_name)
        target = new_parent.children.get(new_name)
        if target is node:
            return  # same file: rename(2) does nothing
        if isinstance(node, Dir) and self._is_ancestor(node, new_parent):
            raise BpfError(errno.EINVAL, "cannot move a directory into itself")
        if flags & RENAME_EXCHANGE:
            if target is None:
                raise BpfError(errno.ENOENT, f"{show(new_name)!r} does not exist to exchange")
            if isinstance(target, Dir) and self._is_ancestor(target, old_parent):
                raise BpfError(errno.EINVAL, "cannot move a directory into itself")
            self._exchange(old_parent, old_name, node, new_parent, new_name, target)
            return
        if target is not None:
            if flags & RENAME_NOREPLACE:
                raise BpfError(errno.EEXIST, f"{show(new_name)!r} already exists")
            if isinstance(node, Dir) and not isinstance(target, Dir):
                raise BpfError(errno.ENOTDIR, f"{show(new_name)!r} is not a directory")
            if not isinstance(node, Dir) and isinstance(target, Dir):
                raise BpfError(errno.EISDIR, f"{show(new_name)!r} is a directory")
            if isinstance(target, Dir):
                self.rmdir(new_parent, new_name)  # ENOTEMPTY unless empty
            else:
                self._detach(new_parent, new_name, target)
        charged = old_parent.charged.get(old_name)  # a moved entry keeps its count
        old_parent.remove(old_name)
        new_parent.add(new_name, node, charged)
        if isinstance(node, Dir) and old_parent is not new_parent:
            node.parent = new_parent
            old_parent.nlink -= 1
            new_parent.nlink += 1
        old_parent.touch()
        new_parent.touch()
        node.touch(modified=False)
        self._changed("remove", old_parent, old_name, node)
        self._changed("create", new_parent, new_name, node)

    def _exchange(self, a_dir: Dir, a_name: bytes, a: Node, b_dir: Dir, b_name: bytes,
                  b: Node) -> None:
        a_charged, b_charged = a_dir.charged.get(a_name), b_dir.charged.get(b_name)
        a_dir.remove(a_name)
        b_dir.remove(b_name)
        a_dir.add(a_name, b, b_charged)
        b_dir.add(b_name, a, a_charged)
        for node, new_dir, old_dir in ((a, b_dir, a_dir), (b, a_dir, b_dir)):
            if isinstance(node, Dir) and new_dir is not old_dir:
                node.parent = new_dir
                old_dir.nlink -= 1
                new_dir.nlink += 1
            node.touch(modified=False)
        a_dir.touch()
        b_dir.touch()
        self._changed("remove", a_dir, a_name, b)
        self._changed("remove", b_dir, b_name, a)

    @staticmethod
    def _is_ancestor(node: Dir, d: Dir | None) -> bool:
        while d is not None:
            if d is node:
                return True
            d = d.parent
        return False

    # -- attributes ---------------------------------------------------------------------------
    def chmod(self, node: Node, mode: int) -> None:
        node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
        node.touch(modified=False)
        self._changed("attr", None, b"", node)  # type: ignore[arg-type]
        self._op("chmod", node.ino, mode & 0o7777)

    def chown(self, node: Node, uid: int | None, gid: int | None) -> None:
        if uid is not None:
            node.uid = uid
        if gid is not None:
            node.gid = gid
        node.touch(modified=False)
        self._changed("attr", None, b"", node)  # type: ignore[arg-type]
        self._op("chown", node.ino, uid, gid)

    def _changed(self, what: str, parent: Dir | None, name: bytes, node: Node | None) -> None:
        for hook in self.on_change:
            hook(what, parent, name, node)  # type: ignore[arg-type]

    def clear(self) -> None:
        """Drop every pin (an unnamed instance whose last mount went away)."""
        for d in [self.root, *(n for _path, n in self.entries() if isinstance(n, Dir))]:
            for uid in d.charged.values():
                self.quota.uncharge(uid, entries=1)
            d.charged.clear()
        for _path, node in list(self.entries()):
            if isinstance(node, Symlink):
                self.quota.uncharge(node.charged, nbytes=len(node.target))
                node.charged = None
            if isinstance(node, Pin) and node.obj is not None:
                node.nlink = 0
                node.opened = 0
                self._maybe_drop(node)
        for name in list(self.root.children):
            self.root.remove(name)
        self.nodes = {ROOT_INO: self.root}
