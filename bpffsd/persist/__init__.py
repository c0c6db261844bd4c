"""Persistence: pinned objects and map contents survive daemon restarts and crashes.

State lives in the state directory as a snapshot (`snapshot`, compacted records of the whole
persisted state) and a journal of the records since (`journal-GEN`, GEN matching the
snapshot's). Starting: read the snapshot, replay the journal up to its last complete record,
then compact at once, so the new run's journal speaks of the new run's object ids. An
acknowledged change is durable (group commit, see journal.py); map writes made by programs
in the VM are flushed within `interval` seconds. Compaction replaces the snapshot atomically
(write, fsync, rename, fsync the directory) when the journal grows past COMPACT_BYTES and at
shutdown; it runs on the event loop, so a very large state pauses the daemon while it writes.
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
from . import records
from .journal import Journal
from .state import Recorder, Replayer, snapshot

if TYPE_CHECKING:
    from ..daemon import Daemon
    from ..fs.instance import Instance

log = logging.getLogger(__name__)
SNAPSHOT = "snapshot"
COMPACT_BYTES = 64 << 20


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

    # -- start --------------------------------------------------------------------------------
    def restore(self) -> None:
        """Rebuild the persisted state, then start a new generation. Call before serving."""
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            raise BpfError(e.errno or errno.EIO, f"cannot create the state directory"
                           f" {self.state_dir}: {e.strerror}") from None
        replayer = Replayer(self.daemon)
        snap = self._read(SNAPSHOT)
        if snap:
            header, *body = snap
            self.generation = header[1]
            replayer.apply_all(body)
        journal = self._read(self._journal_name(self.generation))
        replayer.apply_all(journal)
        replayer.finish()
        self.restored.update(records=replayer.applied, journal_records=len(journal),
                             problems=replayer.problems)
        log.info("restored %d records (%d from the journal) from %s", replayer.applied,
                 len(journal), self.state_dir)
        failure = self.compact()
        if failure is not None:
            raise BpfError(failure.errno or errno.EIO, f"cannot write the state directory"
                           f" {self.state_dir}: {failure.strerror}")

    def _read(self, name: str) -> list:
        path = os.path.join(self.state_dir, name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
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

    def mark(self) -> tuple[Journal | None, int]:
        """Where the journal is now: pass it to `durable` after handling a request."""
        return self.journal, self.journal.appended if self.journal is not None else 0

    async def durable(self, mark: tuple[Journal | None, int]) -> BpfError | None:
        """Wait until what was journaled since `mark` is on disk, before a reply acknowledges
        it; the error to send instead when the journal cannot be written."""
        journal, before = mark
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
        if that failed (the journal then stays as it is)."""
        generation = self.generation + 1
        body, persisted = snapshot(self.instances(), self.daemon.store.of)
        data = records.frame(("snapshot", generation, time.time())) + b"".join(
            records.frame(r) for r in body)
        path = os.path.join(self.state_dir, SNAPSHOT)
        new_journal = os.path.join(self.state_dir, self._journal_name(generation))
        try:
            with open(new_journal, "wb") as f:  # empty, and on disk before the snapshot
                os.fsync(f.fileno())
            with open(path + ".tmp", "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(path + ".tmp", path)
            dir_fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            log.error("compaction into %s failed: %s; keeping the journal", path, e)
            return e
        old, self.journal = self.journal, Journal(new_journal)
        if old is not None:
            old.synced = old.appended  # the snapshot holds all of it
            old.wake()
            old.close()
        try:
            os.unlink(os.path.join(self.state_dir, self._journal_name(self.generation)))
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
                len(self.recorder.recorded), "restored": self.restored}
