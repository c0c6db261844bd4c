"""The bpf(2) commands, as the daemon serves them (the counterpart of kernel/bpf/syscall.c).

Each handler checks what the syscall layer checks (sizes, fd kinds, privileges, memlock),
resolves handles to objects and takes or drops references; map and program semantics live in
bpffs.vm. Handlers return a result (sent as [0, result]) or a Reply that also carries new
object fds; errors are BpfError with the kernel's errno.
"""

from __future__ import annotations

import errno
import fcntl
import io
import mmap
import os
import socket
import time
from array import array
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from bpffs import protocol, vm
from bpffs.vm.env import DEFAULT_BUDGET
from bpffs.vm.errors import BatchError, BpfError, RunOutputError, VerifierError
from bpffs.vm.maps import BpfMap, FdArrayMap, ProgArrayMap, map_class
from bpffs.vm.maps.base import pages
from bpffs.vm.uapi import (
    BPF_COMPLEXITY_LIMIT_INSNS,
    BPF_LOG_MAX_SIZE,
    BPF_LOG_MIN_SIZE,
    MAP_TYPE_NAMES,
    PAGE_SIZE,
    PROG_TYPE_NAMES,
    ObjFlag,
    ProgType,
)

from .store import BpfObject, Kind

if TYPE_CHECKING:
    from bpffs.vm.run import Buffer

    from .daemon import Daemon
    from .fs.tree import Caller
    from .server import Connection

# sizeof(struct bpf_prog) in 4.4 before the instructions: bpf_prog_size()'s header.
BPF_PROG_HEADER = 40
# Program types an unprivileged caller may load (4.4: socket filters only).
UNPRIVILEGED_PROG_TYPES = {ProgType.SOCKET_FILTER}
T = TypeVar("T")
_RDONLY, _WRONLY = int(ObjFlag.RDONLY), int(ObjFlag.WRONLY)  # plain ints: hot path
# A long request (map batch, test run, test-run batch) runs in slices of about SLICE_SECONDS,
# letting other clients run between slices (the loop's latency goal is 50 ms). It
# looks at the clock every MAP_BATCH_STEP elements, every BATCH_STEP packets, every repetition.
SLICE_SECONDS = 0.005
MAP_BATCH_STEP = 128
BATCH_STEP = 16
BUFFER_STEP_MAX = 4096  # packets of a buffer run between looks at the clock, at most
# A client's memfd of packets up to this size is mapped with its page tables filled at once
# (MAP_POPULATE: one call instead of a page fault every 4 KiB; bench/pcap.py's replay went
# from 2.37M to 2.55-2.71M packets/s); larger ones fault page by page, so that a sparse memfd
# costs only what is read.
POPULATE_MAX = 64 << 20
# Keys and values of one map batch request, together: the kernel has no cap, but our request
# is held whole in memory (the client library sends ~1 MiB requests).
MAP_BATCH_MAX_BYTES = 64 << 20
# The daemon's fds an array or hash map holds (shm.SharedMemory: the memfd and the mapping's),
# charged to its creator as object fds are (limits.Limits.map_fds).
MAP_MEMORY_FDS = 2
# Verifying and compiling a program can take seconds of CPU: it runs in a worker thread, so the
# event loop keeps serving everyone else. At most this many such threads per uid: a user
# cannot start unbounded threads, nor take every thread from another user.
LOAD_THREADS_PER_UID = 1


@dataclass
class Reply:
    result: Any
    fds: list[socket.socket | io.FileIO] = field(default_factory=list)  # closed once sent


def _check_size(what: str, data: bytes, size: int, bpf_map: BpfMap) -> None:
    if len(data) != size:
        raise BpfError(errno.EINVAL, f"{what} of {len(data)} bytes for {bpf_map.describe()},"
                       f" which has {what}_size {size}")


def _count(packed: bytes, size: int, what: str, bpf_map: BpfMap) -> int:
    """How many `size`-byte elements `packed` holds (no list of them is made)."""
    if len(packed) % size:
        raise BpfError(errno.EINVAL, f"packed {what}s of {len(packed)} bytes are not a multiple"
                       f" of {what}_size {size} of {bpf_map.describe()}")
    return len(packed) // size


def _check_batch_bytes(size: int, bpf_map: BpfMap) -> None:
    if size > MAP_BATCH_MAX_BYTES:
        raise BpfError(errno.E2BIG, f"batch of {size} bytes for {bpf_map.describe()} is above"
                       f" the daemon's limit of {MAP_BATCH_MAX_BYTES} bytes a request (split it;"
                       " the client library sends ~1 MiB requests)")


class Syscalls:
    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.store = daemon.store
        self.fds = daemon.fds
        self._load_limiters: dict[int, trio.CapacityLimiter] = {}
        self._map_fds_of: dict[BpfObject, int] = {}  # maps whose memory fds a uid is charged
        daemon.store.on_release.append(self._released)

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
        work as on the kernel, where close is synchronous (here a watcher task notices); so
        are the charges of freed maps whose memory was let go (munmap is synchronous too)."""
        limit = conn.peer.memlock_limit_pages()
        try:
            self.store.check_charge(conn.peer.uid, cost, limit)
        except BpfError:
            self.fds.reap()
            self.store.reap_lingering()
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
        uid = conn.peer.uid
        fds = MAP_MEMORY_FDS if not issubclass(cls, FdArrayMap) else 0
        for charged in range(fds):
            try:
                self.daemon.limits.charge(self.daemon.limits.map_fds, uid)
            except BpfError:
                self._uncharge_map_fds(uid, charged)
                raise
        try:
            impl = cls(key_size, value_size, max_entries, flags, name)
        except BaseException:
            self._uncharge_map_fds(uid, fds)
            raise
        obj = self.store.add(Kind.MAP, impl, uid, cost, limit)
        if fds:
            self._map_fds_of[obj] = uid
        with self.store.held(obj):
            return self.new_fd(conn, obj)

    def _uncharge_map_fds(self, uid: int, n: int) -> None:
        for _ in range(n):
            self.daemon.limits.map_fds.uncharge(uid)

    def _released(self, obj: BpfObject) -> None:
        uid = self._map_fds_of.pop(obj, None)
        if uid is not None:
            self._uncharge_map_fds(uid, MAP_MEMORY_FDS)

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

    def map_memory(self, conn: Connection, handle: int, writable: bool) -> Reply:
        """The map's memory (a memfd in the layout of bpffs.vm.maps.layout) for the caller to
        map and read in place: read-only, or read-write for an array created BPF_F_MMAPABLE
        whose fd may write (as the kernel's mmap of such an array). Needs a readable fd, as
        a lookup does."""
        m = self._map(conn, handle)
        if writable:
            m = self._map(conn, handle, write=True)
        shm = getattr(m, "shm", None)
        if shm is None:
            raise BpfError(errno.EOPNOTSUPP, f"{m.describe()} has no memory to map (only"
                           " array and hash maps do)")
        if writable and not shm.user_writable:
            raise BpfError(errno.EINVAL, f"{m.describe()} can be mapped read-only only (only"
                           " arrays created with BPF_F_MMAPABLE are writable in place)")
        fd = shm.reader_fd(writable)
        if writable:
            self.daemon.map_mapped_writable(m)
        return Reply({"size": shm.size, "writable": writable}, [io.FileIO(fd, "r")])

    async def map_lookup_batch(self, conn: Connection, handle: int, cursor: bytes | None,
                               count: int, and_delete: bool) -> list:
        """Up to count (key, value) pairs after cursor: [packed keys, packed values, cursor];
        the cursor is None once the walk has reached the end. The walk goes in slices of
        SLICE_SECONDS, letting other clients in between, and stops at what fits in
        MAP_BATCH_MAX_BYTES (the caller goes on from the cursor)."""
        m = self._map(conn, handle, write=and_delete)
        if count <= 0:
            raise BpfError(errno.EINVAL, "batch count must be positive")
        if isinstance(m, FdArrayMap):
            raise BpfError(errno.EOPNOTSUPP, f"{m.describe()} cannot be read in batches")
        if cursor is not None:
            _check_size("key", cursor, m.key_size, m)
        count = min(count, max(1, MAP_BATCH_MAX_BYTES // (m.key_size + m.value_size)))
        with self.store.held(self.store.of(m)):  # its fd may close between slices
            return await self._lookup_batch(m, cursor, count, and_delete)

    async def _lookup_batch(self, m: BpfMap, cursor: bytes | None, count: int,
                            and_delete: bool) -> list:
        keys, values = bytearray(), bytearray()  # packed as they come: no list of them all
        taken, last, more = 0, cursor, True
        deadline = time.perf_counter() + SLICE_SECONDS
        while more and taken < count:
            want = min(MAP_BATCH_STEP, count - taken)
            after = None if and_delete and taken else last  # deleted: from the first left
            found = m.walk(after, want + 1)  # one more tells whether the walk ends here
            more = len(found) > want
            found = found[:want]
            if not found:
                break
            keys += b"".join(found)
            values += b"".join([m.lookup_copy(k) for k in found])
            if and_delete:
                for k in found:
                    m.delete(k)
                self._changed(m, found)
            taken, last = taken + len(found), found[-1]
            if more and taken < count and time.perf_counter() > deadline:
                await trio.lowlevel.checkpoint()
                deadline = time.perf_counter() + SLICE_SECONDS
        return [bytes(keys), bytes(values), last if more and taken else None]

    async def map_update_batch(self, conn: Connection, handle: int, packed_keys: bytes,
                               packed_values: bytes, flags: int) -> int:
        m = self._map(conn, handle, write=True)
        n = _count(packed_keys, m.key_size, "key", m)
        if _count(packed_values, m.value_size, "value", m) != n:
            raise BpfError(errno.EINVAL, f"{n} keys but"
                           f" {len(packed_values) // m.value_size} values")
        _check_batch_bytes(len(packed_keys) + len(packed_values), m)
        ks, vs, update = m.key_size, m.value_size, m.update

        def apply(i: int) -> bytes:
            key = packed_keys[i * ks:(i + 1) * ks]
            update(key, packed_values[i * vs:(i + 1) * vs], flags)
            return key

        return await self._apply_batch(m, n, apply)

    async def map_delete_batch(self, conn: Connection, handle: int, packed_keys: bytes) -> int:
        m = self._map(conn, handle, write=True)
        n = _count(packed_keys, m.key_size, "key", m)
        _check_batch_bytes(len(packed_keys), m)
        ks, delete = m.key_size, m.delete

        def apply(i: int) -> bytes:
            key = packed_keys[i * ks:(i + 1) * ks]
            delete(key)
            return key

        return await self._apply_batch(m, n, apply)

    async def _apply_batch(self, m: BpfMap, n: int, apply: Callable[[int], bytes]) -> int:
        """apply(0) .. apply(n - 1) in order, in slices of SLICE_SECONDS with other clients
        served in between; each returns the key it changed. An error is a BatchError whose
        `count` says how many took effect (the kernel's attr.batch.count); the journal
        records the keys of every slice applied, the failing slice's applied part too."""
        with self.store.held(self.store.of(m)):  # its fd may close between slices
            return await self._apply_slices(m, n, apply)

    async def _apply_slices(self, m: BpfMap, n: int, apply: Callable[[int], bytes]) -> int:
        done = 0
        while done < n:
            changed: list[bytes] = []
            deadline = time.perf_counter() + SLICE_SECONDS
            try:
                while done + len(changed) < n and time.perf_counter() < deadline:
                    for i in range(done + len(changed),
                                   min(n, done + len(changed) + MAP_BATCH_STEP)):
                        changed.append(apply(i))
            except BpfError as e:
                raise BatchError(e.errno, e.strerror, done + len(changed)) from None
            finally:
                if changed:
                    self._changed(m, changed)
            done += len(changed)
            if done < n:
                await trio.lowlevel.checkpoint()
        return done

    # -- programs -----------------------------------------------------------------------------
    async def prog_load(self, conn: Connection, prog_type: int, insns: bytes, license: str,
                        kern_version: int, name: str, log_level: int, log_size: int,
                        map_fds: dict) -> Reply:
        """BPF_PROG_LOAD. Maps are resolved (and held) on the event loop; the verifier and
        the compiler then run in a worker thread on data no other task touches."""
        if prog_type not in PROG_TYPE_NAMES:
            raise BpfError(errno.EINVAL, f"unknown program type {prog_type}")
        if prog_type not in UNPRIVILEGED_PROG_TYPES and not conn.peer.privileged:
            raise BpfError(errno.EPERM, f"loading {PROG_TYPE_NAMES[prog_type]} programs needs"
                           " CAP_SYS_ADMIN (unprivileged callers may load socket filters)")
        if log_level and not BPF_LOG_MIN_SIZE <= log_size <= BPF_LOG_MAX_SIZE:
            raise BpfError(errno.EINVAL, f"log_size {log_size} out of range"
                           f" [{BPF_LOG_MIN_SIZE}, {BPF_LOG_MAX_SIZE}]")
        self._check_charge(conn, pages(BPF_PROG_HEADER + len(insns)))  # before the work
        resolved = self._resolve_map_fds(conn, map_fds)

        def resolve_map(fd: int) -> BpfMap:
            found = resolved.get(fd)
            if found is None:
                raise BpfError(errno.EBADF, f"fd {fd} in a map load is not an open map fd")
            if isinstance(found, BpfError):
                raise BpfError(found.errno, found.strerror)
            return found.impl

        def load() -> tuple[vm.Program, str]:
            return vm.load_program(prog_type, insns, license=license, resolve_map=resolve_map,
                                   kern_version=kern_version, name=name, log_level=log_level,
                                   privileged=conn.peer.privileged)

        with ExitStack() as holding:  # the maps stay alive while the thread looks at them
            for found in resolved.values():
                if isinstance(found, BpfObject):
                    holding.enter_context(self.store.held(found))
            try:
                prog, log = await self.off_loop(conn.peer.uid, load)
            except BpfError as e:
                raise _refusal(e, log_level, log_size) from None
            for used in prog.maps:
                if isinstance(used, ProgArrayMap) and not used.compatible(prog_type):
                    raise BpfError(errno.EINVAL, f"{used.describe()} holds programs of another"
                                   " type than this one (tail calls need one type)")
            cost = pages(BPF_PROG_HEADER + len(insns))
            obj = self.store.add(Kind.PROG, prog, conn.peer.uid, cost,
                                 self._check_charge(conn, cost))
        with self.store.held(obj):
            reply = self.new_fd(conn, obj)
        if log_level:
            text, fits = _fit_log(log, log_size)
            if not fits:
                raise VerifierError(errno.ENOSPC, f"verifier log of {len(log)} bytes does not"
                                    f" fit in log_size {log_size}", text)
            reply.result["log"] = text
        return reply

    def _resolve_map_fds(self, conn: Connection, map_fds: dict) -> dict[int, Any]:
        """fd -> its map's BpfObject, or the BpfError that naming it gives (raised only if
        the program uses that fd, as the kernel resolves fds as it meets them)."""
        resolved: dict[int, Any] = {}
        for fd, handle in map_fds.items():
            if type(fd) is not int or type(handle) is not int:
                raise BpfError(errno.EINVAL, "prog_load: map_fds must map fd numbers to"
                               f" handles (integers), got {fd!r}: {handle!r}")
            try:
                ref = conn.resolve(handle)
                if ref.obj.kind != Kind.MAP:
                    raise BpfError(errno.EINVAL, f"fd {fd} is a {ref.obj.kind}, not a map")
                resolved[fd] = ref.obj
            except BpfError as e:
                resolved[fd] = e
        return resolved

    async def off_loop(self, uid: int, work: Callable[[], T]) -> T:
        """work() in a worker thread, at most LOAD_THREADS_PER_UID at a time for uid. work
        must not touch the store, the tree or any connection: only what it was given."""
        limiter = self._load_limiters.get(uid)
        if limiter is None:
            limiter = self._load_limiters[uid] = trio.CapacityLimiter(LOAD_THREADS_PER_UID)
        return await trio.to_thread.run_sync(work, limiter=limiter)

    def _test_run_prog(self, conn: Connection, handle: int) -> Any:
        ref = conn.resolve(handle)
        if ref.obj.kind != Kind.PROG:
            raise BpfError(errno.EINVAL, f"fd is a {ref.obj.kind}, not a program")
        if not conn.peer.privileged:
            raise BpfError(errno.EPERM, "BPF_PROG_TEST_RUN needs CAP_SYS_ADMIN")
        return ref.obj.impl

    async def prog_test_run(self, conn: Connection, handle: int, data_in: bytes,
                            ctx_in: bytes | None, repeat: int, data_size_out: int,
                            options: dict) -> dict:
        """BPF_PROG_TEST_RUN. repeat is the kernel's u32, never capped lower: the run pauses
        every SLICE_SECONDS for other clients (the kernel reschedules between repetitions)
        and stops when the caller hangs up (the kernel's EINTR on a signal)."""
        prog = self._test_run_prog(conn, handle)
        env = self._run_env(conn, options)
        tier = options.get("tier", vm.DEFAULT_TIER)
        with self.store.held(self.store.of(prog)):  # its fd may close while it runs
            out = await self._test_run(conn, prog, tier, data_in, ctx_in, repeat, env)
        if data_size_out and len(out["data_out"]) > data_size_out:
            raise RunOutputError(errno.ENOSPC, f"data_out of {len(out['data_out'])} bytes does"
                                 f" not fit in data_size_out {data_size_out}", out)
        return out

    async def _test_run(self, conn: Connection, prog: vm.Program, tier: str, data_in: bytes,
                        ctx_in: bytes | None, repeat: int, env: vm.RunEnv) -> dict:
        await self._compile(conn, prog, tier)
        steps = prog.test_run_steps(data_in, ctx_in, repeat=max(repeat, 1), env=env, tier=tier)
        try:
            deadline = time.perf_counter() + SLICE_SECONDS
            while True:
                try:
                    next(steps)
                except StopIteration as finished:
                    result = finished.value
                    break
                if time.perf_counter() > deadline:
                    await trio.lowlevel.checkpoint()
                    deadline = time.perf_counter() + SLICE_SECONDS
        finally:
            steps.close()
            self.daemon.program_ran(prog)
        return result.as_dict()

    def _run_env(self, conn: Connection, options: dict) -> vm.RunEnv:
        """The run's environment, with the instruction budget of one run capped at the
        kernel's complexity limit: no verified program runs more instructions than that."""
        budget = options.get("budget", DEFAULT_BUDGET)
        if not isinstance(budget, int) or not 1 <= budget <= BPF_COMPLEXITY_LIMIT_INSNS:
            raise BpfError(errno.EINVAL, f"run budget {budget!r} out of range [1,"
                           f" {BPF_COMPLEXITY_LIMIT_INSNS}] (instructions a run may execute:"
                           " the kernel's complexity limit)")
        return self.daemon.run_env(conn, options)

    async def _compile(self, conn: Connection, prog: vm.Program, tier: str) -> None:
        """Compile a program for `tier` in a worker thread before its first run (seconds for
        a big program: never on the event loop)."""
        if not prog.ready(tier):
            await self.off_loop(conn.peer.uid, lambda: prog.entry(tier))

    async def prog_test_run_batch(self, conn: Connection, handle: int, packets: list,
                                  options: dict) -> list:
        """One run per packet with one run environment: what pcap replay needs, without a
        round trip per packet. The reply is columnar, so that the common case costs one
        integer a packet: [retvals, {index: data_out} of the packets the program changed,
        {index: effects} of the runs that had any (classid, redirect, ...), {index: [errno,
        message]} of the packets the run refused (too short, too large) — their retval is 0
        and the batch goes on]. No ctx_in: ctx_out is always empty. Other clients are served
        every SLICE_SECONDS (BATCH_STEP packets at a time): a batch must not stall the
        daemon."""
        prog = self._test_run_prog(conn, handle)
        if set(map(type, packets)) - {bytes}:
            raise BpfError(errno.EINVAL, "prog_test_run_batch: packets must be bytes")
        env = self._run_env(conn, options)
        tier = options.get("tier", vm.DEFAULT_TIER)
        with self.store.held(self.store.of(prog)):  # its fd may close while it runs
            return await self._test_run_batch(conn, prog, tier, packets, env)

    async def _test_run_batch(self, conn: Connection, prog: vm.Program, tier: str,
                              packets: list, env: vm.RunEnv) -> list:
        await self._compile(conn, prog, tier)
        try:
            batch = prog.test_run_batch(env, tier)
            deadline = time.perf_counter() + SLICE_SECONDS
            for start in range(0, len(packets), BATCH_STEP):
                batch.feed(packets[start:start + BATCH_STEP])
                if time.perf_counter() > deadline:
                    await trio.lowlevel.checkpoint()
                    deadline = time.perf_counter() + SLICE_SECONDS
        finally:
            self.daemon.program_ran(prog)
        return [batch.retvals.tolist(), batch.outputs, batch.all_effects(), batch.errors]

    async def prog_test_run_buffer(self, conn: Connection, handle: int, offsets: bytes,
                                   lengths: bytes, options: dict) -> list:
        """prog_test_run_batch for packets in a memfd the request carries (sealed against
        shrinking, so that reading it can never fault): `offsets` (u64) and `lengths` (u32)
        say where each packet is. The reply is all columns: [retvals (u32 each), classids
        (u32), redirects (u64: REDIRECT_SET | ingress << 32 | ifindex, or 0), then by packet
        index data_out where changed, the other effects, errors]. On the native tier the
        packets run in native code from one to the next (vm.native.batch)."""
        prog = self._test_run_prog(conn, handle)
        fd = conn.take_fd("the packets (a memfd sealed against shrinking)")
        if len(offsets) % 8 or len(lengths) % 4 or len(offsets) // 8 != len(lengths) // 4:
            raise BpfError(errno.EINVAL, "prog_test_run_buffer: offsets are u64 and lengths"
                           " u32, one of each a packet")
        if len(lengths) // 4 > protocol.REQUEST_ARRAY_MAX:
            raise BpfError(errno.E2BIG, f"more than {protocol.REQUEST_ARRAY_MAX} packets in"
                           " one request")
        starts, sizes = array("Q", offsets), array("I", lengths)
        env = self._run_env(conn, options)
        tier = options.get("tier", vm.DEFAULT_TIER)
        with self.store.held(self.store.of(prog)), _mapped_packets(fd, starts, sizes) as packets:
            return await self._test_run_buffer(conn, prog, tier, packets, starts, sizes, env)

    async def _test_run_buffer(self, conn: Connection, prog: vm.Program, tier: str,
                               packets: Buffer, offsets: array, lengths: array,
                               env: vm.RunEnv) -> list:
        """The packets a step at a time between looks at the clock; steps grow while they
        are short (native code runs a packet in ~0.1 us) and shrink when one took longer
        than a slice (a program that spends its budget on every packet)."""
        await self._compile(conn, prog, tier)
        try:
            batch = prog.test_run_batch(env, tier)
            step, start = BATCH_STEP, 0
            deadline = time.perf_counter() + SLICE_SECONDS
            while start < len(offsets):
                began = time.perf_counter()
                batch.feed_buffer(packets, offsets[start:start + step],
                                  lengths[start:start + step], checked=True)
                start += step
                now = time.perf_counter()
                if now - began < SLICE_SECONDS / 4:
                    step = min(2 * step, BUFFER_STEP_MAX)
                elif now - began > SLICE_SECONDS:
                    step = max(step // 2, 1)
                if now > deadline:
                    await trio.lowlevel.checkpoint()
                    deadline = time.perf_counter() + SLICE_SECONDS
        finally:
            self.daemon.program_ran(prog)
        return [batch.retvals.tobytes(), batch.classids.tobytes(), batch.redirects.tobytes(),
                batch.outputs, batch.effects, batch.errors]

    # -- information --------------------------------------------------------------------------
    def obj_info(self, conn: Connection, handle: int) -> dict:
        return self.info(conn.resolve(handle).obj, self.daemon.caller(conn))

    def info(self, obj: BpfObject, caller: Caller | None = None) -> dict:
        """bpftool's field names (map show / prog show -j); `pinned` lists the paths the
        caller could look up (a pin below a directory it may not search stays private)."""
        pinned = sorted(self.daemon.pin_paths(obj, caller))
        if obj.kind == Kind.MAP:
            m = obj.impl
            return {"id": obj.id, "type": MAP_TYPE_NAMES[m.map_type], "name": m.name,
                    "flags": m.flags, "bytes_key": m.key_size, "bytes_value": m.value_size,
                    "max_entries": m.max_entries, "bytes_memlock": obj.pages * PAGE_SIZE,
                    "frozen": 0, "pinned": pinned, "entries": len(m)
                    if not isinstance(m, FdArrayMap) else m.live}
        if obj.kind == Kind.PROG:
            p = obj.impl
            info = {"id": obj.id, "type": PROG_TYPE_NAMES[p.prog_type], "name": p.name,
                    "tag": p.tag, "gpl_compatible": p.gpl_compatible,
                    "loaded_at": int(obj.created), "uid": obj.uid,
                    "bytes_xlated": len(p.insns), "jited": False, "bytes_jited": 0,
                    "bytes_memlock": obj.pages * PAGE_SIZE,
                    "map_ids": [self.store.of(m).id for m in p.maps], "pinned": pinned,
                    "tier": p.tier}  # (not bpftool's: which VM tier its runs use now)
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


def _fit_log(log: str, log_size: int) -> tuple[str, bool]:
    """The verifier log as the caller's buffer holds it (the kernel truncates it to
    log_size - 1 bytes), and whether it fit (ENOSPC when not, even on success)."""
    data = log.encode()
    return data[:log_size - 1].decode(errors="replace"), len(data) < log_size


def _refusal(err: BpfError, log_level: int, log_size: int) -> BpfError:
    """The error of a failed load: with log_level, a VerifierError carrying the verifier's log
    as the caller's buffer holds it; without, errno and message alone (no log was asked for)."""
    if not log_level:
        return BpfError(err.errno, err.strerror)
    text, fits = _fit_log(err.log if isinstance(err, VerifierError) else "", log_size)
    if fits:
        return VerifierError(err.errno, err.strerror, text)
    return VerifierError(errno.ENOSPC, f"{err.strerror} (and the verifier log does not fit in"
                         f" log_size {log_size})", text)


def _kind(name: str) -> Kind:
    try:
        return Kind(name)
    except ValueError:
        raise BpfError(errno.EINVAL, f"unknown object kind {name!r} (map, prog)") from None


@contextmanager
def _mapped_packets(fd: int, offsets: array, lengths: array) -> Iterator[Buffer]:
    """A client's memfd of packets, mapped read-only as far as the packets go (every one
    checked to be inside: check_packets). Only a memfd
    sealed against shrinking is taken: any other file could shrink under the mapping (a read
    past its end is SIGBUS, which would kill the daemon) or block a read (a FIFO, a file on
    a FUSE mount)."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise BpfError(errno.EINVAL, "the packets must come in a memfd") from None
    if not seals & fcntl.F_SEAL_SHRINK:
        raise BpfError(errno.EINVAL, "the packets' memfd must be sealed against shrinking"
                       " (F_SEAL_SHRINK)")
    stat = os.fstat(fd)
    if stat.st_blksize != mmap.PAGESIZE:  # hugetlbfs: a read of a hole punched in it
        raise BpfError(errno.EINVAL, "the packets' memfd may not use huge pages")  # is SIGBUS
    size = vm.check_packets(stat.st_size, offsets, lengths)
    if not size:
        yield b""
        return
    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if size <= POPULATE_MAX else 0)
    try:
        mapping = mmap.mmap(fd, size, flags, mmap.PROT_READ)
    except OSError as e:
        raise BpfError(e.errno or errno.EINVAL, f"cannot map the packets' memfd: {e.strerror}"
                       ) from None
    try:
        yield mapping
    finally:
        try:
            mapping.close()
        except BufferError:  # a view of it still alive (an exception's frames): the
            pass  # collector unmaps it
