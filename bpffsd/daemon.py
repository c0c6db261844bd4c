"""The daemon: owns the store, the object fds, the filesystems and the control server, each
under one nursery, and wires the hooks between them (the journal hears of map writes, the
filesystems of freed objects, programs' trace output goes to the trace ring)."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import trio

from bpffs import protocol, vm
from bpffs.vm.errors import BpfError

from . import sdnotify
from .fs import Filesystems
from .fs.tree import ROOT, Caller
from .limits import LimitConfig, Limits
from .objfd import ObjectFds
from .persist import Persistence
from .server import Connection, Server
from .store import BpfObject, Store
from .syscall import Syscalls
from .trace import TraceRing
from .workers import module_command, worker_env

log = logging.getLogger(__name__)

SECCOMP_AGENT = module_command("bpffs.client.seccomp.agent")
SECCOMP_AGENT_RESTART_PAUSE = 0.5  # seconds before restarting an agent that died ...
SECCOMP_AGENT_MAX_PAUSE = 60.0  # ... doubled up to this while it keeps dying ...
SECCOMP_AGENT_QUICK_DEATH = 60.0  # ... within this many seconds of its start
LINGER_PROBE_SECONDS = 1.0  # between looks at freed maps' memory that clients may still map

try:
    VERSION = version("bpffsd")  # pyproject.toml's, the one source (`bpffs version` reads it)
except PackageNotFoundError:  # a checkout used without an install
    VERSION = "unknown"


@dataclass
class Config:
    socket_path: str
    mountpoint: str | None  # the default instance's mount; None: mount nothing at start
    state_dir: str | None  # None: nothing persists
    memory_limit: int | None = 1 << 30
    persist_interval: float = 0.1  # seconds within which program-made map writes persist
    limits: LimitConfig = field(default_factory=LimitConfig)  # per-uid limits (limits.py)
    seccomp_agent: str | None = None  # the runtimes' listenerPath; None: no agent


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.store = Store(config.memory_limit)
        self.limits = Limits(config.limits)
        self.fds = ObjectFds(self.store, self.limits)
        self.trace = TraceRing()
        self.syscalls = Syscalls(self)
        self.fs = Filesystems(self)
        self.persistence = (Persistence(self, config.state_dir, config.persist_interval)
                            if config.state_dir else None)
        self.ready = trio.Event()
        self.server: Server | None = None  # serving from run() on
        self._owns_socket = False  # we bound the socket path (not systemd), so we unlink it

    # -- the request table ----------------------------------------------------------------------
    def handlers(self) -> dict[str, Callable[..., Any]]:
        sc, fs = self.syscalls, self.fs
        table = {
            "hello": self.hello,
            "bind": self.bind,
            "map_create": sc.map_create,
            "map_lookup": sc.map_lookup,
            "map_update": sc.map_update,
            "map_update_fd": sc.map_update_fd,
            "map_delete": sc.map_delete,
            "map_get_next_key": sc.map_get_next_key,
            "map_memory": sc.map_memory,
            "map_lookup_batch": sc.map_lookup_batch,
            "map_update_batch": sc.map_update_batch,
            "map_delete_batch": sc.map_delete_batch,
            "prog_load": sc.prog_load,
            "prog_test_run": sc.prog_test_run,
            "prog_test_run_batch": sc.prog_test_run_batch,
            "prog_test_run_buffer": sc.prog_test_run_buffer,
            "obj_info": sc.obj_info,
            "prog_xlated": sc.prog_xlated,
            "get_next_id": sc.get_next_id,
            "get_fd_by_id": sc.get_fd_by_id,
            "perf_event_open": sc.perf_event_open,
            "trace_read": self.trace_read,
            "obj_pin": fs.obj_pin,
            "obj_get": fs.obj_get,
            "mount": fs.mount,
            "status": self.status,
        }
        unmatched = set(protocol.OPS) ^ set(table)
        if unmatched:
            raise RuntimeError(f"protocol ops without handlers (or the reverse): {unmatched}")
        return table

    def hello(self, conn: Connection, version: int, client: str) -> dict:
        if version != protocol.PROTOCOL_VERSION:
            raise BpfError(errno.EPROTO, f"protocol version {version} is not supported (bpffsd"
                           f" {VERSION} speaks version {protocol.PROTOCOL_VERSION})")
        conn.greeted = True
        return {"version": protocol.PROTOCOL_VERSION, "daemon": VERSION, "pid": os.getpid()}

    def bind(self, conn: Connection) -> dict:
        ref = self.fds.identify(conn.take_fd("an object fd"))
        conn.bound[ref.ino] = ref
        info = self.syscalls.describe_handle(ref.obj)
        info["handle"] = ref.ino
        return info

    def trace_read(self, conn: Connection, after: int) -> Any:
        """The kernel's trace_pipe is root-only: other users' programs' output is not theirs
        to read. Checked before the read parks."""
        if not conn.peer.privileged:
            raise BpfError(errno.EPERM, "reading the trace pipe needs CAP_SYS_ADMIN (root), as"
                           " the kernel's /sys/kernel/tracing/trace_pipe does")
        return self.syscalls.trace_read(conn, after)

    def status(self, conn: Connection) -> dict:
        self.fds.reap()
        counts: dict[str, int] = {}
        for obj in self.store.objects():
            counts[obj.kind] = counts.get(obj.kind, 0) + 1
        return {
            "version": VERSION,
            "pid": os.getpid(),
            "socket": self.config.socket_path,
            "objects": counts,
            "memlock_pages": self.store.total_pages,
            # freed maps still charged: a client may still map their memory
            "lingering_maps": len(self.store.lingering),
            "connections": len(self.server.connections) if self.server is not None else 0,
            "object_fds": len(self.fds.by_ino),
            "instances": self.fs.describe(),
            "persistence": self.persistence.status() if self.persistence else None,
        }

    # -- hooks between parts ----------------------------------------------------------------------
    def map_changed(self, bpf_map: Any, keys: list[bytes]) -> None:
        """Keys of a map changed through the syscall path (the journal records them)."""
        if self.persistence is not None:
            self.persistence.map_changed(bpf_map, keys)

    def map_mapped_writable(self, bpf_map: Any) -> None:
        """Another process may now write the map's values in place: persistence watches it."""
        if self.persistence is not None:
            self.persistence.watch_memory(bpf_map)

    def program_ran(self, prog: Any) -> None:
        """A program ran: the maps it can write may have changed."""
        if self.persistence is not None:
            self.persistence.program_ran(prog)

    def pin_paths(self, obj: BpfObject, caller: Caller | None = None) -> list[str]:
        """Where obj is pinned, as caller could look it up (None: root, everywhere)."""
        return self.fs.pin_paths(obj, caller or ROOT)

    @staticmethod
    def caller(conn: Connection) -> Caller:
        """The filesystem's view of a control-socket caller."""
        return Caller(conn.peer.uid, conn.peer.gid, 0, conn.peer.groups())

    def run_env(self, conn: Connection, options: dict) -> vm.RunEnv:
        """The emulated kernel state of a test run: the caller's identity as `current`,
        trace output into the trace ring; the rest from the caller's options."""
        return vm.RunEnv.from_options(options, pid=conn.peer.pid, uid=conn.peer.uid,
                                      gid=conn.peer.gid, trace=self.trace.write)

    # -- lifetime -----------------------------------------------------------------------------
    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        listener = self._listen()
        try:
            if self.persistence is not None:
                self.persistence.restore()
            async with trio.open_nursery() as nursery:
                if self.persistence is not None:
                    await nursery.start(self.persistence.run)
                await nursery.start(self.fds.run)
                self.server = Server(self, listener)
                await nursery.start(self.server.serve)
                await nursery.start(self.fs.run)
                if self.config.mountpoint:
                    await self.fs.mount_default(self.config.mountpoint)
                if self.config.seccomp_agent:
                    nursery.start_soon(self.run_seccomp_agent, self.config.seccomp_agent)
                nursery.start_soon(self.reap_lingering_memory)
                self.ready.set()
                sdnotify.notify("READY=1", f"STATUS=serving on {self.config.socket_path}")
                log.info("bpffsd %s ready on %s", VERSION, self.config.socket_path)
                task_status.started(self)
        finally:
            sdnotify.notify("STOPPING=1")
            listener.close()
            self._unlink_socket()

    async def reap_lingering_memory(self) -> None:
        """Freed maps whose memory a client may still map (Store.lingering) stay charged
        until it lets go: looked at every LINGER_PROBE_SECONDS (a probe is one fcntl)."""
        while True:
            await trio.sleep(LINGER_PROBE_SECONDS)
            if self.store.lingering:
                self.store.reap_lingering()

    async def run_seccomp_agent(self, path: str) -> None:
        """Keep the seccomp agent running: a worker process, since it is a client of ours (it
        acts with each container caller's credentials) and the daemon loads no client code.
        One that dies is restarted; containers it served lose their supervisor (bpf() is
        ENOSYS for them), containers started later are served."""
        argv = [*SECCOMP_AGENT, "--listen", path, "--socket", self.config.socket_path]
        pause = SECCOMP_AGENT_RESTART_PAUSE
        while True:
            started = trio.current_time()
            process = await trio.lowlevel.open_process(
                argv + (["-v"] if log.isEnabledFor(logging.INFO) else []), env=worker_env())
            try:
                code = await process.wait()
            finally:
                with trio.CancelScope(shield=True):
                    if process.returncode is None:
                        process.terminate()
                        await process.wait()
            # one that keeps failing at start is retried less and less often
            quick = trio.current_time() - started < SECCOMP_AGENT_QUICK_DEATH
            pause = min(pause * 2, SECCOMP_AGENT_MAX_PAUSE) if quick \
                else SECCOMP_AGENT_RESTART_PAUSE
            log.warning("the seccomp agent on %s exited with %s; restarting in %g s", path,
                        code, pause)
            await trio.sleep(pause)

    def _listen(self) -> socket.socket:
        activated = sdnotify.listen_fds()
        if activated:
            return activated[0]
        path = self.config.socket_path
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        if os.path.exists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise BpfError(errno.EEXIST, f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(path)
                raise BpfError(errno.EADDRINUSE, f"a bpffsd already serves {path}")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)  # stale socket of a daemon that died
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        listener.bind(path)
        os.chmod(path, 0o666)  # every caller may connect; each operation checks SO_PEERCRED
        listener.listen(1024)
        self._owns_socket = True
        return listener

    def _unlink_socket(self) -> None:
        if self._owns_socket:
            try:
                os.unlink(self.config.socket_path)
            except OSError:
                pass
