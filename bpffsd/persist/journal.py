"""The write-ahead journal with group commit.

Handlers append records as they change state; a reply is sent only once the records its
request appended are on disk. The committer (Persistence._commit) writes and fsyncs whatever
has accumulated meanwhile, so concurrent clients share each fsync. A failed write (full disk,
read-only state directory) keeps the records in memory for the next attempt and fails the
waiting requests with the write's errno: their change is live but not durable, and the
client is told so.

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
from typing import Any

import trio

from bpffs.vm.errors import BpfError

from . import records

log = logging.getLogger(__name__)


class Journal:
    def __init__(self, path: str, fd: int, installed: bool = True):
        """fd: the journal file, opened for appending by the caller (which opens it relative
        to the state directory's fd, following no symlink); path names it in messages."""
        self.path = path
        self.fd: int | None = fd
        self.size = os.fstat(fd).st_size
        self.appended = 0  # records appended so far
        self.synced = 0  # records known to be on disk
        self.failure: OSError | None = None
        self.installed = installed  # its generation's snapshot is on disk
        self.install_failure: OSError | None = None  # why the last installation failed
        self.covered = False  # a later installed snapshot holds every record of it
        self.wakeup = trio.Event()  # set when there is something to commit
        self._buffer: list[Any] = []  # framed records (bytes), or records framed when written
        self._attempted = trio.Event()  # set after each commit attempt
        self._lock = trio.Lock()  # one commit at a time (the committer, a compaction)

    def append(self, record: Any) -> None:
        self._buffer.append(records.frame(record) if records.small(record) else record)
        self.appended += 1
        self.wakeup.set()

    @property
    def pending(self) -> bool:
        return self.synced < self.appended

    def acknowledged(self, upto: int) -> bool:
        return self.covered or (self.installed and self.synced >= upto)

    async def durable(self, upto: int) -> None:
        """Wait until the first `upto` records are on disk and part of the installed state;
        raise the write (or installation) error if not."""
        while not self.acknowledged(upto):
            await self._attempted.wait()
            if self.acknowledged(upto):
                return
            if self.synced < upto and self.failure is not None:
                raise BpfError(self.failure.errno or errno.EIO, "the change is not durable:"
                               f" writing the journal {self.path} failed:"
                               f" {self.failure.strerror}")
            if not self.installed and self.install_failure is not None:
                failure = self.install_failure
                raise BpfError(failure.errno or errno.EIO, "the change is not durable:"
                               f" writing the snapshot for the journal {self.path} failed:"
                               f" {failure.strerror}")

    async def commit(self) -> None:
        async with self._lock:
            if self.fd is None or not self.pending:
                return
            count = len(self._buffer)
            batch = self._buffer[:count]
            try:
                written = await trio.to_thread.run_sync(self._write, batch, self.size)
            except OSError as e:
                self.failure = e
            else:
                del self._buffer[:count]
                self.size += written
                self.synced += count
                self.failure = None
            finally:
                self.wake()
            # The last references to the records: freeing a big batch's million elements in
            # one go would hold the GIL (on the loop, or in a thread) for tens of ms.
            if not all(isinstance(entry, bytes) for entry in batch):
                await trio.to_thread.run_sync(_release, batch)

    def cover(self) -> None:
        """An installed snapshot holds every record of this journal: what waits on it is
        durable, and nothing of it need be written any more."""
        self.covered = True
        self._buffer = []
        self.wake()

    def wake(self) -> None:
        """Let waiters look at `synced`, `installed` and `covered` again."""
        self._attempted.set()
        self._attempted = trio.Event()

    def _write(self, batch: list[Any], good_size: int) -> int:
        """In a thread: frame what is not framed yet, append it all, fdatasync."""
        fd = self.fd
        assert fd is not None
        if os.fstat(fd).st_size != good_size:
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
        async with self._lock:
            self.close_now()

    def close_now(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _release(batch: list[Any]) -> None:
    """Drop the records one at a time, so that the GIL may pass between two."""
    while batch:
        batch.pop()
