"""One FUSE mount, as the daemon sees it: the worker process that serves it, the requests it
forwards, the cache invalidations sent back, and what happens when the worker dies.

A worker that exits cleanly means the mount was unmounted. A worker that crashes (SIGKILL
included) leaves a dead mount ("Transport endpoint is not connected"); the daemon detaches it
in its namespace and starts a fresh worker on the same mountpoint, showing the same tree,
since the tree never lived in the worker. Restarts are rate-limited.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from bpffs import protocol
from bpffs.vm.errors import BpfError

from ..pipeline import Pipeline, Request
from ..workers import module_command, worker_env
from .fuse_ops import REQUESTS, FuseOps, PendingPin
from .tree import Caller, Dir, show

if TYPE_CHECKING:
    from . import Filesystems
    from .instance import Instance

log = logging.getLogger(__name__)

WORKER = module_command("bpffs.daemon.fs.worker")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
MAX_RESTARTS = 5  # within RESTART_WINDOW seconds; then the mount is given up
RESTART_WINDOW = 60.0
# How long obj_pin waits for a worker to create a pin through its mount (see
# pin_through_mount) before making it directly, without the inotify event.
PIN_THROUGH_MOUNT_TIMEOUT = 5.0
INVALIDATIONS_PER_MESSAGE = 512


class Mount:
    """One mount, and the Channel (pipeline.py) its worker's requests come by: a worker the
    daemon started, whose messages are decoded without the control socket's per-user
    bounds."""

    message_limit = protocol.MESSAGE_MAX
    objects_max = None  # no object budget (protocol.unpack_request)

    def __init__(self, fs: Filesystems, instance: Instance, mountpoint: bytes, ns_fd: int,
                 ns_ino: int, owner: tuple[int, int], options: str = ""):
        self.fs = fs
        self.instance = instance
        self.mountpoint = mountpoint
        self.ns_fd = ns_fd  # owned: kept to restart or detach the mount in its namespace
        self.ns_ino = ns_ino
        self.owner = owner  # (uid, gid) of whoever asked for the mount
        self.options = options
        self.dev: int | None = None
        self.ops = FuseOps(instance, fs.object_id)
        self.stopping = False
        self.process: trio.Process | None = None
        self._rpc: socket.socket | None = None
        self._notify: socket.socket | None = None
        self._create: socket.socket | None = None  # pins for the worker to make (see below)
        self._pending: list[list[Any]] = []
        self._flush = trio.Event()
        self._sending = False  # _send_invalidations holds a batch it could not send yet
        self._restarts: deque[float] = deque()

    def describe(self) -> str:
        return show(self.mountpoint)

    @property
    def where(self) -> str:
        return f"in mount {self.describe()}"

    def call(self, request: Request, handler: Callable[..., Any]) -> Any:
        with self.fs.origin(self):  # its own changes need no invalidation in this mount
            return handler(*request.args)

    # -- lifetime -----------------------------------------------------------------------------
    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Own one worker at a time; report started once the first one has mounted (or raise
        the reason it could not)."""
        started = False
        try:
            while True:
                await self._start()
                if not started:
                    task_status.started(self)
                    started = True
                code = await self._serve()
                if self.stopping or code == 0:
                    return
                log.warning("mount worker for %s died (exit %s); restarting", self.describe(),
                            code)
                await self._detach()
                if not self._may_restart():
                    log.error("mount %s crashed %d times in %ds; giving up", self.describe(),
                              MAX_RESTARTS, RESTART_WINDOW)
                    return
        finally:
            with trio.CancelScope(shield=True):
                await self._shutdown()
                if started:
                    self.fs.mount_gone(self)
                os.close(self.ns_fd)

    def _may_restart(self) -> bool:
        now = time.monotonic()
        self._restarts.append(now)
        while self._restarts and self._restarts[0] < now - RESTART_WINDOW:
            self._restarts.popleft()
        return len(self._restarts) <= MAX_RESTARTS

    async def _start(self) -> None:
        rpc, rpc_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        notify, notify_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        create, create_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = await trio.lowlevel.open_process(
                [*WORKER, "--rpc-fd", str(rpc_child.fileno()), "--notify-fd",
                 str(notify_child.fileno()), "--create-fd", str(create_child.fileno()),
                 "--ns-fd", str(self.ns_fd), "--owner-uid",
                 str(self.owner[0]), "--owner-gid", str(self.owner[1]), "--options",
                 self.options, os.fsdecode(self.mountpoint)],
                pass_fds=(rpc_child.fileno(), notify_child.fileno(), create_child.fileno(),
                          self.ns_fd),
                env=worker_env())
        finally:
            rpc_child.close()
            notify_child.close()
            create_child.close()
        rpc.setblocking(False)
        notify.setblocking(False)
        create.setblocking(False)
        self._rpc, self._notify, self._create = rpc, notify, create
        with trio.move_on_after(START_TIMEOUT):
            await trio.lowlevel.wait_readable(rpc)
        try:
            first = protocol.unpack(rpc.recv(protocol.INLINE_MAX)) if _readable(rpc) else None
        except (OSError, protocol.ProtocolError):
            first = None
        if not first or first[0] != "ready":
            await self._shutdown()
            if first and first[0] == "failed":
                raise BpfError(first[1], f"cannot mount {self.describe()}: {first[2]}")
            raise BpfError(errno.EIO, f"the mount worker for {self.describe()} did not start")
        self.dev = first[1]
        self.fs.mount_live(self)

    async def _serve(self) -> int:
        """Serve the worker's requests until it goes; returns its exit status."""
        assert self._rpc is not None and self.process is not None
        rpc = self._rpc  # stop() may clear self._rpc while a reply awaits durability
        persistence = self.fs.daemon.persistence
        pipeline = Pipeline(REQUESTS, self.ops.handlers(), persistence)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_invalidations)
            inbox = protocol.Inbox()  # one reused receive buffer (see Inbox)
            while (message := await self._receive(rpc, inbox)) is not None:
                outcome = pipeline.serve(self, *message)
                if outcome.journaled:  # shell tools get durability too
                    assert persistence is not None
                    outcome = outcome.durable(await persistence.durable(outcome.mark))
                if not self._reply(rpc, outcome.reply):
                    break
            nursery.cancel_scope.cancel()
        self.fs.mount_down(self)
        self.ops.release_all()
        return await self.process.wait()

    @staticmethod
    async def _receive(rpc: socket.socket, inbox: protocol.Inbox
                       ) -> tuple[bytes, list, int] | None:
        """The worker's next request, as recvmsg returns it; None once the worker is gone
        (or shutdown closed its socket)."""
        while True:
            try:
                message = inbox.recvmsg(rpc)
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_readable(rpc)
                except trio.ClosedResourceError:
                    return None
                continue
            except OSError:
                return None
            return message if message[0] else None

    def _reply(self, rpc: socket.socket, reply: bytes | None) -> bool:
        """Send the worker a reply (FuseOps handlers always make one); False once it is
        gone."""
        assert reply is not None
        try:
            protocol.send_message(rpc, reply)
        except BlockingIOError:
            log.warning("mount worker for %s is not reading replies", self.describe())
        except OSError:
            return False
        return True

    async def _shutdown(self) -> None:
        """Ask the worker to unmount (by closing its notification socket); kill it if it
        does not go, and detach whatever it left behind."""
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        if self._create is not None:
            self._create.close()
            self._create = None
        if self.process is not None and self.process.returncode is None:
            with trio.move_on_after(STOP_TIMEOUT):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
                await self._detach()
        if self._rpc is not None:
            trio.lowlevel.notify_closing(self._rpc)  # wakes _serve if it waits on it
            self._rpc.close()
            self._rpc = None

    async def _detach(self) -> None:
        """Lazily unmount a dead mount in its namespace."""
        result = await trio.run_process(
            [*WORKER, "--unmount", "--ns-fd", str(self.ns_fd), os.fsdecode(self.mountpoint)],
            pass_fds=(self.ns_fd,), check=False, capture_stderr=True)
        if result.returncode:
            log.warning("detaching dead mount %s failed: %s", self.describe(),
                        result.stderr.decode(errors="replace").strip())

    async def stop(self) -> None:
        self.stopping = True
        await self._shutdown()

    # -- pins made through the mount ----------------------------------------------------------
    def pin_path(self, parent: Dir, name: bytes) -> bytes | None:
        """Where the worker would create parent/name for pin_through_mount; None when it
        cannot (the worker gone, parent detached, the same pin already under way)."""
        if self._create is None or (parent.ino, name) in self.ops.pending:
            return None
        return self._path_in_mount(parent, name)

    async def pin_through_mount(self, parent: Dir, name: bytes, obj: Any, caller: Caller,
                                path: bytes) -> bool:
        """Have the worker create the pin at path (pin_path) with mknod() on the mount
        itself, so that the kernel fires IN_CREATE for inotify watchers (FUSE's entry
        notifications fire none). True when the pin was made so; False when the mount could
        not (gone, the path does not resolve there, the worker's own permissions,
        PIN_THROUGH_MOUNT_TIMEOUT): the caller makes it directly then. The tree's refusal
        (EEXIST, ...) is raised. The request goes on a socket of its own, read by a thread
        of the worker that does nothing else (worker.make_pins): one wake-up, where the
        invalidation stream cost a wake-up of the worker's event loop, a task and a hand-off
        to a thread (~100 us on a 2-core VM)."""
        key = (parent.ino, name)
        sock = self._create
        if sock is None or key in self.ops.pending:
            return False
        try:
            sock.send(protocol.pack([parent.ino, name, path]))
        except OSError as e:  # the worker is gone, or not keeping up: pin directly
            log.debug("pin through mount %s not asked: %s", self.describe(), e)
            return False
        pending = self.ops.pending[key] = PendingPin(obj, caller)
        try:
            with trio.move_on_after(PIN_THROUGH_MOUNT_TIMEOUT):
                await pending.done.wait()
        finally:
            del self.ops.pending[key]
        if pending.error is not None:
            raise pending.error
        return pending.node is not None

    def _path_in_mount(self, parent: Dir, name: bytes) -> bytes | None:
        """The path of parent/name as the worker sees it (None if parent is detached)."""
        parts = [name]
        node = parent
        while node is not self.instance.tree.root:
            up = node.parent
            if up is None:
                return None
            found = next((n for n, child in up.children.items() if child is node), None)
            if found is None:
                return None
            parts.append(found)
            node = up
        return b"/".join([self.mountpoint.rstrip(b"/"), *reversed(parts)])

    # -- cache invalidation -------------------------------------------------------------------
    def invalidate(self, items: list[list[Any]]) -> None:
        """Send the worker these items (fire and forget): at once when nothing is queued
        before them (the common case: no wake-up of _send_invalidations first), else
        queued behind the rest, in order."""
        sock = self._notify
        if (sock is not None and not self._pending and not self._flush.is_set()
                and not self._sending and len(items) <= INVALIDATIONS_PER_MESSAGE):
            try:
                sock.send(protocol.pack(items))
                return
            except BlockingIOError:
                pass
            except OSError as e:
                log.debug("invalidations for %s dropped: %s", self.describe(), e)
                return  # the worker is gone: _serve sees it exit
        self._pending.extend(items)
        self._flush.set()

    async def _send_invalidations(self) -> None:
        while True:
            await self._flush.wait()
            self._flush = trio.Event()
            pending, self._pending = self._pending, []
            sock = self._notify
            if sock is None:
                return
            self._sending = True  # invalidate() must not overtake this batch
            try:
                for start in range(0, len(pending), INVALIDATIONS_PER_MESSAGE):
                    payload = protocol.pack(pending[start:start + INVALIDATIONS_PER_MESSAGE])
                    while True:
                        try:
                            sock.send(payload)
                            break
                        except BlockingIOError:
                            await trio.lowlevel.wait_writable(sock)
                        except OSError as e:  # the worker is gone (unmounted, killed): _serve
                            log.debug("invalidations for %s dropped: %s", self.describe(), e)
                            return  # sees it exit and decides what follows
            finally:
                self._sending = False


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])
