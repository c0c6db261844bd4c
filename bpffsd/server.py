"""The control socket: accepts connections and serves each one's requests in order.

Every connection gets its own task under the server's nursery, so a slow or stuck client only
ever waits on itself. A request is read with a direct non-blocking syscall first, parking in
trio only when the socket is empty: that keeps the round trip close to a blocking server's.
What happens to a request between the datagram read and the reply sent (decoding, the schema,
dispatch, whose error it is, the journal mark) is pipeline.py's, shared with the mount
workers' requests; this module keeps the socket I/O. Nothing a client sends can end the
daemon: malformed input gets an errno reply (or, when the framing itself is broken, the
connection is dropped), and a handler bug is logged and answered with EIO.
What a user may hold here (connections, object fds, waiting requests) is limited per uid
(limits.py), and so is what its requests may cost to decode (protocol.unpack_request).

A reply too big for a datagram travels in a memfd the daemon fills: its memory lives until the
client receives it. So a connection holds at most one such reply unread: its next request is
read only once the client has received the last one (SIOCOUTQ, the bytes of ours still queued
in the peer's socket, is 0). Waiting never blocks the event loop, and a slow reader only ever
waits on itself: a client that reads each reply before its next request never waits at all.
Across a user's connections, the operations that may answer in a memfd run one at a time and
are refused (EAGAIN, before they run: no reply is lost) while the user's unread replies are
at --max-reply-bytes-per-uid; refused rather than made to wait, as a client reading its
connections in its own order could otherwise wait on itself for ever.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import socket
import struct
import termios
from collections.abc import Callable
from time import monotonic, perf_counter_ns
from typing import TYPE_CHECKING, Any

import trio

from bpffs import protocol
from bpffs.vm.errors import BpfError

from .limits import caller_uid
from .objfd import ObjectFd
from .peer import Peer
from .pipeline import Outcome, Pending, Pipeline, Request
from .pipeline import error_reply as error_reply  # tests/core/test_error_paths.py uses it here

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger(__name__)
# A client in a request loop sends its next request a few microseconds after reading a reply.
# Parking in trio until then (epoll, the run loop, a task switch) costs ~20 us of CPU and as
# much latency here, so after a reply the connection polls its socket for up to SPIN_NS first
# (only while this client's requests keep coming that fast), and lets the other tasks run at
# least every SPIN_STREAK requests. Measured on a 2-core VM: a trio echo round trip goes from
# ~45 us to ~23 us, with less CPU (no epoll).
SPIN_NS = 50_000
SPIN_STREAK = 8
# Connections accepted back to back before the other tasks get a turn (see serve()).
ACCEPT_BURST = 32
# Warnings about malformed messages: at most WARN_BURST per uid every WARN_INTERVAL seconds,
# then one line saying how many more there were. A client looping on bad input must not
# flood the log (one at 16k lines in 5 minutes did).
WARN_BURST = 5
WARN_INTERVAL = 60.0
# A connection whose client has not received its last large reply is polled (SIOCOUTQ) at
# growing intervals, from UNREAD_POLL_MIN to UNREAD_POLL_MAX seconds, once its next request
# is there.
UNREAD_POLL_MIN = 0.001
UNREAD_POLL_MAX = 0.05
_OUTQ = struct.Struct("i")
# Async operations whose reply may be large (a memfd): one user runs one at a time, and only
# while its unread replies are under its limit. Many running at once, each slicing through
# its walk, would each build a reply before any was counted as unread (64 connections of one
# user made 64 copies of a 7 MB map at once). One event loop runs them anyway: this costs no
# throughput, only the interleaving of one user's own requests.
LARGE_REPLY_OPS = frozenset({"map_lookup_batch", "prog_test_run_batch", "prog_test_run_buffer",
                             "prog_test_run"})
# Async operations that end on their own within seconds (a pin made through the mount, a path
# resolved in a thread: both time-limited): run without watching for a hang-up, whose nursery
# and task cost three passes of the run loop (~60 us on a 2-core VM) on each such request.
BOUNDED_OPS = frozenset({"obj_pin", "obj_get"})


def unsent(sock: socket.socket) -> int:
    """Bytes of what we sent still queued, unreceived, at the peer (SIOCOUTQ: for a unix
    socket, the memory its skbs are charged, including a memfd message's 1-byte datagram;
    0 once the peer has received everything, or closed)."""
    return _OUTQ.unpack(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(_OUTQ.size)))[0]


class WarningLimiter:
    """Rate-limits one kind of warning per source (a uid, say): WARN_BURST lines an
    interval, then one line with the count of those not logged."""

    def __init__(self, what: str, burst: int = WARN_BURST, interval: float = WARN_INTERVAL):
        self.what, self.burst, self.interval = what, burst, interval
        self._windows: dict[str, list[float]] = {}  # source -> [start, logged, dropped]

    def warn(self, source: str, msg: str, *args: Any) -> None:
        now = monotonic()
        window = self._windows.get(source)
        if window is None or now - window[0] >= self.interval:
            if window is not None and window[2]:
                log.warning("%d more %s from %s in %.0f s not logged", window[2], self.what,
                            source, self.interval)
            window = self._windows[source] = [now, 0, 0]
            if len(self._windows) > 4096:  # forget quiet sources
                self._windows = {k: w for k, w in self._windows.items()
                                 if now - w[0] < self.interval}
                self._windows[source] = window
        if window[1] < self.burst:
            window[1] += 1
            suffix = f" (further {self.what} from {source} are counted, not logged)" \
                if window[1] == self.burst else ""
            log.warning(msg + suffix, *args)
        else:
            window[2] += 1


class BoundFds(dict[int, ObjectFd]):
    """handle (client fd's inode) -> object fd, for one connection. Object fds closed since
    they were bound are dropped once the table has doubled: a long-lived connection that
    gets and closes fds in a loop must not grow without bound."""

    PRUNE_MIN = 1024

    def __init__(self) -> None:
        super().__init__()
        self._prune_at = self.PRUNE_MIN

    def __setitem__(self, handle: int, ref: ObjectFd) -> None:
        super().__setitem__(handle, ref)
        if len(self) >= self._prune_at:
            for closed in [h for h, r in self.items() if r.closed]:
                del self[closed]
            self._prune_at = max(self.PRUNE_MIN, 2 * len(self))


class Connection:
    """One client's connection: what it has bound, and how its requests are served (the
    pipeline's Channel for them)."""

    def __init__(self, sock: socket.socket, peer: Peer, message_limit: int,
                 hello_deadline: float):
        self.sock = sock
        self.peer = peer
        self.message_limit = message_limit
        self.objects_max = (protocol.REQUEST_OBJECTS_MAX if not peer.uid
                            else protocol.REQUEST_OBJECTS_MAX_UNPRIVILEGED)
        self.where = f"serving pid {peer.pid}"
        self.greeted = False
        self.hello_deadline = hello_deadline  # trio time by which hello must have come
        self.bound = BoundFds()
        self.request: Request | None = None  # the request being served
        self.unread = 0  # bytes of the last large reply, while the client may not have it
        self.spin = True  # this client's requests come back to back (see SPIN_NS)
        self.streak = 0  # requests served since this task last let the others run

    def call(self, request: Request, handler: Callable[..., Any]) -> Any:
        if not self.greeted and request.op != "hello":
            raise BpfError(errno.EPROTO, "the first request must be hello")
        self.request = request
        return handler(self, *request.args)

    def resolve(self, handle: int) -> ObjectFd:
        ref = self.bound.get(handle)
        if ref is None or ref.closed:
            raise BpfError(errno.EBADF, f"handle {handle} is not an open object fd bound on this"
                           " connection (bind the fd first)")
        return ref

    def take_fd(self, what: str) -> int:
        """The next fd that came with this request. The server still owns it and closes it
        when the request is done: keep a dup to hold on to it."""
        assert self.request is not None
        return self.request.take_fd(what)


class Server:
    def __init__(self, daemon: Daemon, listener: socket.socket):
        self.daemon = daemon
        self.listener = listener
        self.connections: set[Connection] = set()
        self.pipeline = Pipeline(protocol.REQUESTS, daemon.handlers(), daemon.persistence,
                                 malformed=self._malformed)
        self.inbox = protocol.Inbox()  # shared: each message is copied out before any await
        self.limits = daemon.limits
        self.malformed = WarningLimiter("malformed messages")
        self.accept_failures = WarningLimiter("accept failures")
        self.unread: dict[int, set[Connection]] = {}  # uid -> its connections with unread
        self._large: dict[int, trio.Lock] = {}  # uid -> held while one LARGE_REPLY_OPS runs

    async def serve(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        self.listener.setblocking(False)
        async with trio.open_nursery() as nursery:
            task_status.started()
            burst = 0  # connections accepted since this task last let the others run
            while True:
                try:
                    sock, _ = self.listener.accept()
                except BlockingIOError:
                    burst = 0
                    await trio.lowlevel.wait_readable(self.listener)
                    continue
                except OSError as e:  # EMFILE and friends: back off, keep serving the rest
                    self.accept_failures.warn("the listener", "accept failed: %s", e)
                    await trio.sleep(0.1)
                    continue
                # The connection limit is checked here, from SO_PEERCRED alone, before any
                # task or /proc read: a user opening thousands costs each a getsockopt. And
                # at most ACCEPT_BURST accepts per pass of the run loop: a full backlog must
                # not hold up the connections already served (19,000 at once stalled them
                # 0.5 s), nor be drained so slowly that connecting clients time out.
                try:
                    uid = Peer.uid_of(sock)
                    self.limits.charge(self.limits.connections, uid)
                except OSError as e:
                    self._refuse(sock, e)
                else:
                    nursery.start_soon(self._serve_connection, sock, uid)
                burst += 1
                if burst >= ACCEPT_BURST:
                    burst = 0
                    await trio.lowlevel.checkpoint()

    async def _serve_connection(self, sock: socket.socket, uid: int) -> None:
        """Serve one accepted connection, already charged to uid's connections."""
        sock.setblocking(False)
        try:
            try:
                peer = Peer.of(sock)
            except OSError:
                return
            conn = Connection(sock, peer, self.limits.message_limit(peer.uid),
                              trio.current_time() + self.limits.config.hello_timeout)
            refusal = conn.peer.refusal()  # its process was gone before we could read it
            if refusal is not None:
                self._refuse(sock, refusal)
                return
            caller_uid.set(uid)  # this task's object fds are charged to uid (limits.py)
            self.connections.add(conn)
            try:
                await self._serve_requests(conn)
            finally:
                self.connections.discard(conn)
                self._replies_read(conn)
        finally:
            self.limits.connections.uncharge(uid)
            sock.close()

    @staticmethod
    def _refuse(sock: socket.socket, e: OSError) -> None:
        """Say why (as the reply to the hello, when it is the caller's), then hang up."""
        if isinstance(e, BpfError):
            try:
                sock.send(protocol.error(e.errno or errno.EPERM, e.strerror or str(e)))
            except OSError:
                pass
        sock.close()

    async def _serve_requests(self, conn: Connection) -> None:
        """Answer conn's requests in order until its client hangs up or is dropped. The
        common case (a small reply, the next request caught while spinning) awaits nothing."""
        caught: tuple | None = None  # a request caught while spinning
        try:
            while True:
                message = caught if caught is not None else await self._receive(conn)
                if not self._admissible(conn, message):
                    return
                outcome = self.pipeline.serve(conn, *message)
                if not outcome.settled:
                    outcome = await self._settle(conn, outcome)
                if outcome.reply is None:
                    return
                caught = None
                if not self._sent_inline(conn.sock, outcome):
                    await self._send(conn, outcome)
                elif (caught := self._spin(conn)) is None:
                    await self._wait_for_next(conn)
        except OSError as e:
            log.debug("connection from pid %d ended: %s", conn.peer.pid, e)

    @staticmethod
    def _admissible(conn: Connection, message: tuple[bytes, list, int] | None) -> bool:
        """Whether a message read is a request to serve: not when there is none (see
        _receive), when its client hung up, or has not said hello in time."""
        if message is None:
            return False
        data, ancdata, _flags = message
        if not data and not ancdata:
            return False  # the peer closed (or sent an empty datagram, which is no request)
        if not conn.greeted and trio.current_time() > conn.hello_deadline:
            protocol.close_all(protocol.decode_fds(ancdata, 0))
            return False  # requests but never a good hello: as idle as silence
        return True

    async def _receive(self, conn: Connection) -> tuple[bytes, list, int] | None:
        """Read conn's next message, waiting for it (and first for its client to receive
        the last large reply); None when no hello came within the hello timeout."""
        if conn.unread:
            await self._hold_back(conn)
        sock = conn.sock
        while True:
            try:
                return self.inbox.recvmsg(sock)
            except BlockingIOError:
                pass
            if conn.greeted:
                await trio.lowlevel.wait_readable(sock)
                continue
            with trio.move_on_at(conn.hello_deadline):
                await trio.lowlevel.wait_readable(sock)
                continue
            log.debug("closing connection from pid %d: no hello within %g s", conn.peer.pid,
                      self.limits.config.hello_timeout)
            return None

    async def _settle(self, conn: Connection, outcome: Outcome) -> Outcome:
        """The outcome to send: its async handler run, what it journaled durable."""
        if outcome.pending is not None:
            outcome = await self._park(conn, outcome.pending)
        if outcome.journaled:
            persistence = self.daemon.persistence
            assert persistence is not None
            outcome = outcome.durable(await persistence.durable(outcome.mark))
        return outcome

    @staticmethod
    def _sent_inline(sock: socket.socket, outcome: Outcome) -> bool:
        """Send the reply with a plain send() if it is small, has no fds and the socket has
        room (the common case); False if it needs _send."""
        assert outcome.reply is not None
        if outcome.fds or len(outcome.reply) > protocol.INLINE_MAX:
            return False
        try:
            sock.send(outcome.reply)
        except BlockingIOError:
            return False
        return True

    def _spin(self, conn: Connection) -> tuple[bytes, list, int] | None:
        """After a small reply, poll for the client's next request for up to SPIN_NS while
        its requests come back to back, letting the other tasks run every SPIN_STREAK."""
        if conn.spin and conn.streak < SPIN_STREAK:
            try:
                caught = self.inbox.recvmsg(conn.sock, SPIN_NS)
            except BlockingIOError:
                return None
            conn.streak += 1
            return caught
        return None

    @staticmethod
    async def _wait_for_next(conn: Connection) -> None:
        """Park until the next request is there rather than fail a recvmsg first (a syscall
        and an exception); spin after the next reply if this wait is short."""
        parked = perf_counter_ns()
        await trio.lowlevel.wait_readable(conn.sock)
        conn.spin, conn.streak = perf_counter_ns() - parked < SPIN_NS, 0

    async def _send(self, conn: Connection, outcome: Outcome) -> None:
        """Send a reply that needs sendmsg (fds, a memfd) or room in the socket; its sockets
        are closed then: the client holds its copies (or never will: the refs are dropped)."""
        reply, sock = outcome.reply, conn.sock
        assert reply is not None
        try:
            with protocol.framed(reply, [s.fileno() for s in outcome.fds]) as message:
                while True:
                    try:
                        sock.sendmsg(*message)
                        break
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(sock)
        finally:
            for s in outcome.fds:
                s.close()
        if len(reply) > protocol.INLINE_MAX:  # it went in a memfd
            self._reply_sent(conn, len(reply))

    # -- large replies not yet received ---------------------------------------------------------
    def _reply_sent(self, conn: Connection, size: int) -> None:
        self._replies_read(conn)  # at most one unread a connection: the last
        uid = conn.peer.uid
        conn.unread = size
        self.limits.unread_replies[uid] += size
        self.unread.setdefault(uid, set()).add(conn)

    def _replies_read(self, conn: Connection) -> None:
        if not conn.unread:
            return
        uid = conn.peer.uid
        self.limits.unread_replies[uid] -= conn.unread
        if self.limits.unread_replies[uid] <= 0:
            del self.limits.unread_replies[uid]
        conn.unread = 0
        waiting = self.unread.get(uid)
        if waiting is not None:
            waiting.discard(conn)
            if not waiting:
                del self.unread[uid]

    def _refresh_unread(self, uid: int) -> None:
        """Forget the unread replies of uid that its clients have received since."""
        for conn in list(self.unread.get(uid, ())):
            try:
                received = unsent(conn.sock) == 0
            except OSError:
                received = True  # a socket closed under us holds nothing queued
            if received:
                self._replies_read(conn)

    async def _hold_back(self, conn: Connection) -> None:
        """Wait before reading conn's next request while its client has not received the last
        large reply. Nothing is polled before the next request (or a hang-up) is there: a
        client that reads each reply before it asks again finds the way clear at once."""
        sock = conn.sock
        await trio.lowlevel.wait_readable(sock)
        delay = UNREAD_POLL_MIN
        while unsent(sock):
            await trio.sleep(delay)
            delay = min(2 * delay, UNREAD_POLL_MAX)
        self._replies_read(conn)

    def _reply_refusal(self, uid: int) -> BpfError | None:
        """Why uid may not run one more operation that may answer in a memfd (None: it may)."""
        if not self.limits.replies_over(uid):
            return None
        self._refresh_unread(uid)
        if not self.limits.replies_over(uid):
            return None
        limit = self.limits.config.max_reply_bytes_per_uid
        return BpfError(errno.EAGAIN, f"uid {uid} has {self.limits.unread_replies[uid]} bytes"
                        f" of replies sent and not yet received, the most bpffsd allows a user"
                        f" (--max-reply-bytes-per-uid {limit}); read them first")

    async def _park(self, conn: Connection, pending: Pending) -> Outcome:
        """_finish an async handler, counted against the caller's waiting requests."""
        uid = conn.peer.uid
        try:
            self.limits.charge(self.limits.parked, uid)
        except BpfError as e:
            return pending.fail(e)
        try:
            if pending.request.op not in LARGE_REPLY_OPS or not uid:
                return await self._finish(conn, pending)
            lock = self._large.setdefault(uid, trio.Lock())
            try:
                async with lock:
                    refusal = self._reply_refusal(uid)
                    if refusal is None:
                        return await self._finish(conn, pending)
                    return pending.fail(refusal)
            finally:
                if not lock.locked() and not lock.statistics().tasks_waiting:
                    self._large.pop(uid, None)
        finally:
            pending.release()  # cancelled while waiting for the lock, say (daemon shutdown)
            self.limits.parked.uncharge(uid)

    async def _finish(self, conn: Connection, pending: Pending) -> Outcome:
        """Run an async handler; a peer that hangs up meanwhile cancels it (a trace_read
        may wait forever: its connection must not outlive the client)."""
        if pending.request.op in BOUNDED_OPS:
            return await pending.run()
        outcome = pending.hung_up()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._cancel_on_hangup, conn.sock, nursery.cancel_scope)
                outcome = await pending.run()
                nursery.cancel_scope.cancel()
        except Exception as e:
            return pending.fail(e)
        return outcome

    @staticmethod
    async def _cancel_on_hangup(sock: socket.socket, scope: trio.CancelScope) -> None:
        await trio.lowlevel.wait_readable(sock)
        try:
            hung_up = not sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            hung_up = True
        if hung_up:
            scope.cancel()

    def _malformed(self, conn: Connection, e: protocol.ProtocolError) -> None:
        self.malformed.warn(f"uid {conn.peer.uid}", "dropping connection from pid %d"
                            " (uid %d): %s", conn.peer.pid, conn.peer.uid, e)
