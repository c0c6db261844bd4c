"""Persistence: pinned objects and map contents survive daemon restarts and crashes.

State lives in the state directory as a snapshot (`snapshot`, compacted records of the whole
persisted state) and a journal of the records since (`journal-GEN`, GEN matching the
snapshot's). Starting: read the snapshot, replay the journal up to its last complete record,
then compact at once, so the new run's journal speaks of the new run's object ids. An
acknowledged change is durable (group commit, see journal.py); map writes made by programs
in the VM are flushed within `interval` seconds. Compaction replaces the snapshot atomically
(write, fsync, rename, fsync the directory) when the journal grows past COMPACT_BYTES and at
shutdown; it runs on the event loop, so a very large state pauses the daemon while it writes.

A restore that cannot place an acknowledged object (a record that fails, or more surviving
the replay than --memory-limit allows) must not compact it away: it leaves the snapshot and
journal exactly as they are, so a restart with the cause fixed restores everything, and the
state directory is *held* for the run: changes are still made, but clients are told they are
not durable (EROFS), and `bpffs status` says why (`held`, `unplaced`). The state directory is
checked, and every file in it opened, as statedir.py says.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import trio

from bpffs.vm.errors import BpfError
from bpffs.vm.maps import BpfMap, FdArrayMap, ProgArrayMap

from ..store import BpfObject
from . import records, statedir
from .journal import Journal
from .state import Recorder, Replayer, snapshot

if TYPE_CHECKING:
    from ..daemon import Daemon
    from ..fs.instance import Instance

log = logging.getLogger(__name__)
SNAPSHOT = "snapshot"
COMPACT_BYTES = 64 << 20


class Held:
    """Stands in for the journal while the state directory is held: it counts the records
    this run could not journal, so that `durable` refuses to acknowledge their requests."""

    def __init__(self) -> None:
        self.appended = 0


class Persistence:
    def __init__(self, daemon: Daemon, state_dir: str, interval: float = 0.1):
        self.daemon = daemon
        self.state_dir = state_dir
        self.interval = interval
        self.generation = 0
        self.journal: Journal | None = None
        self.recorder = Recorder(self._append, daemon.store.of)
        self.dirty: set[BpfObject] = set()
        self.last_snapshot: float | None = None
        self.restored: dict[str, Any] = {}
        self.dir_fd: int | None = None  # the state directory, opened (and checked) by restore
        self.held: str | None = None  # why the state directory is kept as the restore found it
        self.unplaced: list[dict[str, Any]] = []
        self._held: Held | None = None
        daemon.store.on_free.append(self.recorder.freed)

    # -- start --------------------------------------------------------------------------------
    def restore(self) -> None:
        """Rebuild the persisted state, then start a new generation (unless something could
        not be placed: see `held`). Call before serving."""
        self.dir_fd = statedir.open_state_dir(self.state_dir)
        replayer = Replayer(self.daemon)
        with self.daemon.store.uncapped():  # checked by `place`, on what survives the replay
            snap = self._read(SNAPSHOT)
            if snap:
                header, *body = snap
                self.generation = header[1]
                replayer.apply_all(body)
            journal = self._read(self._journal_name(self.generation))
            replayer.apply_all(journal)
            replayer.finish()
        replayer.place()
        self.unplaced = replayer.unplaced
        self.restored.update(records=replayer.applied, journal_records=len(journal),
                             problems=replayer.problems)
        log.info("restored %d records (%d from the journal) from %s", replayer.applied,
                 len(journal), self.state_dir)
        if replayer.problems or replayer.unplaced:
            count = len(replayer.problems) + len(replayer.unplaced)
            self.held = (f"the restore could not place {count} acknowledged"
                         f" object{'s' if count != 1 else ''} or change"
                         f"{'s' if count != 1 else ''} (see `unplaced` and `restored`): the"
                         f" snapshot and journal in {self.state_dir} are kept as they were and"
                         " this run's changes are not durable; fix the cause (for instance"
                         " raise --memory-limit) and restart bpffsd to restore everything")
            log.error("%s", self.held)
            self._held = Held()
            return
        failure = self.compact()
        if failure is not None:
            raise BpfError(failure.errno or errno.EIO, f"cannot write the state directory"
                           f" {self.state_dir}: {failure.strerror}")

    def _read(self, name: str) -> list:
        path = os.path.join(self.state_dir, name)
        assert self.dir_fd is not None
        data = statedir.read_file(self.dir_fd, name, path)
        if data is None:
            return []
        found, _, problem = records.read(data)
        if problem is not None:
            log.warning("%s: %s; keeping the %d records before it", path, problem, len(found))
            self.restored.setdefault("truncated", []).append(f"{name}: {problem}")
        return found

    def _journal_name(self, generation: int) -> str:
        return f"journal-{generation}"

    # -- what changes -------------------------------------------------------------------------
    def instances(self) -> list[Instance]:
        return [inst for inst in self.daemon.fs.named.values()]

    def watch(self, inst: Instance) -> None:
        """Journal every tree operation of a named instance."""
        if inst.name is not None:
            inst.tree.on_op.append(lambda op, args: self.recorder.tree_op(inst.name, op, args))

    def _append(self, record: tuple) -> None:
        if self.journal is not None:
            self.journal.append(record)
        elif self._held is not None:
            self._held.appended += 1

    def map_changed(self, bpf_map: BpfMap, keys: list[bytes]) -> None:
        obj = self.daemon.store.of(bpf_map)
        if obj in self.recorder.recorded:
            self.recorder.keys_changed(obj, keys)

    def program_ran(self, prog: Any) -> None:
        """The maps a program (and its tail-call targets) can write are flushed soon."""
        todo, seen = [prog], set()
        while todo:
            p = todo.pop()
            if id(p) in seen:
                continue
            seen.add(id(p))
            for m in p.maps:
                if isinstance(m, ProgArrayMap):
                    todo.extend(target for _, target in m.items())
                elif not isinstance(m, FdArrayMap):  # programs write data maps only
                    obj = self.daemon.store.of(m)
                    if obj in self.recorder.recorded:
                        self.dirty.add(obj)

    def mark(self) -> tuple[Journal | Held | None, int]:
        """Where the journal is now: pass it to `durable` after handling a request."""
        journal = self.journal or self._held
        return journal, journal.appended if journal is not None else 0

    async def durable(self, mark: tuple[Journal | Held | None, int]) -> BpfError | None:
        """Wait until what was journaled since `mark` is on disk, before a reply acknowledges
        it; the error to send instead when the journal cannot be written."""
        journal, before = mark
        if isinstance(journal, Held):
            return None if journal.appended == before else BpfError(
                errno.EROFS, "the change is made but not durable: the state directory"
                f" {self.state_dir} is held: {self.held}")
        if journal is None or journal is not self.journal or journal.appended == before:
            return None  # nothing new (or a compaction made it part of the snapshot)
        try:
            await journal.durable(journal.appended)
        except BpfError as e:
            return e
        return None

    # -- running ------------------------------------------------------------------------------
    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._commit)
            task_status.started()
            try:
                while True:
                    await trio.sleep(self.interval)
                    self.flush()
                    if self.journal is not None and self.journal.size > COMPACT_BYTES:
                        self.compact()
            finally:
                with trio.CancelScope(shield=True):
                    self.flush()
                    self.compact()
                    if self.dir_fd is not None:
                        os.close(self.dir_fd)
                        self.dir_fd = None

    async def _commit(self) -> None:
        while True:
            journal = self.journal
            if journal is None:
                await trio.sleep(self.interval)
                continue
            if not journal.pending:
                journal.wakeup = trio.Event()
                await journal.wakeup.wait()
                continue
            await journal.commit()
            if journal.failure is not None:
                await trio.sleep(0.5)  # a full disk may get room again

    def flush(self) -> None:
        """Journal the contents of maps that programs may have written."""
        for obj in self.dirty:
            if not obj.freed and obj in self.recorder.recorded:
                self.recorder.contents(obj)
        self.dirty.clear()

    def compact(self) -> OSError | None:
        """Replace snapshot + journal by a new snapshot of the state as it is now; the error
        if that failed (the journal then stays as it is). Nothing while the state directory is
        held: its snapshot and journal hold objects this run could not place."""
        if self.held is not None or self.dir_fd is None:
            return None
        dir_fd = self.dir_fd
        generation = self.generation + 1
        body, persisted = snapshot(self.instances(), self.daemon.store.of)
        data = records.frame(("snapshot", generation, time.time())) + b"".join(
            records.frame(r) for r in body)
        path = os.path.join(self.state_dir, SNAPSHOT)
        journal_name = self._journal_name(generation)
        journal_fd = None
        try:  # the new journal: empty, and on disk before the snapshot
            journal_fd = statedir.create_file(dir_fd, journal_name, os.O_APPEND)
            os.fsync(journal_fd)
            tmp_fd = statedir.create_file(dir_fd, SNAPSHOT + ".tmp")
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(tmp_fd, view):]
                os.fsync(tmp_fd)
            finally:
                os.close(tmp_fd)
            os.replace(SNAPSHOT + ".tmp", SNAPSHOT, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.fsync(dir_fd)
        except OSError as e:
            if journal_fd is not None:
                os.close(journal_fd)
            log.error("compaction into %s failed: %s; keeping the journal", path, e)
            return e
        old = self.journal
        self.journal = Journal(os.path.join(self.state_dir, journal_name), journal_fd)
        if old is not None:
            old.synced = old.appended  # the snapshot holds all of it
            old.wake()
            old.close()
        try:
            os.unlink(self._journal_name(self.generation), dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        self.generation = generation
        self.recorder.recorded = persisted  # what the new generation's records may refer to
        self.last_snapshot = time.time()
        return None

    def status(self) -> dict:
        return {"state_dir": self.state_dir, "generation": self.generation,
                "journal_bytes": self.journal.size if self.journal else 0,
                "journal_failure": (self.journal.failure.strerror if self.journal and
                                    self.journal.failure else None),
                "last_snapshot": self.last_snapshot, "persisted_objects":
                len(self.recorder.recorded), "restored": self.restored, "held": self.held,
                "unplaced": self.unplaced}
