"""The trio client: the same operations as the synchronous Client, awaited.

    async with AsyncClient() as client:          # connects on entry (or on first use)
        fd = await client.map_create(MapType.HASH, 4, 8, 16)
        await client.map_update_elem(fd, key, value)

`client = await AsyncClient.connect()` connects at once and reports a missing daemon there.
"""

from __future__ import annotations

import array
import errno
import functools
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from bpffs import protocol
from bpffs.vm.errors import BpfError

from . import calls

if TYPE_CHECKING:
    from .direct import Direct
from .sync import (
    DEFAULT_TIMEOUT,
    WAITING_OPS,
    check_timeout,
    connect,
    hello_request,
    reply_result,
    timed_out,
)


class AsyncClient:
    """A trio connection to bpffsd; every operation of bpffs.client.calls is an async method
    (`await client.map_lookup_elem(fd, key)`).

    path and timeout as Client's: the socket found by paths.client_sockets() unless given,
    and at most `timeout` seconds (default 30, None: no limit) for each reply, after which
    BpfError(ETIMEDOUT) is raised and the connection closed. The connection is made by
    `async with AsyncClient(...)`, by `await AsyncClient.connect(...)`, or on first use.
    """

    def __init__(self, path: str | None = None, timeout: float | None = DEFAULT_TIMEOUT,
                 *, sock: trio.socket.SocketType | None = None):
        if path is not None and not isinstance(path, str | bytes | os.PathLike):
            raise TypeError(f"AsyncClient(path): expected the control socket's path, got"
                            f" {type(path).__name__} (to connect now, use `await"
                            " AsyncClient.connect(path)` or `async with AsyncClient(path)`)")
        self.path = os.fspath(path) if path is not None else None
        self.timeout = check_timeout(timeout)
        self.sock = sock
        self.session = calls.Session()
        self.inbox = protocol.Inbox()
        self._lock = trio.Lock()  # one request in flight: replies come back in order
        self._closed = False
        self.daemon_info: dict = {}

    @classmethod
    async def connect(cls, path: str | None = None,
                      timeout: float | None = DEFAULT_TIMEOUT) -> AsyncClient:
        """A connected client (raises BpfError at once when no daemon answers)."""
        client = cls(path, timeout)
        await client.open()
        return client

    async def open(self) -> None:
        """Connect and say hello, unless already connected (called by `async with` and by
        the first operation)."""
        if self.sock is not None:
            return
        if self._closed:
            raise _closed_error()
        sock, self.path = await trio.to_thread.run_sync(connect, self.path, self.timeout)
        self.sock = trio.socket.from_stdlib_socket(sock)
        self.daemon_info = (await self._roundtrip(hello_request()))[0]

    @property
    def closed(self) -> bool:
        """True after aclose() or a timeout."""
        return self._closed

    async def aclose(self) -> None:
        """Close the connection (object fds received through it stay valid)."""
        self._closed = True
        if self.sock is not None:
            self.sock.close()

    def _abandon(self) -> None:
        """Close after a request whose reply never came: a late reply would be read as the
        next request's."""
        self._closed = True
        if self.sock is not None:
            self.sock.close()

    async def __aenter__(self) -> AsyncClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __dir__(self) -> list[str]:
        """The operations too, so that completion shows them."""
        return sorted({*super().__dir__(), *calls.OPERATIONS})

    if TYPE_CHECKING:  # the operations __getattr__ makes, for type checkers and IDEs
        async def map_create(self, map_type: int, key_size: int, value_size: int, max_entries: int,
                  map_flags: int = 0, name: str = "") -> int: ...
        async def map_lookup_elem(self, fd: int, key: bytes) -> bytes: ...
        async def map_update_elem(self, fd: int, key: bytes, value: bytes,
                                  flags: int = 0) -> None: ...
        async def map_delete_elem(self, fd: int, key: bytes) -> None: ...
        async def map_get_next_key(self, fd: int, key: bytes | None = None) -> bytes: ...
        async def map_direct(self, fd: int) -> Direct | str: ...
        async def map_memory(self, fd: int, writable: bool = False) -> Direct: ...
        async def map_lookup_batch(self, fd: int, count: int, cursor: bytes | None = None,
                  delete: bool = False) -> tuple[list[bytes], list[bytes], bytes | None]: ...
        async def map_update_batch(self, fd: int, keys: Sequence[bytes], values: Sequence[bytes],
                  flags: int = 0, chunk: int = 8192) -> int: ...
        async def map_delete_batch(self, fd: int, keys: Sequence[bytes]) -> int: ...
        async def prog_load(self, prog_type: int, insns: bytes, license: str = "GPL",
                  kern_version: int = 0, name: str = "", log_level: int = 0,
                  log_size: int = 1 << 20) -> calls.ProgFd: ...
        async def prog_test_run(self, fd: int, data_in: bytes = b"", repeat: int = 1,
                  ctx_in: bytes | None = None, data_size_out: int = 0,
                **options: Any) -> calls.TestRun: ...
        async def prog_test_run_batch(self, fd: int, packets: Sequence[bytes],
                  chunk: int = 4096, **options: Any) -> calls.BatchRun: ...
        async def prog_test_run_buffer(self, fd: int, packets_fd: int, offsets: array.array,
                lengths: array.array, **options: Any) -> calls.BufferRun: ...
        async def obj_pin(self, fd: int, path: str | bytes) -> None: ...
        async def obj_get(self, path: str | bytes, file_flags: int = 0) -> int: ...
        async def obj_get_info_by_fd(self, fd: int) -> dict: ...
        async def prog_xlated(self, fd: int) -> Any: ...
        async def get_next_id(self, kind: str, start: int = 0) -> int: ...
        async def get_fd_by_id(self, kind: str, obj_id: int) -> int: ...
        async def perf_event_open(self, cpu: int = 0) -> int: ...
        async def trace_read(self, after: int = 0) -> list: ...
        async def mount(self, mountpoint: str | bytes, instance: str | None = None,
                  target_pid: int | None = None, allow_other: bool = False) -> Any: ...
        async def status(self) -> dict: ...

    async def _roundtrip(self, request: calls.Request) -> tuple[Any, list[int]]:
        if self.sock is None:
            await self.open()
        if self._closed or self.sock is None:
            raise _closed_error()
        limit = (math.inf if self.timeout is None or request.op in WAITING_OPS
                 else self.timeout)
        with protocol.framed(protocol.pack([request.op, *request.args]),
                             request.fds) as message:
            async with self._lock:
                try:
                    with trio.move_on_after(limit) as scope:
                        await self.sock.sendmsg(*message)
                        data, ancdata, flags = await self.inbox.recvmsg_async(self.sock)
                except BaseException:
                    self._abandon()  # cancelled from outside mid-request
                    raise
                if scope.cancelled_caught:
                    self._abandon()
                    raise timed_out(self.timeout)
        return reply_result(*protocol.open_message(data, ancdata, flags))

    async def run(self, call: calls.Call) -> Any:
        """Drive one operation of bpffs.client.calls (a generator of requests) to its
        result."""
        try:
            request = next(call)
            while True:
                try:
                    reply = await self._roundtrip(request)
                except BpfError as e:
                    request = call.throw(e)  # the call may add detail (batch counts)
                else:
                    request = call.send(reply)
        except StopIteration as done:
            return done.value

    def __getattr__(self, name: str) -> Any:
        """await client.map_lookup_elem(fd, key) etc.: every operation of calls.OPERATIONS."""
        operation = calls.OPERATIONS.get(name)
        if operation is None:
            raise AttributeError(name)

        @functools.wraps(operation)
        async def method(*args: Any, **kwargs: Any) -> Any:
            return await self.run(operation(self.session, *args, **kwargs))

        setattr(self, name, method)
        return method


def _closed_error() -> BpfError:
    return BpfError(errno.ENOTCONN, "this client's connection to bpffsd is closed (after"
                    " aclose() or a timeout): make a new client")
