"""The bpf(2) commands, as the daemon serves them (the counterpart of kernel/bpf/syscall.c).

Each handler checks what the syscall layer checks (sizes, fd kinds, privileges, memlock),
resolves handles to objects and takes or drops references; map and program semantics live in
bpffs.vm. Handlers return a result (sent as [0, result]) or a Reply that also carries new
object fds; errors are BpfError with the kernel's errno.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import repeat
from typing import TYPE_CHECKING, Any

import trio

from bpffs import vm
from bpffs.client import protocol
from bpffs.vm.errors import BpfError
from bpffs.vm.maps import BpfMap, FdArrayMap, ProgArrayMap, map_class
from bpffs.vm.maps.base import pages
from bpffs.vm.uapi import (
    BPF_LOG_MAX_SIZE,
    BPF_LOG_MIN_SIZE,
    MAP_TYPE_NAMES,
    PROG_TYPE_NAMES,
    ObjFlag,
    ProgType,
)

from .store import BpfObject, Kind

if TYPE_CHECKING:
    from .daemon import Daemon
    from .server import Connection

# sizeof(struct bpf_prog) in 4.4 before the instructions: bpf_prog_size()'s header.
BPF_PROG_HEADER = 40
# Program types an unprivileged caller may load (4.4: socket filters only).
UNPRIVILEGED_PROG_TYPES = {ProgType.SOCKET_FILTER}
_RDONLY, _WRONLY = int(ObjFlag.RDONLY), int(ObjFlag.WRONLY)  # plain ints: hot path
BATCH_SLICE = 256  # packets of a test-run batch between two chances for other clients to run


@dataclass
class Reply:
    result: Any
    fds: list[socket.socket] = field(default_factory=list)


def _check_size(what: str, data: bytes, size: int, bpf_map: BpfMap) -> None:
    if len(data) != size:
        raise BpfError(errno.EINVAL, f"{what} of {len(data)} bytes for {bpf_map.describe()},"
                       f" which has {what}_size {size}")


def _split(packed: bytes, size: int, what: str, bpf_map: BpfMap) -> list[bytes]:
    if len(packed) % size:
        raise BpfError(errno.EINVAL, f"packed {what}s of {len(packed)} bytes are not a multiple"
                       f" of {what}_size {size} of {bpf_map.describe()}")
    return [packed[i:i + size] for i in range(0, len(packed), size)]


class Syscalls:
    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.store = daemon.store
        self.fds = daemon.fds

    # -- helpers ------------------------------------------------------------------------------
    def new_fd(self, conn: Connection, obj: BpfObject, flags: int = 0) -> Reply:
        """A reply carrying a new fd reference on obj (BPF_OBJ_GET file_flags in flags),
        already bound on the connection that receives it."""
        ref, sock = self.fds.open(obj, flags)
        conn.bound[ref.ino] = ref
        info = self.describe_handle(obj)
        info["handle"] = ref.ino
        return Reply(info, [sock])

    def describe_handle(self, obj: BpfObject) -> dict:
        """What a client caches about an fd: the object's kind and shape."""
        info: dict[str, Any] = {"kind": str(obj.kind), "id": obj.id}
        if obj.kind == Kind.MAP:
            m = obj.impl
            info.update(type=int(m.map_type), key_size=m.key_size, value_size=m.value_size,
                        max_entries=m.max_entries)
        elif obj.kind == Kind.PROG:
            info.update(type=int(obj.impl.prog_type))
        return info

    def _map(self, conn: Connection, handle: int, write: bool = False) -> BpfMap:
        ref = conn.resolve(handle)
        if ref.obj.kind != Kind.MAP:
            raise BpfError(errno.EINVAL, f"fd is a {ref.obj.kind}, not a map")
        if ref.flags & (_RDONLY if write else _WRONLY):
            raise BpfError(errno.EPERM, f"fd of {ref.obj.impl.describe()} is"
                           f" {'read' if write else 'write'}-only")
        return ref.obj.impl

    def _check_charge(self, conn: Connection, cost: int) -> int | None:
        """Raise unless the caller may charge `cost` pages; returns its limit. Objects whose
        fds were all closed are dropped first when that decides it: close() then create must
        work as on the kernel, where close is synchronous (here a watcher task notices)."""
        limit = conn.peer.memlock_limit_pages()
        try:
            self.store.check_charge(conn.peer.uid, cost, limit)
        except BpfError:
            self.fds.reap()
            self.store.check_charge(conn.peer.uid, cost, limit)
        return limit

    def _changed(self, bpf_map: BpfMap, keys: list[bytes]) -> None:
        """Tell the journal which keys of a map changed through the syscall path."""
        self.daemon.map_changed(bpf_map, keys)

    # -- maps ---------------------------------------------------------------------------------
    def map_create(self, conn: Connection, map_type: int, key_size: int, value_size: int,
                   max_entries: int, flags: int, name: str) -> Reply:
        cls = map_class(map_type, key_size, value_size, max_entries, flags, name)
        cost = cls.pages_for(key_size, value_size, max_entries)
        limit = self._check_charge(conn, cost)  # before allocating the storage
        impl = cls(key_size, value_size, max_entries, flags, name)
        obj = self.store.add(Kind.MAP, impl, conn.peer.uid, cost, limit)
        with self.store.held(obj):
            return self.new_fd(conn, obj)

    def map_lookup(self, conn: Connection, handle: int, key: bytes) -> bytes:
        m = self._map(conn, handle)
        _check_size("key", key, m.key_size, m)
        return m.lookup_copy(key)

    def map_update(self, conn: Connection, handle: int, key: bytes, value: bytes,
                   flags: int) -> None:
        m = self._map(conn, handle, write=True)
        _check_size("key", key, m.key_size, m)
        _check_size("value", value, m.value_size, m)
        m.update(key, value, flags)
        self._changed(m, [key])

    def map_update_fd(self, conn: Connection, handle: int, key: bytes, value_handle: int,
                      flags: int) -> None:
        """An fd array update: the value names an object fd bound on this connection."""
        m = self._map(conn, handle, write=True)
        if not isinstance(m, FdArrayMap):
            raise BpfError(errno.EINVAL, f"{m.describe()} does not store fds")
        _check_size("key", key, m.key_size, m)
        m.slot(key, flags)
        member = conn.resolve(value_handle).obj
        wanted = Kind.PROG if isinstance(m, ProgArrayMap) else Kind.PERF_EVENT
        if member.kind != wanted:  # bpf_prog_get: EINVAL; perf_event_get: EBADF
            raise BpfError(errno.EINVAL if wanted == Kind.PROG else errno.EBADF,
                           f"{m.describe()} stores {wanted} fds, got a {member.kind} fd")
        self.store.put_in_fd_array(m, key, member, flags)
        self._changed(m, [key])

    def map_delete(self, conn: Connection, handle: int, key: bytes) -> None:
        m = self._map(conn, handle, write=True)
        _check_size("key", key, m.key_size, m)
        m.delete(key)
        self._changed(m, [key])

    def map_get_next_key(self, conn: Connection, handle: int, key: bytes | None) -> bytes:
        m = self._map(conn, handle)
        if key is not None:
            _check_size("key", key, m.key_size, m)
        return m.get_next_key(key)

    def map_lookup_batch(self, conn: Connection, handle: int, cursor: bytes | None, count: int,
                         and_delete: bool) -> list:
        """Up to count (key, value) pairs after cursor: [packed keys, packed values, cursor];
        the cursor is None once the walk has reached the end."""
        m = self._map(conn, handle, write=and_delete)
        if count <= 0:
            raise BpfError(errno.EINVAL, "batch count must be positive")
        if isinstance(m, FdArrayMap):
            raise BpfError(errno.EOPNOTSUPP, f"{m.describe()} cannot be read in batches")
        if cursor is not None:
            _check_size("key", cursor, m.key_size, m)
        keys = m.walk(cursor, count + 1)  # one more tells whether the walk ends here
        more = len(keys) > count
        keys = keys[:count]
        values = [m.lookup_copy(k) for k in keys]
        if and_delete:
            for k in keys:
                m.delete(k)
            self._changed(m, keys)
        return [b"".join(keys), b"".join(values), keys[-1] if more else None]

    def map_update_batch(self, conn: Connection, handle: int, packed_keys: bytes,
                         packed_values: bytes, flags: int) -> int:
        m = self._map(conn, handle, write=True)
        keys = _split(packed_keys, m.key_size, "key", m)
        values = _split(packed_values, m.value_size, "value", m)
        if len(keys) != len(values):
            raise BpfError(errno.EINVAL, f"{len(keys)} keys but {len(values)} values")
        return self._apply_batch(m, keys, m.update, zip(keys, values, repeat(flags)))

    def map_delete_batch(self, conn: Connection, handle: int, packed_keys: bytes) -> int:
        m = self._map(conn, handle, write=True)
        keys = _split(packed_keys, m.key_size, "key", m)
        return self._apply_batch(m, keys, m.delete, zip(keys))

    def _apply_batch(self, m: BpfMap, keys: list[bytes], apply: Callable[..., object],
                     calls: Iterable[tuple]) -> int:
        """Applies `apply` call by call, in order; on an error the exception's `detail` says
        how many calls took effect (the kernel's attr.batch.count), and those are recorded."""
        done = 0
        try:
            for args in calls:
                apply(*args)
                done += 1
        except BpfError as e:
            e.detail = done  # type: ignore[attr-defined]
            raise
        finally:
            if done:
                self._changed(m, keys[:done])
        return done

    # -- programs -----------------------------------------------------------------------------
    def prog_load(self, conn: Connection, prog_type: int, insns: bytes, license: str,
                  kern_version: int, name: str, log_level: int, log_size: int,
                  map_fds: dict) -> Reply:
        if prog_type not in PROG_TYPE_NAMES:
            raise BpfError(errno.EINVAL, f"unknown program type {prog_type}")
        if prog_type not in UNPRIVILEGED_PROG_TYPES and not conn.peer.privileged:
            raise BpfError(errno.EPERM, f"loading {PROG_TYPE_NAMES[prog_type]} programs needs"
                           " CAP_SYS_ADMIN (unprivileged callers may load socket filters)")
        if log_level and not BPF_LOG_MIN_SIZE <= log_size <= BPF_LOG_MAX_SIZE:
            raise BpfError(errno.EINVAL, f"log_size {log_size} out of range"
                           f" [{BPF_LOG_MIN_SIZE}, {BPF_LOG_MAX_SIZE}]")

        def resolve_map(fd: int) -> BpfMap:
            handle = map_fds.get(fd)
            if handle is None:
                raise BpfError(errno.EBADF, f"fd {fd} in a map load is not an open map fd")
            ref = conn.resolve(handle)
            if ref.obj.kind != Kind.MAP:
                raise BpfError(errno.EINVAL, f"fd {fd} is a {ref.obj.kind}, not a map")
            return ref.obj.impl

        try:
            prog, log = vm.load_program(prog_type, insns, license=license, resolve_map=resolve_map,
                                        kern_version=kern_version, name=name,
                                        log_level=log_level,
                                        privileged=conn.peer.privileged)
        except BpfError as e:
            raise self._with_log(e, getattr(e, "log", ""), log_level, log_size) from None
        for used in prog.maps:
            if isinstance(used, ProgArrayMap) and not used.compatible(prog_type):
                raise BpfError(errno.EINVAL, f"{used.describe()} holds programs of another type"
                               " than this one (tail calls need one type)")
        cost = pages(BPF_PROG_HEADER + len(insns))
        obj = self.store.add(Kind.PROG, prog, conn.peer.uid, cost, self._check_charge(conn, cost))
        for used in prog.maps:  # before the first put can free obj and release them
            self.store.hold(self.store.of(used))
        with self.store.held(obj):
            reply = self.new_fd(conn, obj)
        if log_level:
            reply.result["log"] = self._with_log(None, log, log_level, log_size)
        return reply

    @staticmethod
    def _with_log(err: BpfError | None, log: str, log_level: int, log_size: int) -> Any:
        """Fit the verifier log into the caller's buffer as the kernel does: truncated to
        log_size - 1 bytes, ENOSPC when it did not fit (even on success)."""
        if not log_level:
            return err
        data = log.encode()
        fits = len(data) < log_size
        data = data[:log_size - 1]
        if err is None:
            if not fits:
                e = BpfError(errno.ENOSPC, f"verifier log of {len(log)} bytes does not fit"
                             f" in log_size {log_size}")
                e.detail = data.decode(errors="replace")  # type: ignore[attr-defined]
                raise e
            return data.decode(errors="replace")
        if not fits:
            err = BpfError(errno.ENOSPC, f"{err.strerror} (and the verifier log does not fit"
                           f" in log_size {log_size})")
        err.detail = data.decode(errors="replace")  # type: ignore[attr-defined]
        return err

    def _test_run_prog(self, conn: Connection, handle: int) -> Any:
        ref = conn.resolve(handle)
        if ref.obj.kind != Kind.PROG:
            raise BpfError(errno.EINVAL, f"fd is a {ref.obj.kind}, not a program")
        if not conn.peer.privileged:
            raise BpfError(errno.EPERM, "BPF_PROG_TEST_RUN needs CAP_SYS_ADMIN")
        return ref.obj.impl

    def prog_test_run(self, conn: Connection, handle: int, data_in: bytes, ctx_in: bytes | None,
                      repeat: int, data_size_out: int, options: dict) -> dict:
        prog = self._test_run_prog(conn, handle)
        env = self.daemon.run_env(conn, options)
        result = prog.test_run(data_in, ctx_in=ctx_in, repeat=max(repeat, 1), env=env,
                               tier=options.get("tier", "compiled"))
        self.daemon.program_ran(prog)
        out = result.as_dict()
        if data_size_out and len(out["data_out"]) > data_size_out:
            e = BpfError(errno.ENOSPC, f"data_out of {len(out['data_out'])} bytes does not fit"
                         f" in data_size_out {data_size_out}")
            e.detail = out  # type: ignore[attr-defined]
            raise e
        return out

    async def prog_test_run_batch(self, conn: Connection, handle: int, packets: list,
                                  options: dict) -> list:
        """One run per packet with one run environment: what pcap replay needs, without a
        round trip per packet. The reply is columnar, so that the common case costs one
        integer a packet: [retvals, {index: data_out} of the packets the program changed,
        {index: effects} of the runs that had any (classid, redirect, ...), {index: [errno,
        message]} of the packets the run refused (too short, too large) — their retval is 0
        and the batch goes on]. No ctx_in: ctx_out is always empty. Other clients are served
        every BATCH_SLICE packets: a batch must not stall the daemon."""
        prog = self._test_run_prog(conn, handle)
        if set(map(type, packets)) - {bytes}:
            raise BpfError(errno.EINVAL, "prog_test_run_batch: packets must be bytes")
        env = self.daemon.run_env(conn, options)
        try:
            batch = prog.test_run_batch(env, options.get("tier", "compiled"))
            for start in range(0, len(packets), BATCH_SLICE):
                batch.feed(packets[start:start + BATCH_SLICE])
                await trio.lowlevel.checkpoint()
        finally:
            self.daemon.program_ran(prog)
        return [batch.retvals, batch.outputs, batch.effects, batch.errors]

    # -- information --------------------------------------------------------------------------
    def obj_info(self, conn: Connection, handle: int) -> dict:
        return self.info(conn.resolve(handle).obj)

    def info(self, obj: BpfObject) -> dict:
        """bpftool's field names (map show / prog show -j)."""
        pinned = sorted(self.daemon.pin_paths(obj))
        if obj.kind == Kind.MAP:
            m = obj.impl
            return {"id": obj.id, "type": MAP_TYPE_NAMES[m.map_type], "name": m.name,
                    "flags": m.flags, "bytes_key": m.key_size, "bytes_value": m.value_size,
                    "max_entries": m.max_entries, "bytes_memlock": obj.pages * 4096,
                    "frozen": 0, "pinned": pinned, "entries": len(m)
                    if not isinstance(m, FdArrayMap) else sum(1 for _ in m.items())}
        if obj.kind == Kind.PROG:
            p = obj.impl
            info = {"id": obj.id, "type": PROG_TYPE_NAMES[p.prog_type], "name": p.name,
                    "tag": p.tag, "gpl_compatible": p.gpl_compatible,
                    "loaded_at": int(obj.created), "uid": obj.uid,
                    "bytes_xlated": len(p.insns), "jited": False, "bytes_jited": 0,
                    "bytes_memlock": obj.pages * 4096,
                    "map_ids": [self.store.of(m).id for m in p.maps], "pinned": pinned}
            if p.run_cnt:
                info.update(run_time_ns=p.run_time_ns, run_cnt=p.run_cnt)
            return info
        return {"id": obj.id, "type": "perf_event", "cpu": obj.impl.cpu}

    def prog_xlated(self, conn: Connection, handle: int) -> bytes:
        ref = conn.resolve(handle)
        if ref.obj.kind != Kind.PROG:
            raise BpfError(errno.EINVAL, f"fd is a {ref.obj.kind}, not a program")
        return ref.obj.impl.insns

    def _need_admin(self, conn: Connection, what: str) -> None:
        if not conn.peer.privileged:
            raise BpfError(errno.EPERM, f"{what} needs CAP_SYS_ADMIN")

    def get_next_id(self, conn: Connection, kind: str, start: int) -> int:
        self._need_admin(conn, "listing objects by id")
        self.fds.reap()
        for obj_id in self.store.ids(_kind(kind)):
            if obj_id > start:
                return obj_id
        raise BpfError(errno.ENOENT, f"no {kind} id after {start}")

    def get_fd_by_id(self, conn: Connection, kind: str, obj_id: int) -> Reply:
        self._need_admin(conn, "opening objects by id")
        self.fds.reap()
        return self.new_fd(conn, self.store.by_id(_kind(kind), obj_id))

    # -- perf events and tracing ----------------------------------------------------------------
    def perf_event_open(self, conn: Connection, cpu: int) -> Reply:
        """A perf event for one CPU: store its fd in a PERF_EVENT_ARRAY, read samples from it."""
        event = vm.PerfEvent(cpu=cpu)
        obj = self.store.add(Kind.PERF_EVENT, event, conn.peer.uid, 1,
                             self._check_charge(conn, 1))
        event.on_output = lambda cpu, data: self.fds.send_event(
            obj, protocol.pack([cpu, time.time_ns(), data]))
        with self.store.held(obj):
            return self.new_fd(conn, obj)

    async def trace_read(self, conn: Connection, after: int) -> list:
        """trace_printk lines with sequence numbers above `after`, waiting for the first one."""
        return await self.daemon.trace.read(after)


def _kind(name: str) -> Kind:
    try:
        return Kind(name)
    except ValueError:
        raise BpfError(errno.EINVAL, f"unknown object kind {name!r} (map, prog)") from None

