"""The synchronous client: one connection to bpffsd, driving the operations of calls.py.

A Client is not shared between processes (after fork the child gets its own connection:
replies must never be read on a socket another process may also read) nor used by two threads
at once (each thread gets its own through `default_client()`).
"""

from __future__ import annotations

import array
import errno
import functools
import os
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Sequence
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

from bpffs import paths, protocol
from bpffs.vm.errors import BpfError

from . import calls
from .direct import Contended, Direct

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


DEFAULT_TIMEOUT = 30.0
# Operations whose reply waits for an event (trace_printk output), not for the daemon's work:
# no timeout applies to them.
WAITING_OPS = frozenset({"trace_read"})


# The BpfError a daemon's error reply stands for, of the subclass its detail names
# (VerifierError with the log, BatchError with the count, ...).
error_from_reply = protocol.error_from_reply


def timed_out(timeout: float | None, what: str = "answer") -> BpfError:
    """The error of a daemon that did not answer in time (stopped, or stuck)."""
    return BpfError(errno.ETIMEDOUT, f"bpffsd did not {what} within {timeout:g} s (is it"
                    " stopped or overloaded?); the connection is closed: make a new client,"
                    " or pass a longer timeout (None waits forever)")


def connect_socket(path: str | None = None, timeout: float | None = None) -> socket.socket:
    """A connected control socket: to `path`, or the first of paths.client_sockets() that
    answers. Raises BpfError naming every socket tried when none does."""
    return connect(path, timeout)[0]


def check_timeout(timeout: float | None) -> float | None:
    """A timeout in seconds (> 0), or None for none."""
    if timeout is not None and not (isinstance(timeout, int | float) and timeout > 0):
        raise ValueError(f"timeout must be a number of seconds > 0, or None for no timeout;"
                         f" got {timeout!r}")
    return timeout


def connect(path: str | None = None, timeout: float | None = None
            ) -> tuple[socket.socket, str]:
    """connect_socket, and the path it connected to."""
    check_timeout(timeout)
    tried = [path] if path else paths.client_sockets()
    failure: OSError | None = None
    for candidate in tried:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            # A blocking connect waits for room in a full listen backlog (a busy daemon) for
            # SO_SNDTIMEO, then fails with EAGAIN; a Python-level timeout would make it
            # non-blocking, and a non-blocking unix connect fails with EAGAIN at once.
            set_recv_timeout(sock, timeout)
            sock.connect(candidate)
            return sock, candidate
        except OSError as e:
            sock.close()
            error = TimeoutError() if e.errno == errno.EAGAIN else e  # SO_SNDTIMEO ran out
            if failure is None or (failure.errno == errno.ENOENT and
                                   error.errno != errno.ENOENT):
                failure, path = error, candidate  # report the most telling failure
    assert failure is not None
    if isinstance(failure, TimeoutError) and failure.errno is None:
        raise timed_out(timeout, f"accept a connection at {path}") from None
    others = [t for t in tried if t != path]
    also = f" (also tried {', '.join(others)})" if others else ""
    raise BpfError(failure.errno or errno.ECONNREFUSED,
                   f"cannot reach bpffsd at {path}: {failure.strerror}{also} (is the daemon"
                   " running? start it with `bpffsd`, or set BPFFS_SOCKET)") from None


def set_recv_timeout(sock: socket.socket, timeout: float | None) -> None:
    """SO_RCVTIMEO/SO_SNDTIMEO on a blocking socket: a blocked recvmsg/send gives up with
    EAGAIN after `timeout` s (0 or None: never). Kept at the kernel level so that the
    non-blocking polls of Inbox.recvmsg keep working (a Python-level timeout would make every
    MSG_DONTWAIT poll wait)."""
    seconds = 0.0 if timeout is None else max(float(timeout), 1e-6)
    value = struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def reply_result(payload: bytes, fds: list[int]) -> tuple[Any, list[int]]:
    """A reply's result and the fds that came with it; an error reply is raised (its fds
    closed), and so is the end of the connection (an empty payload)."""
    if not payload:
        raise BpfError(errno.ECONNRESET, "bpffsd closed the connection")
    reply = protocol.unpack(payload)
    if reply[0]:
        protocol.close_all(fds)
        raise error_from_reply(reply)
    return reply[1], fds


def hello_request() -> calls.Request:
    """The first request of every connection: the protocol version and who is calling."""
    return calls.Request("hello", (protocol.PROTOCOL_VERSION, f"bpffs-client/{os.getpid()}"))


class Client:
    """A synchronous connection to bpffsd. Every operation of bpffs.client.calls is a method
    (`client.map_lookup_elem(fd, key)`, `client.prog_load(...)`), with libbpf's names.

    path: the control socket (default: $BPFFS_SOCKET, else your own daemon's socket when it
    exists, else the system daemon's /run/bpffsd/control.sock). timeout: seconds to wait for
    each reply (default 30; None waits forever). A daemon that does not answer in time (for
    instance stopped with SIGSTOP) raises BpfError(ETIMEDOUT) and closes the connection,
    because a late reply would be taken for the next request's. trace_read waits for trace
    output and has no timeout.
    """

    def __init__(self, path: str | None = None, timeout: float | None = DEFAULT_TIMEOUT):
        self.requested_path = path
        self.env_socket = os.environ.get("BPFFS_SOCKET")
        self.timeout = check_timeout(timeout)
        self.sock, self.path = connect(path, timeout)
        self._untimed = False  # a WAITING_OPS request has lifted the timeout
        set_recv_timeout(self.sock, timeout)
        self.session = calls.Session()
        self.inbox = protocol.Inbox()
        self._rtt_avg = 0  # running average of spinning round trips (ns), see SPIN_WORTH_NS
        self._spin_pause = 0  # calls left before spinning again
        self._owed: deque[list] = deque()  # replies due to started calls, oldest first
        self.pid = os.getpid()
        self.daemon_info = self._roundtrip(hello_request())[0]

    @property
    def closed(self) -> bool:
        """True after close() or a timeout: the connection can serve no more requests."""
        return self.sock.fileno() < 0

    def close(self) -> None:
        """Close the connection (object fds received through it stay valid), and let go of
        the maps' memory mapped for reads in place."""
        for handle in list(self.session.mapped):
            calls.forget_mapping(self.session, handle)
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __dir__(self) -> list[str]:
        """The operations too, so that completion shows them."""
        return sorted({*super().__dir__(), *calls.OPERATIONS})

    if TYPE_CHECKING:  # the operations __getattr__ makes, for type checkers and IDEs
        def map_create(self, map_type: int, key_size: int, value_size: int, max_entries: int,
                map_flags: int = 0, name: str = "") -> int: ...
        def map_update_elem(self, fd: int, key: bytes, value: bytes, flags: int = 0) -> None: ...
        def map_delete_elem(self, fd: int, key: bytes) -> None: ...
        def map_get_next_key(self, fd: int, key: bytes | None = None) -> bytes: ...
        def map_direct(self, fd: int) -> Direct | str: ...
        def map_memory(self, fd: int, writable: bool = False) -> Direct: ...
        def map_lookup_batch(self, fd: int, count: int, cursor: bytes | None = None,
                delete: bool = False) -> tuple[list[bytes], list[bytes], bytes | None]: ...
        def map_update_batch(self, fd: int, keys: Sequence[bytes], values: Sequence[bytes],
                flags: int = 0, chunk: int = 8192) -> int: ...
        def map_delete_batch(self, fd: int, keys: Sequence[bytes]) -> int: ...
        def prog_load(self, prog_type: int, insns: bytes, license: str = "GPL",
                kern_version: int = 0, name: str = "", log_level: int = 0,
                log_size: int = 1 << 20) -> calls.ProgFd: ...
        def prog_test_run(self, fd: int, data_in: bytes = b"", repeat: int = 1,
                ctx_in: bytes | None = None, data_size_out: int = 0,
                **options: Any) -> calls.TestRun: ...
        def prog_test_run_batch(self, fd: int, packets: Sequence[bytes], chunk: int = 4096,
                **options: Any) -> calls.BatchRun: ...
        def prog_test_run_buffer(self, fd: int, packets_fd: int, offsets: array.array,
                lengths: array.array, **options: Any) -> calls.BufferRun: ...
        def obj_pin(self, fd: int, path: str | bytes) -> None: ...
        def obj_get(self, path: str | bytes, file_flags: int = 0) -> int: ...
        def obj_get_info_by_fd(self, fd: int) -> dict: ...
        def prog_xlated(self, fd: int) -> Any: ...
        def get_next_id(self, kind: str, start: int = 0) -> int: ...
        def get_fd_by_id(self, kind: str, obj_id: int) -> int: ...
        def perf_event_open(self, cpu: int = 0) -> int: ...
        def trace_read(self, after: int = 0) -> list: ...
        def mount(self, mountpoint: str | bytes, instance: str | None = None,
                target_pid: int | None = None, allow_other: bool = False) -> Any: ...
        def status(self) -> dict: ...

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

    def _check_open(self) -> None:
        if self.closed:
            raise BpfError(errno.ENOTCONN, "this client's connection to bpffsd is closed"
                           " (after close() or a timeout): make a new client")

    def _send(self, request: calls.Request) -> None:
        self._check_open()
        try:
            protocol.send_message(self.sock, protocol.pack([request.op, *request.args]),
                                  request.fds)
        except BlockingIOError:
            self.close()
            raise timed_out(self.timeout, "take a request") from None
        if request.op in WAITING_OPS and self.timeout is not None:
            set_recv_timeout(self.sock, None)
            self._untimed = True

    def _receive(self, spin_ns: int = 0) -> tuple[Any, list[int]]:
        self._check_open()
        try:
            data, fds = protocol.recv_message(self.sock, self.inbox, spin_ns)
        except BlockingIOError:
            self.close()
            raise timed_out(self.timeout) from None
        finally:
            if self._untimed and not self.closed:
                set_recv_timeout(self.sock, self.timeout)
                self._untimed = False
        return reply_result(data, fds)

    def start(self, call: calls.Call) -> Callable[[], Any]:
        """Send a one-request call now; returns the function that waits for its reply and
        returns its result. Several calls may be in flight at once (pipelining: the daemon
        serves a connection's requests in order, so a long run of requests keeps it busy
        while this side prepares the next). Results may be collected in any order, or never:
        replies are read in the order they come, and kept for their call until it asks
        (a caller that gave up on a call, after an error, leaves the connection in step).
        The call's fds must be bound already: a call that needs a second request (such as
        a bind first) fails with EINVAL."""
        self.session.direct = False  # replies may be owed: reads go in their order
        try:
            request = next(call)
        except StopIteration as done:
            value = done.value
            return lambda: value
        finally:
            self.session.direct = True
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

    @property
    def owes_replies(self) -> bool:
        """Calls started (pipelined) whose replies are not read yet: reads in place wait."""
        return bool(self._owed)

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

    def map_lookup_elem(self, fd: int, key: bytes) -> bytes:
        """BPF_MAP_LOOKUP_ELEM (calls.map_lookup_elem). A map this connection already reads
        in place is read here without driving the call: the lookup then costs about one
        fstat (the fd's identity) and the read."""
        if not self._owed and self.session.direct:
            try:
                info = self.session.bound.get(os.fstat(fd).st_ino)
            except (OSError, TypeError):
                info = None
            mapped = None if info is None else info.get("direct")
            if type(mapped) is Direct and type(key) is bytes:
                try:
                    value = mapped.lookup(key)
                except Contended:
                    value = NotImplemented
                if value is not None and value is not NotImplemented:
                    return value
        return self.run(calls.map_lookup_elem(self.session, fd, key))

    def run(self, call: calls.Call) -> Any:
        """Drive one operation of bpffs.client.calls (a generator of requests) to its
        result."""
        if self._owed:
            self._catch_up()  # before a read in place, the writes started before it
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
    """This thread's connection (to $BPFFS_SOCKET or the daemon paths.client_sockets()
    finds), made on first use, and made again in a forked child, when BPFFS_SOCKET changed or
    after a timeout closed it."""
    client = getattr(_local, "client", None)
    if (client is None or client.pid != os.getpid() or client.closed
            or client.env_socket != os.environ.get("BPFFS_SOCKET")):
        if client is not None and client.pid == os.getpid():
            client.close()
        client = _local.client = Client(timeout=DEFAULT_TIMEOUT)  # read now: patchable
    return client
