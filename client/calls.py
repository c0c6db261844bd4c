"""Every client operation, written once, without I/O.

Each operation is a generator: it yields the requests it needs (a Request: op, args, fds to
send) and receives each reply as (result, received fds); its return value is the call's
result. The synchronous Client (sync.py) and the trio AsyncClient (aio.py) drive the same
generators over their own sockets, so the two APIs cannot drift apart.

Object fds are bound to a connection on first use: the fd is sent once, after which requests
name it by its socket inode (the "handle"). A Session remembers what it bound and what the
daemon said about each object (type, key and value sizes), keyed by inode so that a closed
and reused fd number is never mistaken for the old object.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import struct
from collections import OrderedDict
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from bpffs import protocol
from bpffs.vm.errors import BatchError, BpfError
from bpffs.vm.isa import LD_IMM64, SRC_SHIFT  # LD_IMM64: the only insn naming a map fd
from bpffs.vm.uapi import BPF_ANY, BPF_PSEUDO_MAP_FD, MapType

from . import direct
from .direct import Direct


class Request(NamedTuple):
    op: str
    args: tuple
    fds: tuple[int, ...] = ()


Call = Generator[Request, tuple[Any, list[int]], Any]

_FD_ARRAYS = (MapType.PROG_ARRAY, MapType.PERF_EVENT_ARRAY)
MAX_MAPPED = 64  # maps a session keeps mapped for reads in place (see _attach)
# Errors of the connection itself (a timeout, the daemon gone), not of one request.
_CONNECTION_ERRNOS = frozenset({errno.ETIMEDOUT, errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE})
_U32 = struct.Struct("<I")


@dataclass
class Session:
    """What one connection has bound: handle (inode) -> the daemon's description (with, for
    a map, its memory mapped here under "direct": see direct.py)."""

    bound: dict[int, dict] = field(default_factory=dict)
    # Reads may go to a map's memory: the driver clears this while replies to pipelined
    # calls are owed (a read must see the writes before it).
    direct: bool = True
    # handle -> info of the maps mapped here, oldest first (at most MAX_MAPPED)
    mapped: OrderedDict[int, dict] = field(default_factory=OrderedDict)


def bind(session: Session, fd: int) -> Generator[Request, Any, tuple[int, dict]]:
    """The handle of an object fd on this connection, binding it on first use."""
    try:
        ino = os.fstat(fd).st_ino
    except OSError as e:
        raise BpfError(errno.EBADF, f"fd {fd} is not open") from e
    info = session.bound.get(ino)
    if info is None:
        info, _ = yield Request("bind", (), (fd,))
        session.bound[ino] = info
    info["fd"] = fd  # the fd number it was last used by (forget_closed checks it)
    return ino, info


def _map_handle(session: Session, fd: int) -> Generator[Request, Any, tuple[int, dict]]:
    """bind() for the calls that need the map's shape (key and value sizes, fd arrays)."""
    handle, info = yield from bind(session, fd)
    if info.get("kind") != "map":
        raise BpfError(errno.EINVAL, f"fd {fd} is a {info.get('kind')}, not a map")
    return handle, info


def _received_fd(reply: tuple[Any, list[int]]) -> int:
    _, fds = reply
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise BpfError(errno.EPROTO, f"expected one fd from bpffsd, got {len(fds)}")
    return fds[0]


def _new_object(session: Session, reply: tuple[Any, list[int]]) -> int:
    fd = _received_fd(reply)
    info = reply[0]
    session.bound[info["handle"]] = info
    return fd


# -- maps ---------------------------------------------------------------------------------------
def map_create(session: Session, map_type: int, key_size: int, value_size: int,
               max_entries: int, map_flags: int = 0, name: str = "") -> Call:
    """BPF_MAP_CREATE: a new map's fd (the map lives while an fd, pin or program holds
    it)."""
    forget_closed(session)  # freed maps still mapped here stay charged: let go of them first
    reply = yield Request("map_create", (int(map_type), key_size, value_size, max_entries,
                                         map_flags, name))
    return _new_object(session, reply)


def map_direct(session: Session, fd: int) -> Call:
    """The map's memory mapped into this process for direct reads (a direct.Direct), or a
    string saying why its reads go through the socket."""
    _, info = yield from bind(session, fd)
    found = info.get("direct")
    if found is None:
        found = yield from _attach(session, info)
    return found


def map_memory(session: Session, fd: int, writable: bool = False) -> Call:
    """The map's memory mapped into this process (a new direct.Direct): read-only, or
    read-write for an array created BPF_F_MMAPABLE when the fd may write (EPERM if not,
    EINVAL for other maps), as the kernel's mmap of a map fd."""
    handle, info = yield from _map_handle(session, fd)
    result, fds = yield Request("map_memory", (handle, writable))
    return direct.Direct.attach(_received_fd((result, fds)), info, result)


def _attach(session: Session, info: dict) -> Generator[Request, Any, Direct | str]:
    """Map the memory for reads in place, or say why they go through the socket; remembered
    in info["direct"]. A session keeps at most MAX_MAPPED maps mapped (it cannot see an fd
    closed, and a process that reads many maps, the seccomp agent among them, would keep every
    one): past that, the least recently mapped is let go, and mapped again if read again."""
    reason = direct.why_not(info)
    if reason is not None:
        info["direct"] = reason
        return reason
    try:
        result, fds = yield Request("map_memory", (info["handle"], False))
        found = direct.Direct.attach(_received_fd((result, fds)), info, result)
    except (OSError, ValueError) as e:
        if isinstance(e, BpfError) and e.errno in _CONNECTION_ERRNOS:
            raise  # the connection failed, not the mapping
        info["direct"] = reason = f"the map's memory could not be mapped: {e}"
        return reason
    info["direct"] = found
    forget_closed(session)
    session.mapped[info["handle"]] = info
    while len(session.mapped) > MAX_MAPPED:
        _, oldest = session.mapped.popitem(last=False)
        del oldest["direct"]  # unmapped once nothing else (a Map) holds it
    return found


def forget_mapping(session: Session, handle: int) -> None:
    """Let go of a map's memory mapped here (Map.close does; the mapping goes once no view
    of it is left). Until a mapping goes, a freed map stays charged to its creator, as the
    kernel keeps a mapped map."""
    info = session.mapped.pop(handle, None)
    if info is not None:
        info.pop("direct", None)


def forget_closed(session: Session) -> None:
    """Let go of the mappings of maps whose fd here was closed (the fd number, seen at
    bind, no longer names that object)."""
    for handle, info in list(session.mapped.items()):
        try:
            same = os.fstat(info["fd"]).st_ino == handle
        except OSError:
            same = False
        if not same:
            forget_mapping(session, handle)


def _direct(session: Session, info: dict) -> Generator[Request, Any, Direct | None]:
    """The map's Direct when a read may use it now (attaching it on first use)."""
    if not session.direct:
        return None
    found = info.get("direct")
    if found is None:
        found = yield from _attach(session, info)
    return found if type(found) is Direct else None


def map_lookup_elem(session: Session, fd: int, key: bytes) -> Call:
    """BPF_MAP_LOOKUP_ELEM: the value's bytes; ENOENT when the key is absent. Read in place
    when the map's memory is mapped here (direct.py)."""
    handle, info = yield from bind(session, fd)
    mapped = yield from _direct(session, info)
    if mapped is not None:
        try:
            value = mapped.lookup(bytes(key))
        except direct.Contended:
            value = NotImplemented
        if value is None:
            raise BpfError(errno.ENOENT, f"key {bytes(key).hex()} not found in map id"
                           f" {info['id']}")
        if value is not NotImplemented:
            return value
    return (yield Request("map_lookup", (handle, bytes(key))))[0]


def map_update_elem(session: Session, fd: int, key: bytes, value: bytes,
                    flags: int = BPF_ANY) -> Call:
    """BPF_MAP_UPDATE_ELEM with BPF_ANY / BPF_NOEXIST / BPF_EXIST; a prog_array's or
    perf_event_array's value is the 4-byte fd of the object to store, as in the kernel."""
    handle, info = yield from _map_handle(session, fd)
    if info["type"] in _FD_ARRAYS:
        # As the kernel: a prog/perf-event array's value is the fd of the object to store.
        if len(value) != 4:
            raise BpfError(errno.EINVAL, f"{MapType(info['type']).name} values are 4-byte fds")
        try:
            member, _ = yield from bind(session, _U32.unpack(value)[0])
        except BpfError as e:
            if info["type"] != MapType.PERF_EVENT_ARRAY:
                raise
            # perf_event_get: any fd that is not a perf event is EBADF (bpf_prog_get: EINVAL)
            raise BpfError(errno.EBADF, str(e).split(": ", 1)[-1]) from None
        yield Request("map_update_fd", (handle, bytes(key), member, flags))
        return None
    yield Request("map_update", (handle, bytes(key), bytes(value), flags))
    return None


def map_delete_elem(session: Session, fd: int, key: bytes) -> Call:
    """BPF_MAP_DELETE_ELEM: ENOENT when absent, EINVAL on arrays."""
    handle, _ = yield from bind(session, fd)
    yield Request("map_delete", (handle, bytes(key)))


def map_get_next_key(session: Session, fd: int, key: bytes | None = None) -> Call:
    """BPF_MAP_GET_NEXT_KEY: the key after `key` (None: the first); ENOENT at the end."""
    handle, info = yield from bind(session, fd)
    mapped = yield from _direct(session, info)
    if mapped is not None and (key is None or len(key) == mapped.key_size):
        try:
            found = mapped.next_key(None if key is None else bytes(key))
        except direct.Contended:
            pass
        else:
            if found is None:
                after = "the start" if key is None else bytes(key).hex()
                raise BpfError(errno.ENOENT, f"no key after {after} in map id {info['id']}")
            return found
    return (yield Request("map_get_next_key", (handle, None if key is None else bytes(key))))[0]


def _unpack(packed: bytes, size: int) -> list[bytes]:
    return [packed[i:i + size] for i in range(0, len(packed), size)]


def map_lookup_batch(session: Session, fd: int, count: int, cursor: bytes | None = None,
                     delete: bool = False) -> Call:
    """Walk the map: up to count (keys, values) after cursor, and the next cursor (None at
    the end), as BPF_MAP_LOOKUP_BATCH (and _AND_DELETE_BATCH with delete=True)."""
    handle, info = yield from _map_handle(session, fd)
    mapped = None if delete or count <= 0 else (yield from _direct(session, info))
    if mapped is not None and (cursor is None or len(cursor) == mapped.key_size):
        try:
            return mapped.batch(None if cursor is None else bytes(cursor), count)
        except direct.Contended:
            pass
    (keys, values, nxt), _ = yield Request("map_lookup_batch", (handle, cursor, count, delete))
    return _unpack(keys, info["key_size"]), _unpack(values, info["value_size"]), nxt


def map_update_batch(session: Session, fd: int, keys: Sequence[bytes],
                     values: Sequence[bytes], flags: int = BPF_ANY,
                     chunk: int = 8192) -> Call:
    """BPF_MAP_UPDATE_BATCH: returns the count updated. On failure a BatchError's `count`
    says how many elements were updated before the failing one."""
    handle, info = yield from _map_handle(session, fd)
    if len(keys) != len(values):
        raise BpfError(errno.EINVAL, f"{len(keys)} keys but {len(values)} values")
    per_request = max(1, min(chunk, (1 << 20) // (info["key_size"] + info["value_size"])))
    done = 0
    for start in range(0, len(keys), per_request):
        stop = start + per_request
        try:
            done += (yield Request("map_update_batch", (
                handle, b"".join(keys[start:stop]), b"".join(values[start:stop]), flags)))[0]
        except BpfError as e:
            raise _batch_error(e, done) from None
    return done


def map_delete_batch(session: Session, fd: int, keys: Sequence[bytes]) -> Call:
    """BPF_MAP_DELETE_BATCH: returns the count deleted; on failure a BatchError's `count`
    says how many were deleted before it."""
    handle, _ = yield from bind(session, fd)
    try:
        return (yield Request("map_delete_batch", (handle, b"".join(keys))))[0]
    except BpfError as e:
        raise _batch_error(e, 0) from None


def _batch_error(e: BpfError, before: int) -> BatchError:
    """A batch call's error, counting what took effect: `before` elements in the requests
    before the failing one, and the daemon's count of that one (none when the error is made
    on this side, such as a lost connection)."""
    return BatchError(e.errno, e.strerror, before + (e.count if isinstance(e, BatchError) else 0))


# -- programs -----------------------------------------------------------------------------------
def map_fds_in(insns: bytes) -> list[int]:
    """The map fds a program names (LD_IMM64 with src_reg BPF_PSEUDO_MAP_FD)."""
    fds = []
    for off in range(0, len(insns) - 15, 8):
        if insns[off] == LD_IMM64 and insns[off + 1] >> SRC_SHIFT == BPF_PSEUDO_MAP_FD:
            fds.append(struct.unpack_from("<i", insns, off + 4)[0])
    return fds


class ProgFd(int):
    """A program fd, carrying the verifier log when one was asked for."""

    log: str = ""


def prog_load(session: Session, prog_type: int, insns: bytes, license: str = "GPL",
              kern_version: int = 0, name: str = "", log_level: int = 0,
              log_size: int = 1 << 20) -> Call:
    """BPF_PROG_LOAD: the program fd (a ProgFd: `.log` holds the verifier log when
    log_level > 0; a refusal then is a VerifierError, its `.log` the log up to the refusal).
    Map fds named by the instructions are bound on the way."""
    map_fds = {}
    for fd in set(map_fds_in(insns)):
        try:
            map_fds[fd], _ = yield from bind(session, fd)
        except BpfError:
            pass  # left out: the daemon reports the instruction naming a bad fd
    reply = yield Request("prog_load", (int(prog_type), bytes(insns), license, kern_version, name,
                                        log_level, log_size, map_fds))
    fd = ProgFd(_new_object(session, reply))
    fd.log = reply[0].get("log", "")
    return fd


@dataclass
class TestRun:
    """BPF_PROG_TEST_RUN's results plus the side effects the VM records."""

    retval: int
    data_out: bytes
    duration: int  # average ns per run, as the kernel reports it
    ctx_out: bytes = b""
    effects: dict = field(default_factory=dict)


def prog_test_run(session: Session, fd: int, data_in: bytes = b"", repeat: int = 1,
                  ctx_in: bytes | None = None, data_size_out: int = 0,
                  **options: Any) -> Call:
    """options: the emulated kernel state of the run (see bpffs.vm.RunEnv), and tier."""
    handle, _ = yield from bind(session, fd)
    out, _ = yield Request("prog_test_run", (handle, bytes(data_in), ctx_in, repeat,
                                             data_size_out, options))
    return TestRun(out.pop("retval"), out.pop("data_out"), out.pop("duration"),
                   out.pop("ctx_out", b""), out)


@dataclass
class BatchRun:
    """Results of prog_test_run_batch, by packet index: every retval; data_out, effects and
    errors only for the packets that have them."""

    retvals: list[int] = field(default_factory=list)
    outputs: dict[int, bytes] = field(default_factory=dict)
    effects: dict[int, dict] = field(default_factory=dict)
    errors: dict[int, tuple[int, str]] = field(default_factory=dict)


def prog_test_run_batch(session: Session, fd: int, packets: Sequence[bytes],
                        chunk: int = 4096, **options: Any) -> Call:
    """One test run per packet, `chunk` packets per request (pcap replay). options as
    prog_test_run's (the run environment, tier)."""
    handle, _ = yield from bind(session, fd)
    batch = BatchRun()
    for start in range(0, len(packets), chunk):
        (retvals, outputs, effects, errors), _ = yield Request("prog_test_run_batch", (
            handle, [bytes(p) for p in packets[start:start + chunk]], options))
        batch.retvals.extend(retvals)
        batch.outputs.update((start + i, v) for i, v in outputs.items())
        batch.effects.update((start + i, v) for i, v in effects.items())
        batch.errors.update((start + i, tuple(v)) for i, v in errors.items())
    return batch


@dataclass
class BufferRun:
    """Results of prog_test_run_buffer, all by packet index: columns of every packet's
    retval, skb->tc_classid and bpf_redirect record (vm.run.redirect_effect reads one; 0 for
    none), and data_out, the other effects and errors for the packets that have them."""

    retvals: array.array
    classids: array.array
    redirects: array.array
    outputs: dict[int, bytes]
    effects: dict[int, dict]
    errors: dict[int, tuple[int, str]]


def prog_test_run_buffer(session: Session, fd: int, packets_fd: int, offsets: array.array,
                         lengths: array.array, **options: Any) -> Call:
    """One test run per packet, the packets in the memfd `packets_fd` (sealed against
    shrinking: packets_memfd makes one) at `offsets` (array "Q") with `lengths` ("I"), all in
    one request. options as prog_test_run's."""
    handle, _ = yield from bind(session, fd)
    (retvals, classids, redirects, outputs, effects, errors), _ = yield Request(
        "prog_test_run_buffer", (handle, offsets.tobytes(), lengths.tobytes(), options),
        (packets_fd,))
    return BufferRun(array.array("I", retvals), array.array("I", classids),
                     array.array("Q", redirects), outputs, effects,
                     {i: tuple(v) for i, v in errors.items()})


def packets_memfd(data: bytes | memoryview = b"") -> int:
    """A memfd holding `data`, sealed against shrinking (what prog_test_run_buffer takes); it
    may grow and be written again, for the next packets."""
    return protocol.make_memfd(data, fcntl.F_SEAL_SHRINK, "bpffs-packets")


# -- pins and ids -------------------------------------------------------------------------------
def _umask() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _open_path(path: str | bytes, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise BpfError(e.errno, f"{os.fsdecode(path)}: {e.strerror}") from None


def _open_parent(path: str | bytes) -> tuple[int, bytes]:
    """The parent directory (O_PATH fd) and last name of a path to create, with the kernel's
    rules (filename_create): '' is ENOENT; a last '.' or '..', or an existing name followed by
    '/', is EEXIST; a missing one followed by '/' is ENOENT (only directories end in '/')."""
    raw = os.fsencode(path)
    if not raw:
        raise BpfError(errno.ENOENT, "empty pin path")
    parent, name = os.path.split(raw.rstrip(b"/") or b"/")
    dirfd = _open_path(parent or b".", os.O_DIRECTORY)
    try:
        if name in (b"", b".", b".."):
            raise BpfError(errno.EEXIST, f"{os.fsdecode(path)}: names an existing directory")
        if raw.endswith(b"/"):
            exists = os.path.lexists(f"/proc/self/fd/{dirfd}/{os.fsdecode(name)}")
            raise BpfError(errno.EEXIST if exists else errno.ENOENT,
                           f"{os.fsdecode(path)}: a pin path cannot end in '/'")
    except BaseException:
        os.close(dirfd)
        raise
    return dirfd, name


def obj_pin(session: Session, fd: int, path: str | bytes) -> Call:
    """BPF_OBJ_PIN: the kernel resolves the parent directory (we send it as an O_PATH fd)."""
    handle, _ = yield from bind(session, fd)
    dirfd, name = _open_parent(path)
    try:
        yield Request("obj_pin", (handle, name, _umask()), (dirfd,))
    finally:
        os.close(dirfd)


def obj_get(session: Session, path: str | bytes, file_flags: int = 0) -> Call:
    """BPF_OBJ_GET: a new fd on the object pinned at path (symlinks followed)."""
    pfd = _open_path(path, 0)
    try:
        reply = yield Request("obj_get", (file_flags,), (pfd,))
    finally:
        os.close(pfd)
    return _new_object(session, reply)


def obj_get_info_by_fd(session: Session, fd: int) -> Call:
    """BPF_OBJ_GET_INFO_BY_FD: the object's description, with bpftool's field names."""
    handle, _ = yield from bind(session, fd)
    return (yield Request("obj_info", (handle,)))[0]


def prog_xlated(session: Session, fd: int) -> Call:
    """The program's instructions, as bpftool's `prog dump xlated` shows them."""
    handle, _ = yield from bind(session, fd)
    return (yield Request("prog_xlated", (handle,)))[0]


def get_next_id(session: Session, kind: str, start: int = 0) -> Call:
    """BPF_{MAP,PROG}_GET_NEXT_ID: the next id of that kind ('map', 'prog') after start;
    ENOENT at the end."""
    return (yield Request("get_next_id", (kind, start)))[0]


def get_fd_by_id(session: Session, kind: str, obj_id: int) -> Call:
    """BPF_{MAP,PROG}_GET_FD_BY_ID: a new fd on the object with that id."""
    return _new_object(session, (yield Request("get_fd_by_id", (kind, obj_id))))


def perf_event_open(session: Session, cpu: int = 0) -> Call:
    """A perf event fd: store it in a PERF_EVENT_ARRAY; each sample a program outputs through
    it arrives as one message on the fd (read with os.read / recv)."""
    return _new_object(session, (yield Request("perf_event_open", (cpu,))))


def trace_read(session: Session, after: int = 0) -> Call:
    """trace_printk lines after sequence number `after` (waits for at least one)."""
    return (yield Request("trace_read", (after,)))[0]


def mount(session: Session, mountpoint: str | bytes, instance: str | None = None,
          target_pid: int | None = None, allow_other: bool = False) -> Call:
    """Mount a bpffs instance at mountpoint, in this process's mount namespace or
    target_pid's (`bpffs mount`); a named instance persists across restarts."""
    ns = f"/proc/{target_pid}/ns/mnt" if target_pid else "/proc/self/ns/mnt"
    try:
        ns_fd = os.open(ns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise BpfError(e.errno, f"{ns}: {e.strerror}") from None
    try:
        point = os.fsencode(mountpoint)
        if not target_pid:
            point = os.fsencode(os.path.abspath(point))
        return (yield Request("mount", (point, instance, {"allow_other": allow_other}),
                              (ns_fd,)))[0]
    finally:
        os.close(ns_fd)


def status(session: Session) -> Call:
    """The daemon's state: pid, socket, objects, memory, connections, instances and their
    mounts, persistence (`bpffs status`)."""
    return (yield Request("status", ()))[0]


OPERATIONS: dict[str, Any] = {fn.__name__: fn for fn in (
    map_create, map_direct, map_memory, map_lookup_elem, map_update_elem, map_delete_elem,
    map_get_next_key, map_lookup_batch, map_update_batch, map_delete_batch, prog_load,
    prog_test_run, prog_test_run_batch, prog_test_run_buffer, obj_pin,
    obj_get, obj_get_info_by_fd, prog_xlated, get_next_id, get_fd_by_id, perf_event_open,
    trace_read, mount, status)}

