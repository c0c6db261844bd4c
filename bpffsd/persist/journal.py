"""The write-ahead journal with group commit.

Handlers append records as they change state; a reply is sent only once the records its
request appended are on disk. A request waiting for them (`durable`) hands everything
appended so far to the Committer, a thread that lives as long as the daemon's persistence:
it writes and fdatasyncs the batch and reports back to the waiting requests, which hand on
whatever was appended meanwhile, so concurrent clients share each fdatasync. No task hop, no
trio.to_thread per commit: a durable update costs its fdatasync plus two eventfd wake-ups
(see Committer). Records nobody waits for (map writes by programs) are handed over by
Persistence.run every `interval`. A failed write (full disk, read-only state directory) keeps
the records in memory for the next attempt and fails the requests whose records it held with
the write's errno: their change is live but not durable, and the client is told so.

Nothing here costs the event loop more than a small record's framing: a large record (a
map's whole contents, a big batch's keys) is appended as it is, or as a `records.Lazy`, and
framed, in slices, in the committer's thread, where it keeps its place in the journal's order.

A journal belongs to a generation (see Persistence.compact). Its records acknowledge a change
only once that generation's snapshot is installed (`installed`); until then the journal may
be written, but a crash would restore the previous generation, which does not read it. A
journal is `covered` once a later snapshot holding all of its records is installed: what
waits on it is then durable, written or not.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from bpffs.vm.errors import BpfError

from . import records

log = logging.getLogger(__name__)


Job = tuple[Callable[..., None], tuple[Any, ...]]
_ONE = (1).to_bytes(8, sys.byteorder)  # an eventfd's increment


class Committer(trio.abc.Instrument):
    """The thread that writes and fdatasyncs the journals while persistence runs. A commit
    per batch through trio.to_thread cost a task wake-up, a thread-cache hand-off and a
    result delivery: a durable update took 2.4x the fdatasync of its record.

    The thread sleeps in a read of an eventfd (`_kick`). The loop writes it just before it
    waits for I/O (a trio instrument's `before_io_wait`) rather than when a job is submitted,
    and with os.write, which lets go of the GIL: a thread woken while the loop holds the GIL
    wakes only to wait for it, and is woken a second time when the loop lets go of it
    (measured on a 2-vCPU VM: 22-26 us from the wake-up to the thread running with a
    threading.Lock released on the loop, 3-6 us so). A job posts its results (`call_soon`)
    to a queue and writes a second eventfd (`_done`), which the first task waiting for the
    journals (`wait`) reads itself and then runs the results: no trio hand-off between the
    thread and the request that waits (TrioToken.run_sync_soon, then a trio.Event, cost two
    more passes of the run loop, ~14 us)."""

    def __init__(self) -> None:
        self._jobs: deque[Job | None] = deque()  # appended on the loop, taken in the thread
        self._results: deque[Job] = deque()  # appended in the thread, run on the loop
        self._kick: int | None = None  # the eventfd the thread sleeps on (while started)
        self._done: int | None = None  # the eventfd written after results are posted
        self._kicked = False  # the thread is woken and has not looked at the jobs yet
        self._due = False  # jobs were submitted since the loop last waited for I/O
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._exited = False  # the thread has run its last job
        self._changed = trio.Event()  # set (and replaced) when waiters should look again
        self._reading = False  # a task waits for `_done` to be readable

    @property
    def running(self) -> bool:
        """Whether jobs are taken (started, not stopping)."""
        return self._thread is not None and not self._stopping

    def start(self) -> None:
        """Start the thread; on the event loop, from the task that will `stop` it."""
        assert self._thread is None, "started twice"
        self._stopping = self._exited = self._kicked = False
        self._kick = os.eventfd(0, os.EFD_CLOEXEC)
        self._done = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread = threading.Thread(target=self._main, args=(self._kick, self._done),
                                        name="bpffsd-journal", daemon=True)
        self._thread.start()
        trio.lowlevel.add_instrument(self)

    def submit(self, fn: Callable[..., None], *args: Any) -> bool:
        """On the loop: run fn(*args) in the thread, after the jobs before it; False (and
        nothing runs) when the thread is not running."""
        if not self.running:
            return False
        self._jobs.append((fn, args))
        self._due = True
        return True

    def call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        """In the thread: have fn(*args) run on the loop, by the next `wait` or `reap`."""
        done = self._done
        assert done is not None
        self._results.append((fn, args))
        os.write(done, _ONE)  # without the GIL: the loop may take it at once

    async def wait(self) -> None:
        """Return once the thread's results have been run, or `changed` was called: the
        caller looks again at what it waits for. The first task to wait reads `_done` itself;
        the others wait for it, and one of them reads next."""
        done = self._done
        if self._reading or done is None:
            await self._changed.wait()
            return
        self._reading = True
        try:
            await trio.lowlevel.wait_readable(done)
        except trio.ClosedResourceError:  # stopped meanwhile
            pass
        finally:  # cancelled too (its client hung up): the others must not wait for it
            self._reading = False
            if not self.reap():
                self.changed()

    def reap(self) -> bool:
        """On the loop: run the results the thread has posted, then let the waiters look
        again; whether there were any."""
        if self._done is None:
            return False
        try:
            os.read(self._done, 8)  # before taking the results: none is left unannounced
        except BlockingIOError:
            pass
        if not self._results:
            return False
        while self._results:
            fn, args = self._results.popleft()
            try:
                fn(*args)
            except Exception:  # a bug: the other results still count
                log.exception("a journal result failed")
        self.changed()
        return True

    def changed(self) -> None:
        """Let every `wait` return (something they wait for may have happened)."""
        self._changed.set()
        self._changed = trio.Event()
        if self._reading and self._done is not None:
            os.write(self._done, _ONE)  # the task reading it too

    async def stop(self) -> None:
        """Let the jobs submitted so far run and their results be run, then end the thread
        and join it (at once: it has said it is done)."""
        thread = self._thread
        if thread is None:
            return
        if not self._stopping:
            self._stopping = True
            self._jobs.append(None)
            self._due = True
        while not self._exited:
            await self.wait()
        thread.join()
        self._thread = None
        trio.lowlevel.remove_instrument(self)
        kick, done, self._kick, self._done = self._kick, self._done, None, None
        if kick is not None:
            os.close(kick)
        if done is not None:
            trio.lowlevel.notify_closing(done)  # a task reading it looks again
            os.close(done)

    def before_io_wait(self, timeout: float) -> None:
        """The trio instrument's hook: the loop is about to wait (and let go of the GIL):
        wake the thread if there are jobs."""
        if self._due:
            self._due = False
            if not self._kicked and self._kick is not None:
                self._kicked = True
                os.write(self._kick, _ONE)

    def _main(self, kick: int, done: int) -> None:
        try:
            while True:
                os.read(kick, 8)
                self._kicked = False  # before looking at the jobs: no kick is lost
                while self._jobs:
                    job = self._jobs.popleft()
                    if job is None:
                        return
                    fn, args = job
                    del job
                    try:
                        fn(*args)
                    except Exception:  # a bug in a job: the next ones still run
                        log.exception("a journal job failed")
                    del fn, args  # a big batch is freed here, in the thread
        finally:
            self._results.append((self._ended, ()))
            os.write(done, _ONE)

    def _ended(self) -> None:
        self._exited = True


class Journal:
    def __init__(self, path: str, fd: int, committer: Committer, installed: bool = True):
        """fd: the journal file, opened for appending by the caller (which opens it relative
        to the state directory's fd, following no symlink); path names it in messages;
        committer writes it (while it runs: appends stay in memory until then)."""
        self.path = path
        self.fd: int | None = fd
        self.committer = committer
        self.size = os.fstat(fd).st_size
        self.appended = 0  # records appended so far
        self.synced = 0  # records known to be on disk
        self.failure: OSError | None = None  # of the last attempt to write (None: it worked)
        self.failed_at: float | None = None  # its monotonic time
        self.installed = installed  # its generation's snapshot is on disk
        self.install_failure: OSError | None = None  # why the last installation failed
        self.covered = False  # a later installed snapshot holds every record of it
        self._buffer: list[Any] = []  # framed records (bytes), or records framed when written
        self._committing = False  # a batch is with the committer
        self._failed_upto = 0  # the records the failed attempt (`failure`) would have synced

    def append(self, record: Any) -> None:
        self._buffer.append(records.frame(record) if records.small(record) else record)
        self.appended += 1

    @property
    def pending(self) -> bool:
        return self.synced < self.appended

    def acknowledged(self, upto: int) -> bool:
        return self.covered or (self.installed and self.synced >= upto)

    async def durable(self, upto: int) -> None:
        """Wait until the first `upto` records are on disk and part of the installed state,
        starting their commit now if none is under way; raise the write (or installation)
        error if not."""
        while not self.acknowledged(upto):
            if self.synced < upto:
                if self.failure is not None and self._failed_upto >= upto:
                    raise BpfError(self.failure.errno or errno.EIO, "the change is not"
                                   f" durable: writing the journal {self.path} failed:"
                                   f" {self.failure.strerror}")
                self.start_commit()
            elif self.install_failure is not None:  # written, but its snapshot is not
                failure = self.install_failure
                raise BpfError(failure.errno or errno.EIO, "the change is not durable:"
                               f" writing the snapshot for the journal {self.path} failed:"
                               f" {failure.strerror}")
            await self.committer.wait()

    def start_commit(self) -> bool:
        """Hand everything appended to the committer, unless a commit of this journal is under
        way (when it is done, what came meanwhile is handed on) or there is nothing to write;
        whether a commit began. On the loop and without awaiting: a request's records start
        for the disk the moment it waits for them."""
        if self._committing or not self._buffer or self.fd is None or self.covered:
            return False
        batch, self._buffer = self._buffer, []
        if not self.committer.submit(self._commit, batch, self.size, self.failure is not None):
            self._buffer = batch
            return False
        self._committing = True
        return True

    async def commit(self) -> None:
        """Write what is appended so far (or fail trying: see `failure`). Needs the committer
        running."""
        upto = self.appended
        while self.synced < upto and not self.covered and self.fd is not None:
            if self.failure is not None and self._failed_upto >= upto:
                return
            if not self.start_commit() and not self._committing:
                return  # the committer is not running
            await self.committer.wait()

    def _commit(self, batch: list[Any], good_size: int, torn: bool) -> None:
        """In the committer's thread: write the batch and post the outcome to the loop. That
        is the last thing it does holding the GIL (the loop wakes up wanting it) unless the
        batch holds records it framed: those are dropped one at a time after it (freeing a
        big batch's million elements in one go would hold the GIL for tens of ms)."""
        count = len(batch)
        committer = self.committer
        try:
            written = self._write(batch, good_size, torn)
        except Exception as e:  # OSError, or a bug
            failure = e if isinstance(e, OSError) else OSError(errno.EIO, f"internal error: {e!r}")
            committer.call_soon(self._committed, count, 0, failure, batch)
            return
        framed = all(isinstance(entry, bytes) for entry in batch)
        if framed:
            batch.clear()
        committer.call_soon(self._committed, count, written, None, None)
        if not framed:
            _release(batch)

    def _committed(self, count: int, written: int, failure: OSError | None,
                   batch: list[Any] | None) -> None:
        """On the loop (Committer.reap): the outcome of a commit of `count` records; hand on
        what came meanwhile."""
        self._committing = False
        if failure is None:
            self.size += written
            self.synced += count
            self.failure = None
        else:
            self.failure = failure
            self.failed_at = time.monotonic()
            self._failed_upto = self.synced + count
            if batch is not None and not self.covered:
                self._buffer[:0] = batch  # kept, in order, for the next attempt
        if failure is None:
            self.start_commit()
        # the waiters look again once the committer's results are all run (Committer.reap)

    def cover(self) -> None:
        """An installed snapshot holds every record of this journal: what waits on it is
        durable, and nothing of it need be written any more."""
        self.covered = True
        self._buffer = []
        self.wake()

    def wake(self) -> None:
        """Let waiters look at `synced`, `installed` and `covered` again."""
        self.committer.changed()

    def _write(self, batch: list[Any], good_size: int, torn: bool = True) -> int:
        """In a thread: frame what is not framed yet, append it all, fdatasync. torn: an
        attempt failed since the file was good_size bytes long."""
        fd = self.fd
        assert fd is not None
        if torn and os.fstat(fd).st_size != good_size:
            os.ftruncate(fd, good_size)  # drop the torn end of a failed attempt
        written = 0
        try:
            for data in records.frames(batch):
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                    written += n
        except OSError:
            raise
        except Exception as e:  # a bug framing a record: this commit fails, not the daemon
            log.exception("framing journal records failed")
            raise OSError(errno.EIO, f"internal error framing a record: {e!r}") from e
        os.fdatasync(fd)  # the size is data too: appends are durable
        return written

    async def close(self) -> None:
        """Close the file once no commit is writing it."""
        while self._committing:
            await self.committer.wait()
        self.close_now()

    def close_now(self) -> None:
        """Close the file; no commit may be under way (the committer stopped, or never ran)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _release(batch: list[Any]) -> None:
    """Drop the records one at a time, so that the GIL may pass between two."""
    while batch:
        batch.pop()
