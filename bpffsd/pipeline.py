"""One request's way through the daemon, without I/O: a datagram in, an Outcome out.

Both request channels take this way: the control socket (server.py) and each mount worker's
link (fs/mount.py). As h11's Connection does for HTTP, everything between the datagram received
and the reply to send happens here: the fds it carried, its payload (inline or in a memfd),
decoding within the channel's bounds, the schema check, dispatch, the mapping of errors to
replies, and the journal mark the reply must wait for. The channels keep the I/O: recvmsg and
waiting for it, spin-polling, awaiting an async handler (Pending), `await
persistence.durable(outcome.mark)` and sendmsg.

Only a BpfError, or a request that fails its schema (RequestError), is the caller's error,
answered with its errno and message; any other exception, OSError included, is the daemon's:
logged with its traceback, answered EIO. A malformed message (ProtocolError) drops the
connection where the channel asks for that (the control socket: no reply can be trusted to
reach such a peer), else it is the daemon's error like any other.
"""

from __future__ import annotations

import errno
import io
import logging
import socket
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from types import CoroutineType
from typing import TYPE_CHECKING, Any, Protocol

from bpffs import protocol
from bpffs.vm.errors import BpfError

from .syscall import Reply

if TYPE_CHECKING:
    from .persist import Mark, Persistence

log = logging.getLogger(__name__)


def caller_error(e: BaseException) -> OSError | None:
    """The error to send back when e is the caller's (a BpfError, or a request that fails
    its schema), else None: e is the daemon's own failure. An exception group with one leaf
    (a nursery's, since trio 0.25 even around a single error) stands for that leaf."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    if isinstance(e, BpfError | protocol.RequestError):
        return e
    return None


def error_reply(e: BaseException, where: str) -> bytes:
    """The reply for a failed request: the caller's error with its errno and message, or,
    for anything else, EIO after logging it with its traceback (`where` it happened)."""
    mine = caller_error(e)
    if mine is not None:
        detail = mine.detail() if isinstance(mine, BpfError) else None
        return protocol.error(mine.errno or errno.EIO, mine.strerror or str(mine), detail)
    log.error("internal error %s", where, exc_info=e)
    return protocol.error(errno.EIO, f"internal error in bpffsd: {type(e).__name__}: {e}")


@dataclass(slots=True)
class Request:
    """A decoded request that passed its schema, with the fds it carried: the pipeline's
    until the request is answered (a handler that holds on to one keeps a dup)."""

    op: str
    args: list[Any]
    fds: list[int]
    taken: int = 0  # fds handed out by take_fd

    def take_fd(self, what: str) -> int:
        """The next fd that came with this request."""
        if self.taken >= len(self.fds):
            raise BpfError(errno.EBADF, f"this request needs {what} sent as an fd")
        self.taken += 1
        return self.fds[self.taken - 1]

    def close(self) -> None:
        if self.fds:
            protocol.close_all(self.fds)
            self.fds = []


class Channel(Protocol):
    """Where requests come from (a control connection, a mount's worker), as far as the
    pipeline needs to know it."""

    message_limit: int  # the largest message it may send
    objects_max: int | None  # its budget for decoding a memfd message (unpack_request)
    where: str  # for the log: "serving pid 42", "in mount /sys/fs/bpf"

    def call(self, request: Request, handler: Callable[..., Any]) -> Any:
        """Run handler for request (or refuse it first): its result, or an awaitable."""
        ...


@dataclass(slots=True)
class Outcome:
    """What a request comes to, for its channel to send: a reply and the sockets sent with it
    (closed once sent), or no reply at all (None: drop the connection); or an async handler
    still to run (pending). The reply waits until what the request journaled since `mark` is
    durable (see `journaled`)."""

    reply: bytes | None
    fds: list[socket.socket | io.FileIO] = field(default_factory=list)  # closed once sent
    mark: Mark | None = None
    pending: Pending | None = None

    @property
    def settled(self) -> bool:
        """Whether it can be sent at once: no async handler to run, nothing journaled."""
        return self.pending is None and not self.journaled

    @property
    def journaled(self) -> bool:
        """Whether the request journaled anything: then its channel awaits
        `persistence.durable(mark)` and sends `durable(...)` of what it returns."""
        mark = self.mark
        return mark is not None and mark[0] is not None and mark[0].appended != mark[1]

    def durable(self, failure: BpfError | None) -> Outcome:
        """This outcome once the journal is written: itself, or, when the journal could not
        be written, that failure in place of the reply (the change is made but not durable)."""
        if failure is None:
            return self
        for s in self.fds:
            s.close()
        return Outcome(protocol.error(failure.errno, failure.strerror))


class Pipeline:
    """Requests of one kind of channel: its schema, its handlers, and the journal whose
    mark a reply waits for (None: no persistence). `malformed`, when given, is told of a
    malformed message before its connection is dropped."""

    def __init__(self, schema: protocol.Schema, handlers: Mapping[str, Callable[..., Any]],
                 journal: Persistence | None,
                 malformed: Callable[[Channel, protocol.ProtocolError], None] | None = None):
        self.schema = schema
        self.handlers = handlers
        self.journal = journal
        self.malformed = malformed

    def serve(self, channel: Channel, data: bytes, ancdata: list, flags: int) -> Outcome:
        """Decode, check and run one request, given as recvmsg returned it."""
        mark = self.journal.mark() if self.journal is not None else None
        request = None  # closed once answered, unless a Pending holds it
        try:
            request = self.decode(channel, data, ancdata, flags)
            result = channel.call(request, self.handlers[request.op])
            if isinstance(result, CoroutineType):
                pending, request = Pending(self, channel, request, result, mark), None
                return Outcome(None, mark=mark, pending=pending)
            return self.success(result, mark)
        except Exception as e:
            return self.failure(channel, e, mark)
        finally:
            if request is not None:
                request.close()

    def decode(self, channel: Channel, data: bytes, ancdata: list, flags: int) -> Request:
        """The request in a datagram, checked against the schema; its fds beyond those its
        operation takes are closed now (a waiting request must not keep them)."""
        payload, fds = protocol.open_message(data, ancdata, flags, channel.message_limit)
        try:
            msg = protocol.unpack_request(payload, max_bin=len(payload),
                                          objects_max=channel.objects_max)
            op, args = self.schema.check(msg)
        except BaseException:
            protocol.close_all(fds)
            raise
        return Request(op, args, self.schema.keep_fds(op, fds) if fds else fds)

    @staticmethod
    def success(result: Any, mark: Mark | None) -> Outcome:
        if isinstance(result, Reply):
            return Outcome(protocol.ok(result.result), result.fds, mark)
        return Outcome(protocol.ok(result), [], mark)

    def failure(self, channel: Channel, e: Exception, mark: Mark | None) -> Outcome:
        if self.malformed is not None and isinstance(e, protocol.ProtocolError):
            self.malformed(channel, e)
            return Outcome(None, [], mark)
        return Outcome(error_reply(e, channel.where), [], mark)


class Pending:
    """A request whose handler is async, not yet run: its channel awaits `run()` (or, if
    its client hangs up meanwhile, sends `hung_up()`), or refuses it with `fail(e)`."""

    def __init__(self, pipeline: Pipeline, channel: Channel, request: Request,
                 handler: Coroutine[Any, Any, Any], mark: Mark | None):
        self.pipeline = pipeline
        self.channel = channel
        self.request = request
        self.handler = handler
        self.mark = mark

    async def run(self) -> Outcome:
        """Await the handler. Its error is mapped here, inside whatever nursery the channel
        runs it in, so that it reaches the client as itself, not wrapped in that nursery's
        ExceptionGroup (trio >= 0.25). A cancellation (a hang-up) is no Exception: it goes
        on."""
        try:
            result = await self.handler
        except Exception as e:
            return self.pipeline.failure(self.channel, e, self.mark)
        finally:
            self.request.close()
        return self.pipeline.success(result, self.mark)

    def fail(self, e: Exception) -> Outcome:
        """e as the reply, the handler never started or not finished."""
        self.release()
        return self.pipeline.failure(self.channel, e, self.mark)

    def release(self) -> None:
        """Close the handler and the request's fds, whatever came of it (a cancellation
        while it waited to run included); closing again is harmless."""
        self.handler.close()
        self.request.close()

    def hung_up(self) -> Outcome:
        """Nobody to reply to."""
        return Outcome(None, [], self.mark)
