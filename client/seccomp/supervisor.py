"""The supervisor: start a command under the filter and answer its notifications.

The supervisor is an ordinary bpffsd client (under `bpffs exec`, one control connection with
the calling user's credentials, which are exactly the target's: the same user started both;
the seccomp agent connects as each caller instead), so the daemon needs no change. One thread
serves one listener: a notification is read, handed to handlers.handle, and answered (SEND,
SEND with CONTINUE, or ADDFD with SEND for a new fd, which is then closed here: the target
holds the only copy, so close and exit drop the reference as they would a kernel fd).
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections import defaultdict

from bpffs.client.sync import Client

from . import filter as seccomp_filter
from . import handlers
from .notify import Listener, Notification, install_filter
from .target import Gone, Target, Threads

EXEC_FAILED = 127  # the shell's status for a command that was not found
CANNOT_RUN = 126  # ... and for one that could not be run
INTERNAL_ERROR = errno.EIO  # what a target sees when the supervisor itself fails


def spawn(argv: list[str], program: bytes) -> tuple[int, int]:
    """Fork a child that installs the filter, hands us its listener over a socketpair and
    execs argv (searched on PATH). Returns (child pid, listener fd)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            ours.close()
            listener = install_filter(program)
            socket.send_fds(theirs, [b"L"], [listener])
            os.close(listener)  # the target keeps no handle on its own supervisor
            theirs.close()
        except BaseException as e:
            os.write(2, f"bpffs exec: cannot install the seccomp filter: {e}\n".encode())
            os._exit(CANNOT_RUN)
        try:
            os.execvp(argv[0], argv)
        except OSError as e:
            os.write(2, f"bpffs exec: {argv[0]}: {e.strerror}\n".encode())
            os._exit(EXEC_FAILED if e.errno == errno.ENOENT else CANNOT_RUN)
        except BaseException as e:
            os.write(2, f"bpffs exec: {argv[0]}: {e}\n".encode())
        os._exit(CANNOT_RUN)
    theirs.close()
    try:
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    finally:
        ours.close()
    if not fds:  # the child failed before the filter was in place; it exits 126
        return pid, -1
    return pid, fds[0]


class Supervisor:
    """Serves one listener with one bpffsd connection."""

    target_class: type[Target] = Target  # the seccomp agent's callers act as themselves
    name = "bpffs exec"  # who speaks in error messages (the agent: its container's name)

    def __init__(self, listener: Listener, client: Client, stats: bool = False):
        self.listener = listener
        self.ctx = handlers.Context(client)
        self.threads = Threads()
        self.stats: dict[str, list[float]] | None = defaultdict(list) if stats else None

    def serve_one(self) -> None:
        notif = self.listener.recv()
        if notif is None:
            return
        start = time.perf_counter_ns()
        outcome: handlers.Outcome | None = None
        try:
            target = self.target_class(self.listener, notif, self.threads)
            outcome = self.outcome(target, notif)
        except Gone:
            return
        except Exception as e:  # a bug here must not take the target down with it
            if os.environ.get("BPFFS_DEBUG"):
                traceback.print_exc()
            print(f"{self.name}: internal error serving syscall {notif.nr}:"
                  f" {type(e).__name__}: {e}", file=sys.stderr)
            outcome = handlers.Reply(error=INTERNAL_ERROR)
        finally:
            if self.stats is not None and outcome is not None:
                self.stats[_label(notif.nr, notif.args, outcome)].append(
                    (time.perf_counter_ns() - start) / 1000)
        self.answer(notif.id, outcome)

    def outcome(self, target: Target, notif: Notification) -> handlers.Outcome:
        """The answer to one notification, served over the one connection (the seccomp agent
        picks a connection made with each caller's own credentials)."""
        return handlers.handle(target, notif.nr, notif.args, self.ctx)

    def answer(self, nid: int, outcome: handlers.Outcome) -> None:
        if isinstance(outcome, handlers.Inject):
            try:
                self.listener.addfd_send(nid, outcome.fd, outcome.cloexec)
            except OSError as e:  # EMFILE: the caller's fd table is full, as the kernel says
                self.listener.send(nid, 0, e.errno or INTERNAL_ERROR)
            finally:
                os.close(outcome.fd)  # the target's copy is the reference now
        elif isinstance(outcome, handlers.Reply):
            self.listener.send(nid, outcome.val, outcome.error)
        else:
            self.listener.send_continue(nid)

    def run(self, child: int) -> int:
        """Serve until the child exits; its wait status."""
        pidfd = os.pidfd_open(child)
        poller = select.poll()
        poller.register(self.listener.fd, select.POLLIN)
        poller.register(pidfd, select.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if events.get(self.listener.fd, 0) & select.POLLIN:
                    self.serve_one()
                    continue
                if pidfd in events:
                    break
                if events.get(self.listener.fd, 0) & (select.POLLHUP | select.POLLERR):
                    poller.unregister(self.listener.fd)  # no task uses the filter any more
        finally:
            os.close(pidfd)
        _, status = os.waitpid(child, 0)
        return status

    def close(self) -> None:
        self.threads.close()
        self.listener.close()

    def report(self) -> None:
        """Per-syscall counts and supervisor time (BPFFS_EXEC_STATS=1), on stderr."""
        if not self.stats:
            return
        for label, times in sorted(self.stats.items()):
            times.sort()
            print(f"bpffs exec: {label}: n={len(times)} p50 {times[len(times) // 2]:.1f} us"
                  f" max {times[-1]:.1f} us", file=sys.stderr)


def _label(nr: int, args: tuple[int, ...], outcome: handlers.Outcome) -> str:
    from bpffs.vm.uapi import Cmd

    from .abi import Nr

    name = Nr(nr).name if nr in Nr._value2member_map_ else str(nr)
    if nr == Nr.bpf:
        cmd = args[0] & 0xFFFFFFFF
        name += f"({Cmd(cmd).name if cmd in Cmd._value2member_map_ else cmd})"
    if isinstance(outcome, handlers.Reply) and outcome.error:
        name += f" -{errno.errorcode.get(outcome.error, outcome.error)}"
    elif outcome is handlers.CONTINUE:
        name += " continue"
    return name


def exit_code(status: int) -> int:
    """The child's wait status as a shell reports it (128 + signal when killed)."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def run(argv: list[str], socket_path: str | None = None) -> int:
    """`bpffs exec`: run argv with bpf() and friends answered by bpffsd; its exit status."""
    client = Client(socket_path)  # reach the daemon before starting anything
    try:
        child, fd = spawn(argv, seccomp_filter.build())
        if fd < 0:
            return exit_code(os.waitpid(child, 0)[1])
        forward = {sig: signal.signal(sig, lambda s, _f: os.kill(child, s))
                   for sig in (signal.SIGTERM, signal.SIGHUP)}
        ignored = {sig: signal.signal(sig, signal.SIG_IGN)  # the terminal sends them to both
                   for sig in (signal.SIGINT, signal.SIGQUIT)}
        sup = Supervisor(Listener(fd), client, stats=bool(os.environ.get("BPFFS_EXEC_STATS")))
        try:
            status = sup.run(child)
        finally:
            sup.close()
            for sig, old in {**forward, **ignored}.items():
                signal.signal(sig, old)
        sup.report()
        return exit_code(status)
    finally:
        client.close()
