"""The trio client: the same operations as the synchronous Client, awaited.

    async with await AsyncClient.connect() as client:
        fd = await client.map_create(MapType.HASH, 4, 8, 16)
        await client.map_update_elem(fd, key, value)
"""

from __future__ import annotations

import errno
import functools
import os
from typing import Any

import trio

from bpffs.vm.errors import BpfError

from . import calls, protocol
from .sync import connect_socket, error_from_reply, hello_request


class AsyncClient:
    def __init__(self, sock: trio.socket.SocketType):
        self.sock = sock
        self.session = calls.Session()
        self.inbox = protocol.Inbox()
        self._lock = trio.Lock()  # one request in flight: replies come back in order
        self.daemon_info: dict = {}

    @classmethod
    async def connect(cls, path: str | None = None) -> AsyncClient:
        client = cls(trio.socket.from_stdlib_socket(connect_socket(path)))
        client.daemon_info = (await client._roundtrip(hello_request()))[0]
        return client

    async def aclose(self) -> None:
        self.sock.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _roundtrip(self, request: calls.Request) -> tuple[Any, list[int]]:
        data, fds, memfd = protocol.frame(protocol.pack([request.op, *request.args]),
                                          list(request.fds))
        async with self._lock:
            try:
                await self.sock.sendmsg([data], protocol.encode_fds(fds))
            finally:
                if memfd is not None:
                    os.close(memfd)
            data, ancdata, flags = await self.inbox.recvmsg_async(self.sock)
        payload, fds = protocol.open_payload(data, protocol.decode_fds(ancdata, flags))
        if not payload:
            raise BpfError(errno.ECONNRESET, "bpffsd closed the connection")
        reply = protocol.unpack(payload)
        if reply[0]:
            protocol.close_all(fds)
            raise error_from_reply(reply)
        return reply[1], fds

    async def run(self, call: calls.Call) -> Any:
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
        operation = calls.OPERATIONS.get(name)
        if operation is None:
            raise AttributeError(name)

        @functools.wraps(operation)
        async def method(*args: Any, **kwargs: Any) -> Any:
            return await self.run(operation(self.session, *args, **kwargs))

        setattr(self, name, method)
        return method
