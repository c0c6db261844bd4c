"""The control protocol between clients (and mount workers) and bpffsd.

One SOCK_SEQPACKET message is one request or one reply, so a request and the fds it carries
(SCM_RIGHTS) always arrive together. Messages are msgpack arrays:

    request:  [op, arg, ...]                  op is a name from OPS
    reply:    [0, result]                     success
              [errno, message]                failure: the kernel's errno, a clear message
              [errno, message, {tag: datum}]  ... and the one datum its kind of error carries

A message too large for the socket buffer travels in a sealed memfd: the datagram is the single
byte LARGE_MESSAGE (0xc1, a byte msgpack never produces) and the memfd is its first fd.
The first request on a connection must be ["hello", PROTOCOL_VERSION, ...].
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from time import perf_counter_ns
from typing import Any

import msgpack

from bpffs.vm.errors import DETAILS, BpfError

PROTOCOL_VERSION = 1

# Largest datagram sent inline; bigger payloads go through a memfd. Below the default
# SO_SNDBUF (net.core.wmem_default, 212992) minus the skb overhead the kernel charges.
INLINE_MAX = 160 * 1024
# Largest payload accepted at all (a memfd message); keeps one client from exhausting memory.
MESSAGE_MAX = 256 * 1024 * 1024
# The daemon's bounds on a request, beyond MESSAGE_MAX (root) or the smaller per-user message
# limit (bpffsd --max-message-bytes): msgpack's own per-object limits, sized from what real
# requests carry (the biggest: map_update_batch's two packed bins, and prog_test_run_batch's
# packet list, one bytes object a packet), and, for a memfd message, a budget of objects
# (containers and their elements, in all): msgpack turns each byte of input into up to ~70
# bytes of Python objects (a list slot, an empty dict), so a budget, not the byte size, is
# what bounds the memory and time of unpacking. Anything beyond is a protocol violation: the
# connection is dropped.
REQUEST_ARRAY_MAX = 1 << 20  # packets in one prog_test_run_batch (the client sends 4096)
REQUEST_MAP_MAX = 1 << 16  # keys of a dict (options; a run's kernel_memory table)
REQUEST_DEPTH_MAX = 8  # nesting: [op, {option: [{...}]}] is 4 deep; repr() fails near 1000
REQUEST_STR_MAX = 1 << 16  # names, license, option values
REQUEST_OBJECTS_MAX = REQUEST_ARRAY_MAX + 4096  # containers and their elements, in all
# Non-root callers: 262144 objects cost at most ~20 MB and ~30 ms to unpack (measured: an
# array of empty dicts), and hold 64 of the client's 4096-packet batches.
REQUEST_OBJECTS_MAX_UNPRIVILEGED = 1 << 18
# Linux's SCM_MAX_FD: at most this many fds ride on one message.
FDS_MAX = 253
LARGE_MESSAGE = b"\xc1"
_TRUNCATED = int(socket.MSG_CTRUNC | socket.MSG_TRUNC)  # an int: IntFlag arithmetic is slow
_ANC_SPACE = socket.CMSG_SPACE(FDS_MAX * array.array("i").itemsize)

# Operations, each with the type of every argument, checked by the daemon before dispatch
# ("bytes?" may also be None; "u32"/"u64" are ints in the range of the kernel's field, as
# bpf_attr has no negative or wider sizes, flags or counts). Fds ride in SCM_RIGHTS, named in
# the arguments by position.
OPS: dict[str, tuple[str, ...]] = {
    "hello": ("int", "str"),
    "bind": (),  # one fd: an object fd; binds its handle on this connection
    "map_create": ("u32", "u32", "u32", "u32", "u32", "str"),
    "map_lookup": ("int", "bytes"),
    "map_update": ("int", "bytes", "bytes", "u64"),
    "map_update_fd": ("int", "bytes", "int", "u64"),  # fd arrays: the value is a bound handle
    "map_delete": ("int", "bytes"),
    "map_get_next_key": ("int", "bytes?"),
    "map_memory": ("int", "bool"),  # writable; the reply carries one fd: the map's memfd
    "map_lookup_batch": ("int", "bytes?", "u32", "bool"),  # cursor, count, and_delete
    "map_update_batch": ("int", "bytes", "bytes", "u64"),  # packed keys, packed values, flags
    "map_delete_batch": ("int", "bytes"),  # packed keys
    "prog_load": ("u32", "bytes", "str", "u32", "str", "u32", "u32", "dict"),
    "prog_test_run": ("int", "bytes", "bytes?", "u32", "u32", "dict"),
    "prog_test_run_batch": ("int", "list", "dict"),  # one run per packet (pcap replay)
    # The same for packets in a memfd (one fd): handle, offsets (u64), lengths (u32), options.
    "prog_test_run_buffer": ("int", "bytes", "bytes", "dict"),
    "obj_pin": ("int", "bytes", "u32"),  # handle, name, umask; one fd: the parent dir (O_PATH)
    "obj_get": ("u32",),  # one fd: the path (O_PATH); file_flags
    "obj_info": ("int",),
    "prog_xlated": ("int",),  # a program's instructions (map fds as loaded)
    "get_next_id": ("str", "u32"),  # kind, start id
    "get_fd_by_id": ("str", "u32"),
    "perf_event_open": ("int",),  # cpu
    "trace_read": ("int",),  # from sequence number
    "mount": ("bytes", "str?", "dict"),  # one fd: the target mount namespace
    "status": (),
}
# How many fds (SCM_RIGHTS) each operation takes, after a large message's memfd. Any more
# are closed on arrival: every fd a request carries is one the daemon holds meanwhile.
OP_FDS: dict[str, int] = {"bind": 1, "obj_pin": 1, "obj_get": 1, "mount": 1,
                          "prog_test_run_buffer": 1}

_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "str": (str,), "bytes": (bytes,), "bool": (bool,), "dict": (dict,),
    "list": (list,), "u32": (int,), "u64": (int,),
}
_LIMITS = {"u32": 1 << 32, "u64": 1 << 64}


class ProtocolError(Exception):
    """A malformed message: the peer is dropped (no reply can be trusted to reach it)."""


class RequestError(OSError):
    """A well-formed message that is no valid request (unknown op, wrong arguments): the
    caller's error, answered with its errno (EINVAL) like any other."""

    def __str__(self) -> str:
        return f"{errno.errorcode.get(self.errno, self.errno)}: {self.strerror}"


_packers = threading.local()


def pack(obj: Any) -> bytes:
    """msgpack with bin types, by one Packer per thread: packb makes a Packer per call, which
    costs more (~1.1 us) than packing a request."""
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(obj)


def unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    # TypeError: a map whose key is unhashable (an array or a map as key).
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as e:
        raise ProtocolError(f"malformed msgpack: {e}") from None


def unpack_request(data: bytes, max_bin: int = MESSAGE_MAX,
                   objects_max: int | None = REQUEST_OBJECTS_MAX) -> Any:
    """Decode a request within the bounds above; a violation is a ProtocolError. The object
    budget is counted only for large (memfd) messages: an inline one (INLINE_MAX) cannot hold
    enough to matter, and the request round trip stays as cheap as plain unpackb."""
    try:
        if objects_max is None or len(data) <= INLINE_MAX:
            msg = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True,
                                  max_bin_len=max_bin, max_str_len=REQUEST_STR_MAX,
                                  max_array_len=REQUEST_ARRAY_MAX,
                                  max_map_len=REQUEST_MAP_MAX, max_ext_len=0)
        else:
            left = [objects_max]

            def count(obj: Any) -> Any:
                left[0] -= 1 + len(obj)
                if left[0] < 0:
                    raise ValueError(f"more than {objects_max} objects in one request")
                return obj

            msg = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True,
                                  max_bin_len=max_bin, max_str_len=REQUEST_STR_MAX,
                                  max_array_len=REQUEST_ARRAY_MAX,
                                  max_map_len=REQUEST_MAP_MAX, max_ext_len=0,
                                  list_hook=count, object_hook=count)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as e:
        raise ProtocolError(f"malformed msgpack (or over its bounds): {e}") from None
    if type(msg) is list:  # a request: most hold no container at all
        for item in msg:
            if type(item) is list or type(item) is dict:
                if _too_deep(msg, REQUEST_DEPTH_MAX - 1):
                    raise ProtocolError(f"msgpack nested deeper than {REQUEST_DEPTH_MAX}")
                break
    elif type(msg) is dict and _too_deep(msg, REQUEST_DEPTH_MAX - 1):
        raise ProtocolError(f"msgpack nested deeper than {REQUEST_DEPTH_MAX}")
    return msg


def _too_deep(obj: list | dict, depth: int) -> bool:
    """Whether obj holds containers nested more than `depth` levels below it."""
    for item in obj.values() if type(obj) is dict else obj:
        if (type(item) is list or type(item) is dict) and (
                depth <= 0 or _too_deep(item, depth - 1)):
            return True
    return False


class Schema:
    """A table of operations: each one's argument types (as OPS) and how many fds it takes
    (as OP_FDS), compiled once to check decoded requests against."""

    def __init__(self, ops: Mapping[str, tuple[str, ...]], fds: Mapping[str, int] | None = None):
        self.ops = ops
        self.fds = fds or {}
        self._compiled = {op: tuple((_TYPES[kind.rstrip("?")], kind.endswith("?"), kind,
                                     _LIMITS.get(kind.rstrip("?"))) for kind in schema)
                          for op, schema in ops.items()}

    def check(self, msg: Any) -> tuple[str, list[Any]]:
        """Validate a decoded request; returns (op, args) or raises RequestError."""
        if type(msg) is not list or not msg or type(msg[0]) is not str:
            raise RequestError(errno.EINVAL, "a request is a msgpack array [op, args...]")
        op = msg[0]
        schema = self._compiled.get(op)
        if schema is None:
            raise RequestError(errno.EINVAL, f"unknown operation {op!r}")
        args = msg[1:]
        if len(args) != len(schema):
            raise RequestError(errno.EINVAL,
                               f"{op} takes {len(schema)} arguments, got {len(args)}")
        for i, arg in enumerate(args):
            types, optional, kind, limit = schema[i]
            if isinstance(arg, types):
                # bool is an int subclass: reject it where an int is meant.
                if type(arg) is bool and bool not in types:
                    raise RequestError(errno.EINVAL,
                                       f"{op}: argument {i + 1} must be {kind}, got bool")
                if limit is not None and not 0 <= arg < limit:
                    raise RequestError(errno.EINVAL,
                                       f"{op}: argument {i + 1} must be {kind}, got {arg}")
            elif not (optional and arg is None):
                raise RequestError(errno.EINVAL, f"{op}: argument {i + 1} must be {kind},"
                                   f" got {type(arg).__name__}")
        return op, args

    def keep_fds(self, op: str, fds: list[int]) -> list[int]:
        """The fds op takes, of those its request carried; the others are closed now (every
        fd a request carries is one the daemon holds while it waits)."""
        wanted = self.fds.get(op, 0)
        if len(fds) <= wanted:
            return fds
        close_all(fds[wanted:])
        return fds[:wanted]


REQUESTS = Schema(OPS, OP_FDS)


def check_request(msg: Any) -> tuple[str, list[Any]]:
    """Validate a decoded control request against OPS; returns (op, args) or raises
    RequestError."""
    return REQUESTS.check(msg)


def ok(result: Any = None) -> bytes:
    return pack([0, result])


def error(err: int, message: str, detail: dict[str, Any] | None = None) -> bytes:
    """An error reply; `detail` is a BpfError's detail(): its datum tagged by name ({"log":
    ...}), sent only when there is one."""
    return pack([err, message, detail] if detail else [err, message])


def error_from_reply(reply: list) -> BpfError:
    """The error an error reply stands for, of the class its detail's tag names
    (bpffs.vm.errors.DETAILS: VerifierError for "log", ...), else a plain BpfError."""
    err, message, *rest = reply
    if rest and isinstance(rest[0], dict) and len(rest[0]) == 1:
        ((tag, datum),) = rest[0].items()
        kind = DETAILS.get(tag)
        if kind is not None:
            return kind(err, message, datum)
    return BpfError(err, message)


# A large message's memfd is sealed whole: the reader takes it as it is.
MESSAGE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def make_memfd(payload: bytes | memoryview, seals: int = MESSAGE_SEALS,
               name: str = "bpffs-message") -> int:
    """A memfd holding `payload`, with `seals` added."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_memfd(fd: int, limit: int = MESSAGE_MAX) -> bytes:
    """Read a large message from a memfd the peer sent (at most `limit` bytes: more is a
    ProtocolError). Only memfds are accepted: reading any other fd (a FIFO, a file on a FUSE
    mount — possibly our own) could block the reader."""
    try:
        fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise ProtocolError("a large message must arrive in a memfd") from None
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise ProtocolError(f"message of {size} bytes exceeds {limit}")
        return os.pread(fd, size, 0)
    except OSError as e:
        raise ProtocolError(f"cannot read the large message's memfd: {e.strerror}") from None


def encode_fds(fds: list[int]) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []


def decode_fds(ancdata: list[tuple[int, int, bytes]], msg_flags: int) -> list[int]:
    """The fds of one received message. Truncated control data (MSG_CTRUNC) is an error after
    closing whatever did arrive."""
    if not ancdata and not msg_flags & _TRUNCATED:  # SEQPACKET sets MSG_EOR on every record
        return []
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    if msg_flags & _TRUNCATED:
        close_all(fds)
        raise ProtocolError("message or its fds were truncated")
    return list(fds)


def close_all(fds: Any) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def open_payload(data: bytes, fds: list[int], limit: int = MESSAGE_MAX
                 ) -> tuple[bytes, list[int]]:
    """Resolve a LARGE_MESSAGE datagram into its payload (at most `limit` bytes); returns
    (payload, remaining fds). When it cannot, every fd is closed before ProtocolError."""
    if data != LARGE_MESSAGE:
        return data, fds
    if not fds:
        raise ProtocolError("large message without its memfd")
    try:
        return read_memfd(fds[0], limit), fds[1:]
    except BaseException:
        close_all(fds[1:])
        raise
    finally:
        os.close(fds[0])


def open_message(data: bytes, ancdata: list, msg_flags: int, limit: int = MESSAGE_MAX
                 ) -> tuple[bytes, list[int]]:
    """A message as recvmsg returned it: (payload, fds), a memfd's payload read (at most
    `limit` bytes). b"" means the peer closed the connection."""
    return open_payload(data, decode_fds(ancdata, msg_flags), limit)


@contextmanager
def framed(payload: bytes, fds: Sequence[int] = ()) -> Iterator[tuple[list[bytes], list]]:
    """The arguments of the sendmsg that sends payload with fds: the payload itself, or, past
    INLINE_MAX, LARGE_MESSAGE with a memfd holding it, closed on leaving (the peer has its own
    copy once sent). Every sender sends through this, blocking or awaited:
    `with framed(payload, fds) as message: sock.sendmsg(*message)`."""
    if len(payload) <= INLINE_MAX:
        yield [payload], encode_fds(list(fds))
        return
    memfd = make_memfd(payload)
    try:
        yield [LARGE_MESSAGE], encode_fds([memfd, *fds])
    finally:
        os.close(memfd)


def send_message(sock: socket.socket, payload: bytes, fds: Sequence[int] = ()) -> None:
    """Send one message on a blocking socket (or raise BlockingIOError)."""
    if not fds and len(payload) <= INLINE_MAX:
        sock.send(payload)  # the common case, without sendmsg's argument building
        return
    with framed(payload, fds) as message:
        sock.sendmsg(*message)


class Inbox:
    """A receive buffer reused for every message. recvmsg(INLINE_MAX) allocates and frees a
    160 KiB bytes object per call, above malloc's mmap threshold: measured here at ~23 us a
    message, on each side of every round trip. Messages are copied out at once, so one Inbox
    may serve many sockets of one thread."""

    def __init__(self) -> None:
        self.buffers = [bytearray(INLINE_MAX)]
        self._view = memoryview(self.buffers[0])

    def recvmsg(self, sock: socket.socket, spin_ns: int = 0) -> tuple[bytes, list, int]:
        """One datagram as (data, ancdata, msg_flags); BlockingIOError as recvmsg. With
        spin_ns, poll for it that long before blocking (or raising, on a non-blocking
        socket): a reply or request due within microseconds costs less than a wake-up."""
        if spin_ns:
            deadline = perf_counter_ns() + spin_ns
            while True:
                try:
                    return self._received(*sock.recvmsg_into(self.buffers, *_POLL_ARGS))
                except BlockingIOError:
                    if perf_counter_ns() > deadline:
                        break
        return self._received(*sock.recvmsg_into(self.buffers, *_RECV_INTO_ARGS))

    async def recvmsg_async(self, sock: Any) -> tuple[bytes, list, int]:
        """recvmsg on a trio socket (the worker's and AsyncClient's connections)."""
        return self._received(*await sock.recvmsg_into(self.buffers, *_RECV_INTO_ARGS))

    def _received(self, nbytes: int, ancdata: list, msg_flags: int,
                 _address: Any = None) -> tuple[bytes, list, int]:
        """What recvmsg_into(self.buffers, ...) returned, as recvmsg would have."""
        return bytes(self._view[:nbytes]), ancdata, msg_flags


def recv_message(sock: socket.socket, inbox: Inbox, spin_ns: int = 0
                 ) -> tuple[bytes, list[int]]:
    """One message and its fds (blocking). b"" means the peer closed the connection."""
    return open_message(*inbox.recvmsg(sock, spin_ns))


RECV_ARGS = (INLINE_MAX, _ANC_SPACE, socket.MSG_CMSG_CLOEXEC)
_RECV_INTO_ARGS = (_ANC_SPACE, socket.MSG_CMSG_CLOEXEC)
_POLL_ARGS = (_ANC_SPACE, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
