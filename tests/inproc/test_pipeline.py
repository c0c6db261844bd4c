"""The request pipeline (bpffsd/pipeline.py) in-process: datagrams as recvmsg returns them go
in, outcomes come out; no daemon, no socket, no FUSE. Both the control socket and the mount
workers' requests take this way, so what is checked here holds for both."""

from __future__ import annotations

import errno
import inspect
import logging
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio

from bpffs import protocol
from bpffs.daemon import pipeline
from bpffs.daemon.fs import fuse_ops
from bpffs.daemon.persist import Appends
from bpffs.daemon.pipeline import Pipeline, Request
from bpffs.daemon.syscall import Reply
from bpffs.vm.errors import BpfError

SCHEMA = protocol.Schema({"echo": ("int", "bytes"), "take": (), "change": (), "fail": ("str",),
                          "wait": ()}, {"take": 1})


class Channel:
    """A channel as the pipeline sees one (pipeline.Channel): bounds, a name for the log,
    and how a handler is called (here: with the request's arguments alone)."""

    message_limit = protocol.MESSAGE_MAX
    objects_max = protocol.REQUEST_OBJECTS_MAX_UNPRIVILEGED
    where = "serving pid 4242"

    def __init__(self) -> None:
        self.request: Request | None = None

    def call(self, request: Request, handler: Callable[..., Any]) -> Any:
        self.request = request
        return handler(*request.args)


class Journal:
    """Where a request's records go, as far as the pipeline sees it: `mark()`, shaped as
    Persistence.mark (the real Appends counter, no journal file behind it)."""

    def __init__(self) -> None:
        self.appends = Appends()

    def mark(self) -> tuple[Appends, int, None]:
        return self.appends, self.appends.appended, None


def datagram(*msg: object, fds: list[int] = ()) -> tuple[bytes, list, int]:  # type: ignore[assignment]
    """A request as recvmsg returns it (data, ancdata, flags)."""
    return protocol.pack(list(msg)), protocol.encode_fds(list(fds)), 0


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        assert e.errno == errno.EBADF
        return False
    return True


@pytest.fixture
def pipes() -> Iterator[list[int]]:
    """Three fds to send with a request (read ends of pipes), whatever is left closed after."""
    ends = [os.pipe() for _ in range(3)]
    yield [r for r, _ in ends]
    for r, w in ends:
        protocol.close_all([r, w])


def make(journal: Journal | None = None, malformed: Callable | None = None,
         **handlers: Callable[..., Any]) -> Pipeline:
    return Pipeline(SCHEMA, handlers, journal, malformed)  # type: ignore[arg-type]


def test_a_good_request_gets_its_result() -> None:
    outcome = make(echo=lambda n, b: [n + 1, b]).serve(Channel(), *datagram("echo", 41, b"x"))
    assert protocol.unpack(outcome.reply) == [0, [42, b"x"]]
    assert outcome.fds == [] and outcome.pending is None and not outcome.journaled
    assert outcome.settled  # sent at once: nothing to await


def test_a_reply_carries_the_sockets_its_handler_gives() -> None:
    ours, theirs = socket.socketpair()
    with ours:
        outcome = make(echo=lambda n, b: Reply(n, [theirs])).serve(
            Channel(), *datagram("echo", 7, b""))
        assert protocol.unpack(outcome.reply) == [0, 7] and outcome.fds == [theirs]
        theirs.close()


def test_fds_beyond_what_the_op_takes_are_closed_on_arrival_the_rest_after(
        pipes: list[int]) -> None:
    seen = []

    def take() -> None:
        fd = channel.request.take_fd("a pipe")
        seen.append((fd, [is_open(p) for p in pipes]))

    channel = Channel()
    outcome = make(take=take).serve(channel, *datagram("take", fds=pipes))
    assert protocol.unpack(outcome.reply) == [0, None]
    assert seen == [(pipes[0], [True, False, False])]  # "take" takes 1: the others are closed
    assert not is_open(pipes[0])  # and that one once the request is answered


def test_a_missing_fd_is_the_callers_ebadf() -> None:
    channel = Channel()
    outcome = make(take=lambda: channel.request.take_fd("a pipe")).serve(
        channel, *datagram("take"))
    assert protocol.unpack(outcome.reply) == [errno.EBADF,
                                              "this request needs a pipe sent as an fd"]


@pytest.mark.parametrize(("msg", "message"), [
    (["echo", "41", b"x"], "echo: argument 1 must be int, got str"),
    (["echo", True, b"x"], "echo: argument 1 must be int, got bool"),
    (["echo", 41], "echo takes 2 arguments, got 1"),
    (["nope"], "unknown operation 'nope'"),
    ([], "a request is a msgpack array [op, args...]"),
])
def test_a_request_failing_its_schema_is_einval_and_not_logged(
        caplog: pytest.LogCaptureFixture, pipes: list[int], msg: list, message: str) -> None:
    ran = []
    with caplog.at_level(logging.DEBUG):
        outcome = make(echo=lambda *a: ran.append(a)).serve(
            Channel(), *datagram(*msg, fds=pipes))
    assert protocol.unpack(outcome.reply) == [errno.EINVAL, message]
    assert not ran and not caplog.records
    assert not any(map(is_open, pipes))  # a refused request's fds are closed too


def test_a_bpf_error_is_the_callers_with_its_errno_message_and_detail() -> None:
    def fail(what: str) -> None:
        raise BpfError(errno.EEXIST, f"{what} taken")

    outcome = make(fail=fail).serve(Channel(), *datagram("fail", "name"))
    assert protocol.unpack(outcome.reply) == [errno.EEXIST, "name taken"]


async def test_a_bpf_error_from_inside_a_nursery_keeps_its_errno() -> None:
    """An async handler's BpfError raised in a nursery (an ExceptionGroup since trio 0.25)
    reaches the client as itself: issue 12."""
    async def wait() -> None:
        async with trio.open_nursery():
            raise BpfError(errno.EEXIST, "name taken")

    outcome = make(wait=wait).serve(Channel(), *datagram("wait"))
    assert outcome.reply is None and outcome.pending is not None and not outcome.settled
    done = await outcome.pending.run()
    assert protocol.unpack(done.reply) == [errno.EEXIST, "name taken"]


def test_a_group_of_one_bpf_error_is_the_callers() -> None:
    group = BaseExceptionGroup("nursery", [BpfError(errno.ENOENT, "gone")])
    assert pipeline.caller_error(group) is group.exceptions[0]
    assert protocol.unpack(pipeline.error_reply(group, "in a test")) == [errno.ENOENT, "gone"]


@pytest.mark.parametrize("exc", [PermissionError(errno.EACCES, "state dir"),
                                 OSError(errno.ENOSPC, "disk full"), KeyError("k"),
                                 ExceptionGroup("nursery", [ValueError("bug")])],
                         ids=["PermissionError", "OSError", "KeyError", "group"])
def test_any_other_exception_is_logged_with_its_traceback_and_is_eio(
        caplog: pytest.LogCaptureFixture, exc: Exception) -> None:
    def fail(what: str) -> None:
        raise exc

    with caplog.at_level(logging.ERROR, logger=pipeline.log.name):
        outcome = make(fail=fail).serve(Channel(), *datagram("fail", "x"))
    reply = protocol.unpack(outcome.reply)
    assert reply[0] == errno.EIO and reply[1].startswith("internal error in bpffsd: "), reply
    (record,) = caplog.records
    assert record.exc_info is not None and record.exc_info[1] is exc
    assert Channel.where in record.getMessage()


def test_a_malformed_message_drops_the_connection_where_the_channel_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    told = []
    outcome = make(malformed=lambda channel, e: told.append(e)).serve(
        Channel(), b"\x92\x01", [], 0)  # an array of two that ends after one
    assert outcome.reply is None and outcome.pending is None
    assert [type(e) for e in told] == [protocol.ProtocolError]
    with caplog.at_level(logging.ERROR, logger=pipeline.log.name):
        outcome = make().serve(Channel(), protocol.LARGE_MESSAGE, [], 0)  # no memfd with it
    assert protocol.unpack(outcome.reply)[0] == errno.EIO  # elsewhere: the daemon's error
    assert len(caplog.records) == 1


def test_a_large_request_arrives_in_its_memfd() -> None:
    payload = protocol.pack(["echo", 1, bytes(protocol.INLINE_MAX)])
    with protocol.framed(payload) as (buffers, ancdata):
        assert buffers == [protocol.LARGE_MESSAGE]
        (memfd,) = protocol.decode_fds(ancdata, 0)
        received = os.dup(memfd)  # what SCM_RIGHTS gives the receiver: its own fd
        outcome = make(echo=lambda n, b: len(b)).serve(
            Channel(), buffers[0], protocol.encode_fds([received]), 0)
    assert protocol.unpack(outcome.reply) == [0, protocol.INLINE_MAX]
    assert not is_open(memfd) and not is_open(received)  # the sender's and the receiver's


def test_a_request_that_journals_waits_for_durability() -> None:
    journal = Journal()

    def change() -> str:
        journal.appends.appended += 1  # as Persistence._append does for each record
        return "done"

    untouched = make(journal, echo=lambda n, b: n).serve(Channel(), *datagram("echo", 1, b""))
    assert not untouched.journaled
    outcome = make(journal, change=change).serve(Channel(), *datagram("change"))
    assert outcome.journaled and protocol.unpack(outcome.reply) == [0, "done"]
    assert not outcome.settled
    assert outcome.durable(None) is outcome  # on disk: the reply goes as it is


def test_a_change_that_is_not_durable_is_answered_with_the_journals_error() -> None:
    journal = Journal()
    ours, theirs = socket.socketpair()

    def change() -> Reply:
        journal.appends.appended += 1
        return Reply(1, [theirs])

    with ours:
        outcome = make(journal, change=change).serve(Channel(), *datagram("change"))
        failed = outcome.durable(BpfError(errno.ENOSPC, "No space left on device"))
    assert protocol.unpack(failed.reply) == [errno.ENOSPC, "No space left on device"]
    assert failed.fds == [] and theirs.fileno() == -1  # the object fd is never sent


def test_without_persistence_nothing_waits() -> None:
    outcome = make(change=lambda: None).serve(Channel(), *datagram("change"))
    assert outcome.mark is None and not outcome.journaled


async def test_an_async_request_refused_before_it_runs_releases_everything(
        pipes: list[int]) -> None:
    started = []

    async def take() -> None:
        started.append(True)

    outcome = make(take=take).serve(Channel(), *datagram("take", fds=pipes[:1]))
    assert outcome.pending is not None and is_open(pipes[0])  # held while it waits
    refused = outcome.pending.fail(BpfError(errno.EAGAIN, "too many waiting"))
    assert protocol.unpack(refused.reply) == [errno.EAGAIN, "too many waiting"]
    assert not started and not is_open(pipes[0])


async def test_an_async_request_whose_client_hangs_up_gets_no_reply(
        pipes: list[int]) -> None:
    async def wait() -> None:
        await trio.sleep_forever()

    outcome = make(wait=wait).serve(Channel(), *datagram("wait", fds=pipes[:1]))
    assert outcome.pending is not None
    with trio.move_on_after(0.01):  # as the server cancels it on a hang-up
        await outcome.pending.run()
    assert outcome.pending.hung_up().reply is None and not is_open(pipes[0])


def test_every_worker_op_has_a_schema_that_fits_its_handler() -> None:
    """The mount workers' requests are checked like the control socket's (fuse_ops.OPS)."""
    handlers = fuse_ops.FuseOps(None, None).handlers()  # type: ignore[arg-type]
    assert set(handlers) == set(fuse_ops.OPS)
    for op, handler in handlers.items():
        assert len(inspect.signature(handler).parameters) == len(fuse_ops.OPS[op]), op


def test_a_malformed_worker_request_is_einval() -> None:
    ops = fuse_ops.FuseOps(None, None)  # type: ignore[arg-type]
    outcome = Pipeline(fuse_ops.REQUESTS, ops.handlers(), None).serve(
        Channel(), *datagram("getattr", [0, 0, 1, 0o22], "1"))
    assert protocol.unpack(outcome.reply) == [errno.EINVAL,
                                              "getattr: argument 2 must be int, got str"]
