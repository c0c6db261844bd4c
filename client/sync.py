"""The synchronous client: one connection to bpffsd, driving the operations of calls.py.

A Client is not shared between processes (after fork the child gets its own connection:
replies must never be read on a socket another process may also read) nor used by two threads
at once (each thread gets its own through `default_client()`).
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import threading
from collections import deque
from collections.abc import Callable
from time import perf_counter_ns
from typing import Any

from bpffs.vm.errors import BpfError

from . import calls, paths, protocol

# A map operation's reply comes back within tens of microseconds: poll for it up to this long
# before sleeping in recvmsg, as long as replies keep coming that fast. Waking a blocked
# process costs ~8 us of the round trip on the 2-core VM this was measured on (25-35 us
# instead of 37-54 us a lookup, at the price of a busy CPU while waiting).
REPLY_SPIN_NS = 100_000
# Spinning pays only while replies come back that fast, which needs two idle cores. When
# another process keeps one busy, client and daemon share the other and a spinning client only
# delays the daemon (measured at load 2.5: p50 ~90 us spinning, 65-80 us not, and twice the
# CPU). So a client keeps the running average of its spinning round trips, and when it exceeds
# SPIN_WORTH_NS (uncontended: ~20-25 us) waits in recvmsg for the next SPIN_BACKOFF calls.
SPIN_WORTH_NS = 40_000
SPIN_BACKOFF = 64


def error_from_reply(reply: list) -> BpfError:
    err, message, *detail = reply
    e = BpfError(err, message)
    e.detail = detail[0] if detail else None  # type: ignore[attr-defined]
    return e


def connect_socket(path: str | None = None) -> socket.socket:
    path = path or paths.default_socket()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise BpfError(e.errno or errno.ECONNREFUSED,
                       f"cannot reach bpffsd at {path}: {e.strerror} (is the daemon running?"
                       " start it with `bpffsd`, or set BPFFS_SOCKET)") from None
    return sock


def hello_request() -> calls.Request:
    return calls.Request("hello", (protocol.PROTOCOL_VERSION, f"bpffs-client/{os.getpid()}"))


class Client:
    def __init__(self, path: str | None = None):
        self.path = path or paths.default_socket()
        self.sock = connect_socket(self.path)
        self.session = calls.Session()
        self.inbox = protocol.Inbox()
        self._rtt_avg = 0  # running average of spinning round trips (ns), see SPIN_WORTH_NS
        self._spin_pause = 0  # calls left before spinning again
        self._owed: deque[list] = deque()  # replies due to started calls, oldest first
        self.pid = os.getpid()
        self.daemon_info = self._roundtrip(hello_request())[0]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _roundtrip(self, request: calls.Request) -> tuple[Any, list[int]]:
        self._catch_up()
        sent = perf_counter_ns()
        self._send(request)
        if self._spin_pause:
            self._spin_pause -= 1
            return self._receive()
        try:
            return self._receive(REPLY_SPIN_NS)
        finally:
            self._rtt_avg += (perf_counter_ns() - sent - self._rtt_avg) >> 3
            if self._rtt_avg > SPIN_WORTH_NS:
                self._spin_pause, self._rtt_avg = SPIN_BACKOFF, 0

    def _send(self, request: calls.Request) -> None:
        protocol.send_message(self.sock, protocol.pack([request.op, *request.args]),
                              request.fds)

    def _receive(self, spin_ns: int = 0) -> tuple[Any, list[int]]:
        data, fds = protocol.recv_message(self.sock, self.inbox, spin_ns)
        if not data:
            raise BpfError(errno.ECONNRESET, "bpffsd closed the connection")
        reply = protocol.unpack(data)
        if reply[0]:
            protocol.close_all(fds)
            raise error_from_reply(reply)
        return reply[1], fds

    def start(self, call: calls.Call) -> Callable[[], Any]:
        """Send a one-request call now; returns the function that waits for its reply and
        returns its result. Several calls may be in flight at once (pipelining: the daemon
        serves a connection's requests in order, so a long run of requests keeps it busy
        while this side prepares the next). Results may be collected in any order, or never:
        replies are read in the order they come, and kept for their call until it asks
        (a caller that gave up on a call, after an error, leaves the connection in step).
        The call's fds must be bound already: a call that needs a second request (such as
        a bind first) fails with EINVAL."""
        try:
            request = next(call)
        except StopIteration as done:
            value = done.value
            return lambda: value
        self._send(request)
        slot: list = []  # filled with ("reply", reply) or ("error", BpfError)
        self._owed.append(slot)

        def result() -> Any:
            while not slot:
                self._read_owed()
            kind, outcome = slot
            try:
                if kind == "error":
                    call.throw(outcome)  # the call may add detail, or re-raise
                else:
                    call.send(outcome)
            except StopIteration as done:
                return done.value
            call.close()
            raise BpfError(errno.EINVAL, "a pipelined call made a second request")

        return result

    def _read_owed(self) -> None:
        """Read the oldest reply due to a started call and keep it in its slot."""
        try:
            outcome = ("reply", self._receive())
        except BpfError as e:
            if e.errno == errno.ECONNRESET:
                raise
            outcome = ("error", e)
        self._owed.popleft().extend(outcome)

    def _catch_up(self) -> None:
        """Before a request of its own: read every reply still due to started calls."""
        while self._owed:
            self._read_owed()

    def run(self, call: calls.Call) -> Any:
        try:
            request = next(call)
            while True:
                try:
                    reply = self._roundtrip(request)
                except BpfError as e:
                    request = call.throw(e)  # the call may add detail (batch counts)
                else:
                    request = call.send(reply)
        except StopIteration as done:
            return done.value

    def __getattr__(self, name: str) -> Any:
        """client.map_lookup_elem(fd, key) etc.: every operation of calls.OPERATIONS."""
        operation = calls.OPERATIONS.get(name)
        if operation is None:
            raise AttributeError(name)

        @functools.wraps(operation)
        def method(*args: Any, **kwargs: Any) -> Any:
            return self.run(operation(self.session, *args, **kwargs))

        setattr(self, name, method)
        return method


_local = threading.local()


def default_client() -> Client:
    """This thread's connection (to $BPFFS_SOCKET or the default socket), made on first use,
    and made again in a forked child or when BPFFS_SOCKET changed."""
    client = getattr(_local, "client", None)
    if client is None or client.pid != os.getpid() or client.path != paths.default_socket():
        if client is not None and client.pid == os.getpid():
            client.close()
        client = _local.client = Client()
    return client
