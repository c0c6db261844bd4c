"""Persistence: pinned objects and map contents survive daemon restarts and crashes.

State lives in the state directory as a snapshot (`snapshot`, compacted records of the whole
persisted state) and a journal of the records since (`journal-GEN`, GEN matching the
snapshot's). Starting: read the snapshot, replay the journal up to its last complete record,
then compact at once, so the new run's journal speaks of the new run's object ids. An
acknowledged change is durable (group commit by a thread that lives as long as `run`, see
journal.py); map writes made by programs in the VM are flushed within `interval` seconds.
Compaction replaces the snapshot atomically (write, fsync, rename, fsync the directory) when
the journal grows past COMPACT_BYTES (environment variable BPFFSD_COMPACT_BYTES, for tests)
and at shutdown.

While serving, a compaction costs the event loop only the capture of the structure (trees,
objects); map contents are read, and everything framed, written and fsynced, in a thread:
1. create the next generation's journal, empty, fsynced (thread);
2. on the loop, at one instant T0: capture the records that rebuild the state (map contents
   as `state.Contents`, read later) and switch appends to the new journal, not yet
   *installed*: its records are written but acknowledge nothing until step 4;
3. in a thread: frame the snapshot (reading the map contents: each element read after T0 is
   corrected by the new journal's records of every change since T0, see state.py), write
   `snapshot.tmp`, fsync, rename over `snapshot`, fsync the directory, unlink older journals;
4. on the loop: the new journal is installed (its waiters are acknowledged once it is on
   disk), and every older journal is *covered* (its waiters are acknowledged: the snapshot
   holds their records).
A kill -9 before the rename restores the old snapshot and journal, which hold every change
acknowledged so far (requests on the new journal are not acknowledged yet); after it, the
new snapshot and journal, which hold them all. A failed compaction fails the new journal's
waiters (EIO or the errno: live, not durable), and is retried within a second with yet another
generation, whose snapshot covers what the failed one held.

A restore that cannot place an acknowledged object (a record that fails, or more surviving
the replay than --memory-limit allows) must not compact it away: it leaves the snapshot and
journal exactly as they are, so a restart with the cause fixed restores everything, and the
state directory is *held* for the run: changes are still made, but clients are told they are
not durable (EROFS), and `bpffs status` says why (`held`, `unplaced`). The state directory is
checked, and every file in it opened, as statedir.py says.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import trio

from bpffs.vm.errors import BpfError
from bpffs.vm.maps import BpfMap, FdArrayMap, ProgArrayMap

from ..store import BpfObject
from . import records, statedir
from .journal import Committer, Journal
from .state import Recorder, Replayer, snapshot

if TYPE_CHECKING:
    from ..daemon import Daemon
    from ..fs.instance import Instance

log = logging.getLogger(__name__)
SNAPSHOT = "snapshot"
COMPACT_BYTES = int(os.environ.get("BPFFSD_COMPACT_BYTES", 64 << 20))
RETRY_SECONDS = 1.0  # between a failed compaction and the next attempt
WRITE_RETRY_SECONDS = 0.5  # between a failed journal write and one nobody waits for
# A thread framing records keeps the GIL until the loop has waited this long for it, and the
# loop gives the GIL up at every syscall (a request makes several): with CPython's default,
# 5 ms, that adds up per request while a snapshot or a big record is framed. Lowered (for the
# whole process) when persistence starts.
SWITCH_INTERVAL = 0.0005


def _digest(memory: memoryview) -> bytes:
    return hashlib.blake2b(memory, digest_size=16).digest()


class _Compaction:
    """One compaction: the generation, its records, its journal and the journals its
    snapshot covers."""

    def __init__(self, generation: int, body: list, journal: Journal, covers: list[Journal]):
        self.generation = generation
        self.body = body
        self.journal = journal
        self.covers = covers


class Held:
    """Stands in for the journal while the state directory is held: it counts the records
    this run could not journal, so that `durable` refuses to acknowledge their requests."""

    def __init__(self) -> None:
        self.appended = 0


class Appends:
    """The first item of a `mark`: the records appended to every journal of this run. The
    request pipeline (pipeline.Outcome.journaled) compares its `appended` with the mark's
    count to see whether a request journaled anything, so a request during which a compaction
    switched journals (an async handler, between two awaits) still waits for its records."""

    def __init__(self) -> None:
        self.appended = 0


Mark = tuple[Appends | Held | None, int, Journal | None]


class Persistence:
    def __init__(self, daemon: Daemon, state_dir: str, interval: float = 0.1):
        self.daemon = daemon
        self.state_dir = state_dir
        self.interval = interval
        self.generation = 0  # of the installed snapshot
        self._next_generation = 1
        self.journal: Journal | None = None
        self.committer = Committer()  # writes the journals while `run` runs
        self._older: list[Journal] = []  # journals before self.journal, not yet covered
        self._compacting = False
        self._failed_at: float | None = None  # monotonic time of the last failed compaction
        self.last_compaction: float | None = None  # its duration in seconds
        self.recorder = Recorder(self._append, daemon.store.of)
        self.dirty: set[BpfObject] = set()
        # maps other processes write in place -> the digest of their memory last journaled
        self.written_in_place: dict[BpfObject, bytes] = {}
        self.last_snapshot: float | None = None
        self.restored: dict[str, Any] = {}
        self.dir_fd: int | None = None  # the state directory, opened (and checked) by restore
        self.held: str | None = None  # why the state directory is kept as the restore found it
        self.unplaced: list[dict[str, Any]] = []
        self._held: Held | None = None
        self._appends = Appends()
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
                self._next_generation = self.generation + 1
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
            self._appends.appended += 1
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

    def mark(self) -> Mark:
        """Where the journal is now: pass it to `durable` after handling a request."""
        if self._held is not None:
            return self._held, self._held.appended, None
        if self.journal is None:
            return None, 0, None
        return self._appends, self._appends.appended, self.journal

    async def durable(self, mark: Mark) -> BpfError | None:
        """Wait until what was journaled since `mark` is on disk, before a reply acknowledges
        it; the error to send instead when the journal cannot be written."""
        appends, before, journal = mark
        if isinstance(appends, Held):
            return None if appends.appended == before else BpfError(
                errno.EROFS, "the change is made but not durable: the state directory"
                f" {self.state_dir} is held: {self.held}")
        if appends is None or journal is None or appends.appended == before:
            return None
        current = self.journal
        try:
            await journal.durable(journal.appended)
            if current is not None and current is not journal:
                # a compaction began while the request ran: what it recorded since went to
                # a newer journal (installing the current one covers those in between)
                await current.durable(current.appended)
        except BpfError as e:
            return e
        return None

    # -- running ------------------------------------------------------------------------------
    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Serve: the committer thread, the flush of maps programs write, compactions. On
        the way out (cancelled), what is journaled is written, the committer thread joined,
        and the state compacted."""
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        self.committer.start()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_written_in_place)
                task_status.started()
                while True:
                    await trio.sleep(self.interval)
                    self.flush()
                    self.committer.reap()  # results no request was there to run
                    self._commit_unawaited()
                    if not self._compacting and self._compaction_due():
                        self._compacting = True
                        nursery.start_soon(self._compact_in_background)
        finally:  # any compaction is done (its threads too)
            with trio.CancelScope(shield=True):
                self._check_written_in_place()
                self.flush()
                for journal in [*self._older, *([self.journal] if self.journal else [])]:
                    journal.start_commit()  # should the compaction below fail
                await self.committer.stop()  # after those commits: no journal is being written
                self.compact()
                for journal in [*self._older, *([self.journal] if self.journal else [])]:
                    journal.close_now()
                if self.dir_fd is not None:
                    os.close(self.dir_fd)
                    self.dir_fd = None

    def _compaction_due(self) -> bool:
        journal = self.journal
        if journal is None or self.held is not None:
            return False
        if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_SECONDS:
            return False
        return not journal.installed or journal.size > COMPACT_BYTES  # (a failed one: retry)

    async def _compact_in_background(self) -> None:
        try:
            await self.compact_async()
        finally:
            self._compacting = False

    def _commit_unawaited(self) -> None:
        """Write the records no request waits for (program writes just flushed, objects freed
        when their last fd closed): a request starts the commit of its own records. After a
        failed write, not before WRITE_RETRY_SECONDS: a full disk may get room again."""
        journal = self.journal
        if journal is None or not journal.pending:
            return
        if journal.failed_at is None or journal.failure is None or (
                time.monotonic() - journal.failed_at >= WRITE_RETRY_SECONDS):
            journal.start_commit()

    def watch_memory(self, bpf_map: BpfMap) -> None:
        """Another process may now write the map's values in place (an array created
        BPF_F_MMAPABLE, mapped writable): from now on its contents are journaled within
        about `interval` of changing, as a program's writes are (_watch_written_in_place)."""
        obj = self.daemon.store.of(bpf_map)
        self.written_in_place.setdefault(obj, b"")  # the digest last journaled: none yet

    async def _watch_written_in_place(self) -> None:
        """Every interval, the digest of each map written in place, taken in a worker thread
        (hashlib lets go of the GIL: a large map costs the loop nothing): when it differs from
        the one journaled last, the map is journaled. A write after the digest is taken
        changes the next one, so none is missed."""
        while True:
            await trio.sleep(self.interval)
            for obj in list(self.written_in_place):
                if obj.freed:
                    del self.written_in_place[obj]
                    continue
                digest = await trio.to_thread.run_sync(_digest, obj.impl.shm.buf)
                if digest != self.written_in_place.get(obj, digest) and not obj.freed:
                    self.written_in_place[obj] = digest
                    self.dirty.add(obj)

    def _check_written_in_place(self) -> None:
        """At shutdown, on the loop: journal what changed since the last digest."""
        for obj, journaled in self.written_in_place.items():
            if not obj.freed and _digest(obj.impl.shm.buf) != journaled:
                self.dirty.add(obj)

    def flush(self) -> None:
        """Journal the contents of maps that programs (or writers in place) may have
        written."""
        for obj in self.dirty:
            if not obj.freed and obj in self.recorder.recorded:
                self.recorder.contents(obj)
        self.dirty.clear()

    def compact(self) -> OSError | None:
        """Replace snapshot + journal by a new snapshot of the state as it is now, all of it
        on the calling thread (at start and at shutdown: no client is served then); the
        error if that failed (the journal then stays as it is). Nothing while the state
        directory is held: its snapshot and journal hold objects this run could not place."""
        if self.held is not None or self.dir_fd is None:
            return None
        generation = self._take_generation()
        try:
            fd = self._create_journal(generation)
        except OSError as e:
            return self._failed(None, e)
        work = self._capture(generation, fd)
        failure = self._install(work, self._write_snapshot(work))
        if failure is None:
            for journal in work.covers:
                journal.close_now()
        return failure

    async def compact_async(self) -> OSError | None:
        """`compact` while serving: the event loop only captures the state (see the module's
        docstring); the rest runs in threads."""
        if self.held is not None or self.dir_fd is None:
            return None
        started = time.monotonic()
        generation = self._take_generation()
        try:
            fd = await trio.to_thread.run_sync(self._create_journal, generation)
        except OSError as e:
            return self._failed(None, e)
        work = self._capture(generation, fd)  # T0
        for journal in work.covers:  # their waiters need not wait for the snapshot
            if journal.pending and journal.fd is not None:
                await journal.commit()
        failure = self._install(work, await trio.to_thread.run_sync(self._write_snapshot, work))
        if failure is None:
            with trio.CancelScope(shield=True):
                for journal in work.covers:
                    await journal.close()
            self.last_compaction = time.monotonic() - started
            log.info("compacted %s into generation %d in %.2f s", self.state_dir, generation,
                     self.last_compaction)
        return failure

    def _take_generation(self) -> int:
        generation = self._next_generation
        self._next_generation += 1
        return generation

    def _create_journal(self, generation: int) -> int:
        """The generation's journal, new and empty, on disk (the directory entry is made
        durable with the snapshot's rename)."""
        assert self.dir_fd is not None
        fd = statedir.create_file(self.dir_fd, self._journal_name(generation), os.O_APPEND)
        try:
            os.fsync(fd)
        except OSError:
            os.close(fd)
            raise
        return fd

    def _capture(self, generation: int, journal_fd: int) -> _Compaction:
        """On the event loop, at one instant: the records of the state, and the switch of
        appends to the new generation's journal."""
        body, persisted = snapshot(self.instances(), self.daemon.store.of)
        journal = Journal(os.path.join(self.state_dir, self._journal_name(generation)),
                          journal_fd, installed=False, committer=self.committer)
        old = self.journal
        if old is not None:
            self._older.append(old)
        self.journal = journal
        self.recorder.recorded = persisted  # what the new generation's records may refer to
        return _Compaction(generation, body, journal, list(self._older))

    def _write_snapshot(self, work: _Compaction) -> OSError | None:
        """In a thread (or at start and shutdown): frame the snapshot, write it, fsync it,
        rename it into place, fsync the directory, unlink the journals it replaces."""
        dir_fd = self.dir_fd
        assert dir_fd is not None
        header = records.frame(("snapshot", work.generation, time.time()))
        try:
            tmp_fd = statedir.create_file(dir_fd, SNAPSHOT + ".tmp")
            try:
                for data in records.frames([header, *work.body]):
                    view = memoryview(data)
                    while view:
                        view = view[os.write(tmp_fd, view):]
                os.fsync(tmp_fd)
            finally:
                os.close(tmp_fd)
            os.replace(SNAPSHOT + ".tmp", SNAPSHOT, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.fsync(dir_fd)
        except OSError as e:
            return e
        except Exception as e:  # a bug: fail this compaction (retried), not the daemon
            log.exception("framing the snapshot failed")
            return OSError(errno.EIO, f"internal error framing the snapshot: {e!r}")
        keep = self._journal_name(work.generation)
        try:
            names = os.listdir(dir_fd)
        except OSError:
            names = []
        for name in names:
            if name.startswith("journal-") and name != keep:
                try:
                    os.unlink(name, dir_fd=dir_fd)
                except OSError:
                    pass  # never read again: the snapshot names its journal
        return None

    def _install(self, work: _Compaction, failure: OSError | None) -> OSError | None:
        """On the event loop: make the written generation the installed one (or report why
        it is not)."""
        if failure is not None:
            return self._failed(work, failure)
        work.journal.installed = True
        work.journal.install_failure = None
        work.journal.wake()
        for journal in work.covers:
            journal.cover()
            self._older.remove(journal)
        self.generation = work.generation
        self.last_snapshot = time.time()
        self._failed_at = None
        return None

    def _failed(self, work: _Compaction | None, failure: OSError) -> OSError:
        path = os.path.join(self.state_dir, SNAPSHOT)
        log.error("compaction into %s failed: %s; keeping the journal", path, failure)
        self._failed_at = time.monotonic()
        for journal in [*self._older, *([self.journal] if self.journal else [])]:
            if not journal.installed:  # its waiters are not durable yet: say why
                journal.install_failure = failure
                journal.wake()
        return failure

    def status(self) -> dict:
        return {"state_dir": self.state_dir, "generation": self.generation,
                "journal_bytes": self.journal.size if self.journal else 0,
                "journal_failure": (self.journal.failure.strerror if self.journal and
                                    self.journal.failure else None),
                "last_snapshot": self.last_snapshot, "compacting": self._compacting,
                "last_compaction_seconds": self.last_compaction, "persisted_objects":
                len(self.recorder.recorded), "restored": self.restored, "held": self.held,
                "unplaced": self.unplaced}
