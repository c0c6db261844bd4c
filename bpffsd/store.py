"""The refcounted object store: every map, program and perf event the daemon holds.

The kernel's rules (kernel/bpf/syscall.c, 4.4):
- an object lives while it has a reference: an fd, a pin, or an internal one (a program holds
  the maps it uses; a prog_array or perf_event_array holds the objects in its slots);
- fds and pins are *user* references (map->usercnt). When the last user reference of a
  prog_array goes, its slots are cleared: that breaks the cycles tail calls can build
  (prog -> prog_array -> prog), even while a program still references the array;
- creating an object charges its pages to the creator's RLIMIT_MEMLOCK (EPERM when over);
  freeing it uncharges them. Ids are per kind and never reused while the daemon runs.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from bpffs.vm.errors import BpfError
from bpffs.vm.maps import BpfMap, FdArrayMap, ProgArrayMap
from bpffs.vm.program import Program
from bpffs.vm.uapi import PAGE_SIZE

log = logging.getLogger(__name__)


class Kind(StrEnum):
    MAP = "map"
    PROG = "prog"
    PERF_EVENT = "perf_event"


@dataclass(eq=False)
class BpfObject:
    kind: Kind
    id: int
    impl: Any  # BpfMap, Program or PerfEvent
    uid: int  # the creator, charged for `pages`
    pages: int
    created: float = field(default_factory=time.time)
    refcnt: int = 0
    usercnt: int = 0
    freed: bool = False
    pins: set[Any] = field(default_factory=set)  # pin nodes naming this object

    def describe(self) -> str:
        return f"{self.kind} {self.id}"


class Store:
    def __init__(self, memory_limit: int | None = None):
        """memory_limit: bytes all objects together may charge (None: no daemon-wide cap);
        protects the daemon from a caller whose own RLIMIT_MEMLOCK is unlimited."""
        self._objects: dict[Kind, dict[int, BpfObject]] = {kind: {} for kind in Kind}
        self._by_impl: dict[int, BpfObject] = {}
        self._next_id = dict.fromkeys(Kind, 1)
        self.locked_pages: dict[int, int] = {}  # uid -> pages
        self.total_pages = 0
        self.limit_pages = None if memory_limit is None else memory_limit // PAGE_SIZE
        # Called with each object as it is freed (journal, mounts showing it, subscribers).
        self.on_free: list[Callable[[BpfObject], None]] = []
        # Freed maps whose memory a process was given and may still hold (shm.release): their
        # memlock charge stays until reap_lingering sees the memory let go, as the kernel
        # keeps a map charged while it is mmapped. Then on_release hooks run.
        self.lingering: list[BpfObject] = []
        self.on_release: list[Callable[[BpfObject], None]] = []

    # -- lookup -----------------------------------------------------------------------------
    def of(self, impl: Any) -> BpfObject:
        """The object wrapping a map/program/perf event implementation."""
        return self._by_impl[id(impl)]

    def by_id(self, kind: Kind, obj_id: int) -> BpfObject:
        obj = self._objects[kind].get(obj_id)
        if obj is None:
            raise BpfError(errno.ENOENT, f"no {kind} with id {obj_id}")
        return obj

    def ids(self, kind: Kind) -> list[int]:
        return sorted(self._objects[kind])

    def objects(self, kind: Kind | None = None) -> Iterator[BpfObject]:
        for k in [kind] if kind else list(Kind):
            yield from list(self._objects[k].values())

    # -- creation and memlock -----------------------------------------------------------------
    def add(self, kind: Kind, impl: Any, uid: int, pages: int,
            memlock_limit_pages: int | None) -> BpfObject:
        """Register a new object (refcnt 0: the caller takes the first reference at once),
        charging `pages` to uid as bpf_map_charge_memlock does. A program takes a reference
        on each map it uses, which _free gives back."""
        self.charge(uid, pages, memlock_limit_pages)
        kind_ids = self._next_id[kind]
        obj = BpfObject(kind, kind_ids, impl, uid, pages)
        self._next_id[kind] = kind_ids + 1
        self._objects[kind][obj.id] = obj
        self._by_impl[id(impl)] = obj
        if isinstance(impl, FdArrayMap):
            impl.release = lambda member: self.put(self.of(member))
        for used_map in _maps_used_by(impl):
            self.hold(self.of(used_map))
        return obj

    def charge(self, uid: int, pages: int, limit_pages: int | None) -> None:
        self.check_charge(uid, pages, limit_pages)
        self.locked_pages[uid] = self.locked_pages.get(uid, 0) + pages
        self.total_pages += pages

    def check_charge(self, uid: int, pages: int, limit_pages: int | None) -> None:
        """Raise unless uid may charge `pages` more (checked before allocating anything)."""
        used = self.locked_pages.get(uid, 0)
        if limit_pages is not None and used + pages > limit_pages:
            raise BpfError(errno.EPERM, f"RLIMIT_MEMLOCK exceeded: uid {uid} has {used} pages"
                           f" locked, needs {pages} more, limit is {limit_pages} pages"
                           " (raise it with `ulimit -l` / prlimit)")
        if self.limit_pages is not None and self.total_pages + pages > self.limit_pages:
            raise BpfError(errno.ENOMEM, f"bpffsd memory limit reached: {self.total_pages}"
                           f" pages in use, {pages} more requested, cap {self.limit_pages}"
                           " (bpffsd --memory-limit)")

    @contextmanager
    def uncapped(self) -> Iterator[None]:
        """Charge without checking the daemon-wide cap. The journal replay uses it: it rebuilds
        objects that a later record frees, so only what survives the replay can be measured
        against the cap (`over_cap`), not every object the journal ever created."""
        limit, self.limit_pages = self.limit_pages, None
        try:
            yield
        finally:
            self.limit_pages = limit

    def over_cap(self) -> int:
        """Pages charged beyond the daemon-wide cap (0 when within it)."""
        if self.limit_pages is None:
            return 0
        return max(0, self.total_pages - self.limit_pages)

    def _uncharge(self, uid: int, pages: int) -> None:
        left = self.locked_pages[uid] - pages
        if left:
            self.locked_pages[uid] = left
        else:
            del self.locked_pages[uid]
        self.total_pages -= pages

    # -- references ---------------------------------------------------------------------------
    def hold(self, obj: BpfObject, user: bool = False) -> BpfObject:
        if obj.freed:
            raise BpfError(errno.ENOENT, f"{obj.describe()} has been freed")
        obj.refcnt += 1
        if user:
            obj.usercnt += 1
        return obj

    @contextmanager
    def held(self, obj: BpfObject) -> Iterator[BpfObject]:
        """Keep a new object alive while its first real reference (an fd, a pin) is made;
        if making it fails, the object is freed again."""
        self.hold(obj)
        try:
            yield obj
        finally:
            self.put(obj)

    def put_in_fd_array(self, array: FdArrayMap, key: bytes, member: BpfObject,
                        flags: int) -> None:
        """A prog_array / perf_event_array slot holds an internal reference on its member
        (fd_array_map_update_elem); the reference goes back if the update fails."""
        self.hold(member)
        try:
            array.put(key, member.impl, flags)
        except BaseException:
            self.put(member)
            raise

    def put(self, obj: BpfObject, user: bool = False) -> None:
        if user:
            obj.usercnt -= 1
            if obj.usercnt == 0 and isinstance(obj.impl, ProgArrayMap):
                obj.impl.clear()  # releases the programs through impl.release
        obj.refcnt -= 1
        if obj.refcnt == 0:
            self._free(obj)

    def _free(self, obj: BpfObject) -> None:
        obj.freed = True
        del self._objects[obj.kind][obj.id]
        del self._by_impl[id(obj.impl)]
        if isinstance(obj.impl, BpfMap) and obj.impl.free():
            self.lingering.append(obj)  # its memory is still mapped elsewhere: still charged
        else:
            self._released(obj)
        if isinstance(obj.impl, FdArrayMap):
            obj.impl.clear()
        for used_map in _maps_used_by(obj.impl):
            self.put(self.of(used_map))
        for hook in self.on_free:
            try:
                hook(obj)
            except Exception:
                log.exception("on_free hook failed for %s", obj.describe())
        log.debug("freed %s", obj.describe())

    def _released(self, obj: BpfObject) -> None:
        self._uncharge(obj.uid, obj.pages)
        for hook in self.on_release:
            hook(obj)

    def reap_lingering(self) -> None:
        """Give back the charges of freed maps whose memory no other process holds now."""
        for obj in [o for o in self.lingering if o.impl.shm.gone()]:
            self.lingering.remove(obj)
            self._released(obj)
            log.debug("released the memory of %s", obj.describe())


def _maps_used_by(impl: Any) -> list[BpfMap]:
    """The maps an object holds a reference on while it lives: a program's maps."""
    return impl.maps if isinstance(impl, Program) else []
