"""The journal's committer thread (issue 16): it lives as long as Persistence.run, a request's
wait for durability starts the commit of its records, concurrent waiters share one fdatasync,
a failed write fails the waiters whose records it held (with its errno) and keeps the records
for the next attempt, and stopping lets the queued commits finish before the thread is joined.
In process: a Journal on a file in tmp_path, the real thread, trio's loop."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from bpffs.daemon.daemon import Config, Daemon
from bpffs.daemon.persist import journal as journal_module
from bpffs.daemon.persist import records
from bpffs.daemon.persist.journal import Committer, Journal
from bpffs.vm.errors import BpfError


def committer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "bpffsd-journal"]


class CountingJournal(Journal):
    """Counts the write+fdatasync attempts; `fail` makes the next ones write half a record
    (a torn tail) and fail with that errno; `pause` holds each attempt until set."""

    def __init__(self, path: Path, committer: Committer):
        super().__init__(str(path), os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                                            0o600), committer=committer)
        self.writes = 0
        self.fail: int | None = None
        self.pause: threading.Event | None = None

    def _write(self, batch: list[Any], good_size: int, torn: bool = True) -> int:
        self.writes += 1
        if self.pause is not None:
            self.pause.wait(10)
        if self.fail is not None:
            assert self.fd is not None
            os.write(self.fd, b"\xff" * 5)
            raise OSError(self.fail, os.strerror(self.fail))
        return super()._write(batch, good_size, torn)


def key(n: int) -> bytes:
    return n.to_bytes(4, "little")


def record(n: int) -> tuple:
    """A map update's record, as the Recorder makes it."""
    return ("set", 1, [(key(n), bytes(8))])


def keys_on_disk(path: Path) -> list[bytes]:
    """The key of each record in the journal file, which must read to its end."""
    found, _, problem = records.read(path.read_bytes())
    assert problem is None, problem
    return [r[2][0][0] for r in found]


async def test_a_waiter_starts_the_commit_and_is_acknowledged_once_on_disk(tmp_path) -> None:
    committer = Committer()
    committer.start()
    try:
        journal = CountingJournal(tmp_path / "j", committer)
        journal.append(record(1))
        journal.append(record(2))
        assert journal.writes == 0  # appending alone writes nothing (a request may add more)
        with trio.fail_after(10):
            await journal.durable(journal.appended)
        assert journal.synced == 2 and journal.writes == 1
        assert keys_on_disk(tmp_path / "j") == [key(1), key(2)]
    finally:
        with trio.fail_after(10):
            await committer.stop()
        journal.close_now()
    assert not committer_threads()


async def test_concurrent_waiters_share_one_fdatasync(tmp_path) -> None:
    """While one commit is under way, the records of every request that waits meanwhile go
    to disk together in the next: 1 + 1 writes for 11 requests."""
    committer = Committer()
    committer.start()
    journal = CountingJournal(tmp_path / "j", committer)
    journal.pause = threading.Event()
    try:
        async with trio.open_nursery() as nursery:
            async def request(n: int) -> None:
                journal.append(record(n))
                await journal.durable(journal.appended)

            nursery.start_soon(request, 0)
            await trio.testing.wait_all_tasks_blocked()
            for n in range(1, 11):
                nursery.start_soon(request, n)
            await trio.testing.wait_all_tasks_blocked()
            journal.pause.set()
        assert journal.synced == 11 and journal.writes == 2
        assert sorted(keys_on_disk(tmp_path / "j")) == sorted(key(n) for n in range(11))
    finally:
        journal.pause.set()
        with trio.fail_after(10):
            await committer.stop()
        journal.close_now()


async def test_a_waiter_that_gives_up_leaves_the_others_served(tmp_path) -> None:
    """The first waiter reads the committer's results for everyone; when it is cancelled (its
    client hung up), another one takes over."""
    committer = Committer()
    committer.start()
    journal = CountingJournal(tmp_path / "j", committer)
    journal.pause = threading.Event()
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                first = trio.CancelScope()

                async def request(n: int, scope: trio.CancelScope) -> None:
                    with scope:
                        journal.append(record(n))
                        await journal.durable(journal.appended)

                nursery.start_soon(request, 0, first)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(request, 1, trio.CancelScope())
                await trio.testing.wait_all_tasks_blocked()
                first.cancel()
                await trio.testing.wait_all_tasks_blocked()
                journal.pause.set()
        assert journal.synced == 2
    finally:
        journal.pause.set()
        with trio.fail_after(10):
            await committer.stop()
        journal.close_now()


async def test_a_failed_write_fails_its_waiters_with_the_errno_and_keeps_the_records(
        tmp_path) -> None:
    committer = Committer()
    committer.start()
    journal = CountingJournal(tmp_path / "j", committer)
    try:
        journal.fail = errno.ENOSPC
        journal.append(record(1))
        with trio.fail_after(10), pytest.raises(BpfError) as caught:
            await journal.durable(journal.appended)
        assert caught.value.errno == errno.ENOSPC and "not durable" in str(caught.value)
        assert journal.synced == 0 and journal.failure is not None
        journal.fail = None  # room again: the next request's commit writes both records
        journal.append(record(2))
        with trio.fail_after(10):
            await journal.durable(journal.appended)
        assert journal.synced == 2 and journal.failure is None
        assert keys_on_disk(tmp_path / "j") == [key(1), key(2)]  # no torn bytes between
    finally:
        with trio.fail_after(10):
            await committer.stop()
        journal.close_now()


async def test_stopping_finishes_the_queued_commits_then_ends_the_thread(tmp_path) -> None:
    committer = Committer()
    committer.start()
    journal = CountingJournal(tmp_path / "j", committer)
    journal.append(record(1))
    assert journal.start_commit()
    with trio.fail_after(10):
        await committer.stop()
    assert journal.synced == 1 and not committer_threads() and not committer.running
    journal.append(record(2))
    assert not journal.start_commit()  # stopped: nothing is taken any more
    journal.close_now()


async def test_the_committer_thread_lives_as_long_as_persistence_runs(tmp_path) -> None:
    """Started by Persistence.run, joined when it is cancelled (daemon shutdown), after the
    records journaled are written and the state compacted; the files are closed."""
    daemon = Daemon(Config(str(tmp_path / "s.sock"), None, str(tmp_path / "state")))
    persistence = daemon.persistence
    assert persistence is not None
    persistence.restore()
    assert not committer_threads()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(persistence.run)
            assert len(committer_threads()) == 1
            mark = persistence.mark()
            persistence.recorder.emit(("free", "map", 12345))  # any record will do
            assert await persistence.durable(mark) is None
            journal = persistence.journal
            assert journal is not None and journal.synced == journal.appended == 1
            nursery.cancel_scope.cancel()
    assert not committer_threads()
    assert journal.fd is None and persistence.dir_fd is None
    assert persistence.generation == 2  # compacted at shutdown, over generation 1's journal


def test_the_journal_module_starts_no_thread_on_import() -> None:
    assert journal_module.Committer().running is False
