"""What is persisted, as records: the same vocabulary for the journal and the snapshot.

Persisted are the pinned objects of named instances (the default one included) and what they
hold (a program's maps, a prog_array's programs), with the trees of those instances. Records
name objects by the id they have in the running daemon and nodes by inode number; a restore
rebuilds the objects (new ids) and the trees (same inode numbers). Records:

  ("map", id, type, key_size, value_size, max_entries, flags, name, uid)
  ("elems", id, [[key, value], ...])        whole contents of a data map (a large one in
                                            slices: records.py)
  ("set", id, [[key, value], ...])          elements of a data map, written
  ("del", id, [key, ...])                   elements of a data map, deleted
  ("slot", id, key, prog_id | None)         one slot of a prog_array
  ("prog", id, type, xlated insns, [map ids], license, name, kern_version, uid)
  ("instance", name)
  ("tree", instance, op, *args)             a Tree operation (tree.py on_op); a pinned
                                            object as [kind, id] (maps and programs have
                                            separate id spaces)
  ("free", kind, id)                        a recorded object was freed: the replay stops
                                            holding (and charging) it there, as the live
                                            run did

Perf events are never persisted (they belong to a reader process): a restored
PERF_EVENT_ARRAY is empty, as is a kernel's whose readers went away.

A data map's contents are recorded as a `Contents`: the event loop only notes its place, and
the elements are read when the record is written, in the journal's or the snapshot's thread.
That is safe because every later change to a recorded map is recorded after it (syscall writes
as "set"/"del", program writes by the next flush's "elems"): whatever an element read late
shows, the records after it end with the element's latest value, so the replay does too (a
fuzzy checkpoint). The maps read this way (array, hash) tolerate being read from a thread
while the loop writes them: an array's storage never moves, a hash map's items() iterates a
copy of its key order and skips keys deleted meanwhile. Elements are (key, value) tuples, not
lists: the garbage collector stops tracking a tuple of bytes, so a million of them waiting in
the journal's buffer do not make its full collections (which hold the GIL) slower.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from bpffs import vm
from bpffs.vm.errors import BpfError
from bpffs.vm.maps import ArrayMap, FdArrayMap, HashMap, ProgArrayMap, create_map
from bpffs.vm.maps.base import pages
from bpffs.vm.uapi import BPF_ANY

from ..fs.tree import ROOT_INO, Caller, Dir, Pin, Symlink, Tree
from ..store import BpfObject, Kind
from ..syscall import BPF_PROG_HEADER
from . import records

if TYPE_CHECKING:
    from ..daemon import Daemon
    from ..fs.instance import Instance

log = logging.getLogger(__name__)
Record = tuple


class Contents(records.Lazy):
    """("elems", id, items) of a data map, its items read when the record is written."""

    def __init__(self, obj_id: int, impl: ArrayMap | HashMap):
        self.obj_id = obj_id
        self.impl = impl

    def records(self) -> Iterator[Record]:
        return records.slices("elems", self.obj_id, self.impl.items())  # (key, value) pairs


def contents(obj: BpfObject) -> Record | Contents:
    """The record of a data map's whole contents: a Contents for the types that may be read
    off the loop, else (another type) the elements as they are now."""
    impl = obj.impl
    if type(impl) in (ArrayMap, HashMap):
        return Contents(obj.id, impl)
    return ("elems", obj.id, list(impl.items()))


class Recorder:
    """Turns live state into records, writing each persisted object once (before the first
    record that refers to it)."""

    def __init__(self, emit: Callable[[Record], None], of: Callable[[Any], BpfObject]):
        self.emit = emit
        self.of = of
        self.recorded: set[BpfObject] = set()

    def ensure(self, obj: BpfObject) -> int | None:
        """The object's id, after recording it (and what it holds) if it is new here."""
        if obj.kind == Kind.PERF_EVENT:
            return None
        if obj in self.recorded:
            return obj.id
        self.recorded.add(obj)
        impl = obj.impl
        if obj.kind == Kind.MAP:
            self.emit(("map", obj.id, impl.map_type, impl.key_size, impl.value_size,
                       impl.max_entries, impl.flags, impl.name, obj.uid))
            if isinstance(impl, ProgArrayMap):
                for key, prog in list(impl.items()):
                    self.emit(("slot", obj.id, key, self.ensure(self.of(prog))))
            elif not isinstance(impl, FdArrayMap):
                self.emit(contents(obj))
        else:
            map_ids = [self.ensure(self.of(m)) for m in impl.maps]
            self.emit(("prog", obj.id, impl.prog_type, impl.insns, map_ids, impl.license,
                       impl.name, impl.kern_version, obj.uid))
        return obj.id

    def keys_changed(self, obj: BpfObject, keys: list[bytes]) -> None:
        impl = obj.impl
        if isinstance(impl, ProgArrayMap):
            for key in keys:
                prog = impl.get(int.from_bytes(key, "little"))
                self.emit(("slot", obj.id, key,
                           None if prog is None else self.ensure(self.of(prog))))
        elif not isinstance(impl, FdArrayMap):  # one record per request, however many keys
            written, deleted = [], []
            for key in keys:
                value = impl.lookup(key)
                if value is None:
                    deleted.append(key)
                else:
                    written.append((key, bytes(value)))
            if written:
                self.emit(("set", obj.id, written))
            if deleted:
                self.emit(("del", obj.id, deleted))

    def freed(self, obj: BpfObject) -> None:
        """A recorded object is gone: say so, so that a replay frees it at the same point."""
        if obj in self.recorded:
            self.recorded.discard(obj)
            self.emit(("free", obj.kind.value, obj.id))

    def contents(self, obj: BpfObject) -> None:
        self.emit(contents(obj))

    def tree_op(self, instance: str, op: str, args: tuple) -> None:
        if op == "pin":
            parent, name, obj, *rest = args
            args = (parent, name, [obj.kind.value, self.ensure(obj)], *rest)
        self.emit(("tree", instance, op, *args))


def snapshot(instances: list[Instance], of: Callable[[Any], BpfObject]
             ) -> tuple[list[Record], set[BpfObject]]:
    """Records that rebuild every persisted instance from nothing, and the objects in them."""
    out: list[Record] = []
    recorder = Recorder(out.append, of)
    for inst in instances:
        out.append(("instance", inst.name))
        for record in _tree_records(inst.tree):
            recorder.tree_op(inst.name, record[0], record[1:])
    return out, recorder.recorded


def _tree_records(tree: Tree) -> Iterator[tuple]:
    root = tree.root
    yield ("chmod", ROOT_INO, root.mode & 0o7777)
    yield ("chown", ROOT_INO, root.uid, root.gid)
    seen: set[int] = set()
    stack: list[Dir] = [root]
    while stack:
        d = stack.pop()
        for name, node in d.children.items():
            if node.ino in seen:
                yield ("link", node.ino, d.ino, name)
                continue
            seen.add(node.ino)
            if isinstance(node, Dir):
                yield ("mkdir", d.ino, name, node.mode, node.uid, node.gid, node.ino)
                stack.append(node)
            elif isinstance(node, Pin):
                yield ("pin", d.ino, name, node.obj, node.mode, node.uid, node.gid, node.ino)
            elif isinstance(node, Symlink):
                yield ("symlink", d.ino, name, node.target, node.uid, node.gid, node.ino)
            yield ("chmod", node.ino, node.mode & 0o7777)
            yield ("chown", node.ino, node.uid, node.gid)


class Replayer:
    """Applies records to a daemon being started. Each object is held, as its creator's fd
    held it, until its ("free") record or the end of the replay, so those no pin holds any
    more are freed then. Run it inside `Store.uncapped()`: the journal may create objects
    that a later record frees, so the daemon-wide cap is checked by `place`, on what
    survives."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.store = daemon.store
        self.objects: dict[tuple[Kind, int], BpfObject] = {}
        self.created: list[BpfObject] = []  # in the order the records created them
        self.problems: list[str] = []
        self.unplaced: list[dict[str, Any]] = []
        self.applied = 0

    def apply_all(self, records: list[Record]) -> None:
        for record in records:
            try:
                getattr(self, f"_{record[0]}")(*record[1:])
                self.applied += 1
            except (BpfError, KeyError, TypeError, ValueError, AttributeError) as e:
                self.problems.append(f"record {record[:3]!r}: {e}")
                log.error("could not restore %r: %s", record[:3], e)

    def finish(self) -> None:
        for obj in self.objects.values():
            if not obj.freed:
                self.store.put(obj)
        self.objects.clear()

    def place(self) -> None:
        """Fit the surviving objects under the daemon-wide cap: while over it, unpin the most
        recently created pinned object, reporting it in `unplaced` (the caller then keeps the
        state directory as it is, so nothing is lost)."""
        survivors = [obj for obj in self.created if not obj.freed and obj.pins]
        while self.store.over_cap() and survivors:
            obj = survivors.pop()
            if obj.freed or not obj.pins:
                continue
            in_use, limit = self.store.total_pages, self.store.limit_pages
            paths = self.daemon.fs.pin_paths(obj)
            for inst in list(self.daemon.fs.named.values()):
                tree = inst.tree
                for path, node in list(tree.entries()):
                    if isinstance(node, Pin) and node.obj is obj:
                        parent, _, name = path.rpartition(b"/")
                        tree.unlink(tree.dir(tree.walk(parent).ino), name)
            name = getattr(obj.impl, "name", "") or ""
            reason = (f"the restored state needs {in_use} pages but --memory-limit allows"
                      f" {limit}; this {obj.kind} uses {obj.pages}")
            self.unplaced.append({"kind": obj.kind.value, "name": name, "pages": obj.pages,
                                  "paths": paths, "reason": reason})
            log.error("could not place %s %r pinned at %s: %s", obj.kind, name,
                      ", ".join(paths), reason)

    def _add(self, old_id: int, kind: Kind, impl: Any, uid: int, npages: int) -> None:
        obj = self.store.add(kind, impl, uid, npages, None)
        self.store.hold(obj)
        self.objects[(kind, old_id)] = obj
        self.created.append(obj)

    def _free(self, kind: str, old_id: int) -> None:
        obj = self.objects.pop((Kind(kind), old_id))
        if not obj.freed:
            self.store.put(obj)

    def _map(self, old_id: int, map_type: int, key_size: int, value_size: int,
             max_entries: int, flags: int, name: str, uid: int) -> None:
        impl = create_map(map_type, key_size, value_size, max_entries, flags, name)
        self._add(old_id, Kind.MAP, impl, uid, impl.memlock_pages)

    def _get(self, kind: Kind, old_id: int) -> BpfObject:
        return self.objects[(kind, old_id)]

    # `more` (records.py): a slice of a large record, more slices follow
    def _elems(self, old_id: int, items: list, more: int = 0) -> None:
        impl = self._get(Kind.MAP, old_id).impl
        for key, _ in list(impl.items()):
            try:
                impl.delete(key)
            except BpfError:
                pass  # arrays cannot delete: their elements are overwritten below
        for key, value in items:
            impl.update(key, value, BPF_ANY)

    def _set(self, old_id: int, items: list, more: int = 0) -> None:
        impl = self._get(Kind.MAP, old_id).impl
        for key, value in items:
            impl.update(key, value, BPF_ANY)

    def _del(self, old_id: int, keys: list, more: int = 0) -> None:
        impl = self._get(Kind.MAP, old_id).impl
        for key in keys:
            try:
                impl.delete(key)
            except BpfError as e:
                if e.errno != errno.ENOENT:
                    raise

    def _slot(self, old_id: int, key: bytes, prog_id: int | None) -> None:
        impl = self._get(Kind.MAP, old_id).impl
        if prog_id is None:
            try:
                impl.delete(key)
            except BpfError:
                pass
            return
        member = self._get(Kind.PROG, prog_id)
        self.store.put_in_fd_array(impl, key, member, BPF_ANY)

    def _prog(self, old_id: int, prog_type: int, insns: bytes, map_ids: list[int],
              license: str, name: str, kern_version: int, uid: int) -> None:
        maps = [self._get(Kind.MAP, i).impl for i in map_ids]
        prog, _ = vm.load_program(prog_type, insns, license=license, resolve_map=maps.__getitem__,
                                  kern_version=kern_version, name=name, privileged=True)
        self._add(old_id, Kind.PROG, prog, uid, pages(BPF_PROG_HEADER + len(insns)))

    def _instance(self, name: str) -> None:
        self.daemon.fs.instance(name)

    def _tree(self, instance: str, op: str, *args: Any) -> None:
        tree = self.daemon.fs.instance(instance).tree
        if op == "mkdir":
            parent, name, mode, uid, gid, ino = args
            tree.mkdir(tree.dir(parent), name, mode, Caller(uid, gid, 0), ino=ino)
        elif op == "pin":
            parent, name, (kind, obj_id), mode, uid, gid, ino = args
            tree.pin(tree.dir(parent), name, self._get(Kind(kind), obj_id), Caller(uid, gid, 0),
                     mode=mode, ino=ino)
        elif op == "symlink":
            parent, name, target, uid, gid, ino = args
            tree.symlink(tree.dir(parent), name, target, Caller(uid, gid, 0), ino=ino)
        elif op == "link":
            ino, parent, name = args
            tree.link(tree.node(ino), tree.dir(parent), name)
        elif op in ("unlink", "rmdir"):
            parent, name = args
            getattr(tree, op)(tree.dir(parent), name)
        elif op == "rename":
            old_parent, old_name, new_parent, new_name, flags = args
            tree.rename(tree.dir(old_parent), old_name, tree.dir(new_parent), new_name, flags)
        elif op == "chmod":
            tree.chmod(tree.node(args[0]), args[1])
        elif op == "chown":
            tree.chown(tree.node(args[0]), args[1], args[2])
        else:
            raise ValueError(f"unknown tree operation {op!r}")
