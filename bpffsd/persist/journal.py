"""The write-ahead journal with group commit.

Handlers append records as they change state; a reply is sent only once the records its
request appended are on disk. The committer (Persistence._commit) writes and fsyncs whatever
has accumulated meanwhile, so concurrent clients share each fsync. A failed write (full disk,
read-only state directory) keeps the records in memory for the next attempt and fails the
waiting requests with the write's errno: their change is live but not durable, and the
client is told so.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import trio

from bpffs.vm.errors import BpfError

from . import records


class Journal:
    def __init__(self, path: str, fd: int):
        """fd: the journal file, opened for appending by the caller (which opens it relative
        to the state directory's fd, following no symlink); path names it in messages."""
        self.path = path
        self.fd = fd
        self.size = os.fstat(self.fd).st_size
        self.appended = 0  # records appended so far
        self.synced = 0  # records known to be on disk
        self.failure: OSError | None = None
        self.wakeup = trio.Event()  # set when there is something to commit
        self._buffer: list[bytes] = []
        self._attempted = trio.Event()  # set after each commit attempt

    def append(self, record: Any) -> None:
        self._buffer.append(records.frame(record))
        self.appended += 1
        self.wakeup.set()

    @property
    def pending(self) -> bool:
        return self.synced < self.appended

    async def durable(self, upto: int) -> None:
        """Wait until the first `upto` records are on disk; raise the write error if not."""
        while self.synced < upto:
            await self._attempted.wait()
            if self.synced < upto and self.failure is not None:
                raise BpfError(self.failure.errno or errno.EIO, "the change is not durable:"
                               f" writing the journal {self.path} failed:"
                               f" {self.failure.strerror}")

    async def commit(self) -> None:
        batch, count = b"".join(self._buffer), len(self._buffer)
        try:
            await trio.to_thread.run_sync(self._write, batch, self.size)
        except OSError as e:
            self.failure = e
        else:
            del self._buffer[:count]
            self.size += len(batch)
            self.synced += count
            self.failure = None
        finally:
            self.wake()

    def wake(self) -> None:
        """Let waiters look at `synced` again."""
        self._attempted.set()
        self._attempted = trio.Event()

    def _write(self, data: bytes, good_size: int) -> None:
        if os.fstat(self.fd).st_size != good_size:
            os.ftruncate(self.fd, good_size)  # drop the torn end of a failed attempt
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        os.fdatasync(self.fd)  # the size is data too: appends are durable

    def close(self) -> None:
        os.close(self.fd)
