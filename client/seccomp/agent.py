"""The OCI seccomp agent: container runtimes hand their containers' listeners to bpffsd.

runc and crun, given a seccomp profile whose bpf() (and friends) action is SCMP_ACT_NOTIFY and
whose `listenerPath` names our socket, connect to it once per container and send the listener
fd (SCM_RIGHTS, named "seccompFd" in the message's "fds" list) with the container's state as
JSON (runtime-spec's ContainerProcessState), then hang up. Each listener is served by its own
thread with the supervisor and handlers `bpffs exec` uses, until no task uses the filter.

The agent usually runs as root, but a caller never acts with the agent's credentials: at each
notification its thread's ids are read from /proc/TID/status while it is blocked in the call
(a thread's credentials change only by its own action), and the call is served over a bpffsd
connection made with exactly those ids. The connection is made by the serving thread alone
taking them for the connect (raw setgroups/setresgid/setresuid change the calling thread only,
where libc's wrappers change every thread) and taking the agent's back at once, so bpffsd
reads them from SO_PEERCRED / SO_PEERGROUPS as for any client. Paths in bpf() are walked with
the caller's file-system ids in the same way. An agent that is not root can serve only
callers with its own ids; others get EPERM.

    python3 -m bpffs.client.seccomp.agent --listen PATH [--socket SOCK]
    python3 -m bpffs.client.seccomp.agent --profile PATH   # the OCI seccomp section to use
"""

from __future__ import annotations

import argparse
import array
import errno
import json
import logging
import os
import resource
import select
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from bpffs.client.sync import Client
from bpffs.vm.errors import BpfError

from . import abi, handlers
from . import filter as seccomp_filter
from .notify import Listener, Notification, syscall
from .supervisor import Supervisor
from .target import Target

log = logging.getLogger(__name__)

Identity = tuple[int, int, tuple[int, ...]]  # what bpffsd sees of a caller: euid, egid, groups


# -- credentials --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Credentials:
    """A thread's (real, effective, saved) uids and gids, its supplementary groups, and its
    file-system uid and gid (what the kernel walks paths and checks files with: the euid and
    egid unless the thread called setfsuid/setfsgid)."""

    uids: tuple[int, int, int]
    gids: tuple[int, int, int]
    groups: tuple[int, ...]
    fsuid: int
    fsgid: int

    @classmethod
    def of_status(cls, status: dict[bytes, bytes]) -> Credentials:
        """From a thread's /proc/TID/status (Target.status): ids as seen from our user
        namespace (a container's root in a user namespace is the host uid it maps to). Uid:
        and Gid: list real, effective, saved and file-system ids."""
        uid, gid = ([int(x) for x in status[key].split()] for key in (b"Uid", b"Gid"))
        return cls((uid[0], uid[1], uid[2]), (gid[0], gid[1], gid[2]),
                   tuple(sorted(int(x) for x in status.get(b"Groups", b"").split())),
                   uid[3], gid[3])

    @classmethod
    def own(cls) -> Credentials:
        """The calling thread's (setfs*id of ID_UNCHANGED only reads the current one)."""
        return cls(os.getresuid(), os.getresgid(), tuple(sorted(os.getgroups())),
                   syscall(abi.Nr.setfsuid, abi.ID_UNCHANGED),
                   syscall(abi.Nr.setfsgid, abi.ID_UNCHANGED))

    @property
    def effective(self) -> Identity:
        """What bpffsd sees of a connection (SO_PEERCRED, SO_PEERGROUPS): euid, egid, groups."""
        return self.uids[1], self.gids[1], self.groups

    @property
    def files(self) -> Identity:
        """What paths are walked and files checked with: fsuid, fsgid, groups."""
        return self.fsuid, self.fsgid, self.groups

    def __str__(self) -> str:
        fs = "" if (self.fsuid, self.fsgid) == (self.uids[1], self.gids[1]) \
            else f" (file-system uid {self.fsuid} gid {self.fsgid})"
        return f"uid {self.uids[1]} gid {self.gids[1]}{fs}"


def _set_groups(groups: tuple[int, ...]) -> None:
    buf = array.array("I", groups)
    syscall(abi.Nr.setgroups, len(groups), buf.buffer_info()[0] if groups else 0)


def _set_fs_ids(uid: int, gid: int) -> None:
    """setfsuid/setfsgid report no error: the ids are read back (-1 changes nothing)."""
    syscall(abi.Nr.setfsgid, gid)
    syscall(abi.Nr.setfsuid, uid)
    if (syscall(abi.Nr.setfsuid, abi.ID_UNCHANGED),
            syscall(abi.Nr.setfsgid, abi.ID_UNCHANGED)) != (uid, gid):
        raise OSError(errno.EPERM, f"cannot take file-system ids {uid}:{gid}")


def _effective_caps() -> bytes:
    """This thread's CapEff line: a change of ids may drop capabilities."""
    with open("/proc/thread-self/status", "rb") as f:
        return next(line for line in f if line.startswith(b"CapEff:"))


@contextmanager
def acting_as(creds: Credentials, files_only: bool = False) -> Iterator[None]:
    """This thread alone takes creds' ids for the block, and the agent's back after (raw
    syscalls change the calling thread only; libc's wrappers change every thread). With
    files_only, only the ids files are checked against (fsuid, fsgid, groups): root keeps its
    other powers, CAP_SYS_PTRACE to reach /proc/TID/root among them. A thread that cannot
    take the agent's ids back ends the agent: it must never serve anyone with a caller's."""
    own = Credentials.own()
    theirs, ours = (creds.files, own.files) if files_only else (creds.effective, own.effective)
    if theirs == ours:  # a caller that setfsuid'd away from its euid is walked as its fsuid
        yield
        return
    caps = _effective_caps()
    if own.uids[1] != 0:
        raise BpfError(errno.EPERM, f"the seccomp agent runs as uid {own.uids[1]}: it cannot"
                       f" act for a caller with {creds}")
    try:
        _set_groups(creds.groups)
        if files_only:
            _set_fs_ids(creds.fsuid, creds.fsgid)
        else:  # the saved uid stays 0: the way back to root
            syscall(abi.Nr.setresgid, *creds.gids)
            syscall(abi.Nr.setresuid, creds.uids[0], creds.uids[1], 0)
        yield
    finally:
        try:  # uids first: root's capabilities come back with them
            if files_only:
                _set_fs_ids(own.fsuid, own.fsgid)
            else:
                syscall(abi.Nr.setresuid, *own.uids)
                syscall(abi.Nr.setresgid, *own.gids)
            _set_groups(own.groups)
            if Credentials.own() != own or _effective_caps() != caps:
                raise OSError(errno.EPERM, "credentials not restored")
        except OSError:
            os.write(2, b"bpffs seccomp agent: cannot take back its credentials\n")
            os._exit(os.EX_SOFTWARE)


def connect_as(creds: Credentials, socket_path: str | None) -> Client:
    """A bpffsd connection bpffsd sees as made by creds (SO_PEERCRED and SO_PEERGROUPS are
    taken at connect; the hello's round trip has bpffsd read them before we return)."""
    with acting_as(creds):
        return Client(socket_path)


# -- one container ------------------------------------------------------------------------------
class ContainerTarget(Target):
    creds: Credentials  # the caller's, read at this notification (ContainerSupervisor.outcome)

    def same_credentials(self) -> bool:
        """Always: the call is served over a connection made with the ids the caller has now,
        not with the agent's."""
        return True

    def resolve(self, path: bytes, dirfd: int = abi.AT_FDCWD, follow: bool = True) -> int:
        """Walked with the caller's file-system ids, so that directories it may not search
        stay closed to it (bpffsd checks the pin itself against the connection's ids)."""
        with acting_as(self.creds, files_only=True):
            return super().resolve(path, dirfd, follow)


class ContainerSupervisor(Supervisor):
    """Serves one container's listener, with one bpffsd connection per credential set its
    callers have (the agent's own connection first: it also proves bpffsd is there)."""

    target_class = ContainerTarget

    def __init__(self, listener: Listener, socket_path: str | None, name: str):
        super().__init__(listener, Client(socket_path))
        self.socket_path = socket_path
        self.name = name
        self.contexts: dict[Identity, handlers.Context] = {Credentials.own().effective: self.ctx}

    def context_for(self, target: Target) -> handlers.Context:
        """The Context of the caller's credentials, read while it waits for our answer."""
        try:
            creds = Credentials.of_status(target.status())
        except (OSError, KeyError, ValueError, IndexError):
            target.check()  # gone: no answer at all
            raise BpfError(errno.EPERM, f"cannot read the credentials of thread {target.tid}"
                           ) from None
        target.check()  # what was read is the waiting caller's (its TID was not reused)
        if isinstance(target, ContainerTarget):
            target.creds = creds
        ctx = self.contexts.get(creds.effective)
        if ctx is None or ctx.client.closed:
            if len(self.contexts) >= abi.AGENT_CONNECTIONS:
                self._drop(next(iter(self.contexts)))
            ctx = handlers.Context(connect_as(creds, self.socket_path))
            self.contexts[creds.effective] = ctx
        return ctx

    def outcome(self, target: Target, notif: Notification) -> handlers.Outcome:
        try:
            ctx = self.context_for(target)
        except OSError as e:  # bpffsd unreachable, or a caller the agent cannot act for
            log.warning("container %s: %s", self.name, e)
            return handlers.Reply(error=e.errno or errno.EPERM) if notif.nr == abi.Nr.bpf \
                else handlers.CONTINUE
        return handlers.handle(target, notif.nr, notif.args, ctx)

    def _drop(self, key: Identity) -> None:
        ctx = self.contexts.pop(key)
        if ctx is not self.ctx:
            ctx.client.close()

    def serve(self) -> None:
        """Until no task uses the filter any more (the listener hangs up)."""
        poller = select.poll()
        poller.register(self.listener.fd, select.POLLIN)
        while True:
            events = dict(poller.poll()).get(self.listener.fd, 0)
            if events & select.POLLIN:
                self.serve_one()
            elif events & (select.POLLHUP | select.POLLERR):
                return

    def close(self) -> None:
        for key in list(self.contexts):
            self._drop(key)
        self.ctx.client.close()
        super().close()


# -- the runtimes' socket -----------------------------------------------------------------------
def receive(conn: socket.socket) -> tuple[int, dict[str, Any]]:
    """(listener fd, container state) from one runtime connection: JSON up to its end (or
    the runtime's hang-up), the fds with it. ValueError when it named no seccompFd; every
    other fd received is closed."""
    conn.settimeout(abi.OCI_RECEIVE_TIMEOUT)  # a silent peer must not stall the others
    data, fds, state, flags = b"", [], None, 0
    try:
        while state is None and len(data) < abi.OCI_STATE_MAX:
            chunk, more, more_flags, _ = socket.recv_fds(conn, abi.OCI_STATE_MAX - len(data),
                                                         abi.OCI_FDS_MAX)
            fds += more
            flags |= more_flags
            data += chunk
            try:
                state = json.loads(data)
            except ValueError:
                if not chunk:
                    break
        listener = fds[state["fds"].index(abi.OCI_SECCOMP_FD_NAME)]  # type: ignore[index]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        for fd in fds:
            os.close(fd)
        if isinstance(e, OSError):
            raise
        cut = " (the kernel dropped fds: more than we take, or the agent is out of fds)" \
            if flags & socket.MSG_CTRUNC else ""
        raise ValueError(f"no {abi.OCI_SECCOMP_FD_NAME} in the runtime's message{cut}"
                         ) from None
    for fd in fds:
        if fd != listener:
            os.close(fd)
    return listener, state


def container_name(state: dict[str, Any]) -> str:
    inner = state.get("state") or {}
    return f"{inner.get('id', '?')} (pid {state.get('pid', inner.get('pid', '?'))})"


def supervise(listener: int, state: dict[str, Any], socket_path: str | None) -> None:
    """Serve one container until its tasks are gone (a thread's body). The listener is ours
    to close until the supervisor holds it: one nobody reads would leave the container's
    notified calls hanging for ever, where a closed one fails them with ENOSYS."""
    name = container_name(state)
    sup: ContainerSupervisor | None = None
    try:
        sup = ContainerSupervisor(Listener(listener), socket_path, name)
    except Exception as e:  # bpffsd unreachable, or its hello answered with nonsense
        log.error("container %s: not supervised: %s: %s", name, type(e).__name__, e)
        return
    finally:
        if sup is None:
            os.close(listener)
    log.info("container %s: supervising", name)
    try:
        sup.serve()
    finally:
        sup.close()
        log.info("container %s: done", name)


def listen(path: str) -> socket.socket:
    """The runtimes' socket at path (a stale one replaced), for root only: a runtime runs as
    root, and whoever connects chooses which listener we serve."""
    if os.path.exists(path) and stat.S_ISSOCK(os.lstat(path).st_mode):
        os.unlink(path)  # a stale one (a restarted agent's)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o077)
    try:
        server.bind(path)
    finally:
        os.umask(old)
    server.listen(abi.AGENT_BACKLOG)
    return server


def serve(server: socket.socket, socket_path: str | None) -> None:
    """Accept runtimes for ever, one serving thread per container. An accept that fails
    (EMFILE while the containers hold all our fds, ECONNABORTED) is retried after a pause,
    logged once until one succeeds: ending the agent would end every container's
    supervision. The runtime waiting in the backlog is served once fds are free again."""
    failing: int | None = None  # the errno of the failures logged, until an accept succeeds
    while True:
        try:
            conn, _ = server.accept()
        except OSError as e:
            if e.errno != failing:
                failing = e.errno
                log.error("cannot accept a runtime's connection: %s (retrying every %g s)",
                          e.strerror or e, abi.AGENT_ACCEPT_PAUSE)
            time.sleep(abi.AGENT_ACCEPT_PAUSE)
            continue
        if failing is not None:
            failing = None
            log.warning("accepting runtimes' connections again")
        with conn:
            try:
                listener, state = receive(conn)
            except (OSError, ValueError) as e:
                log.warning("a runtime's message was refused: %s", e)
                continue
        name = container_name(state)
        try:
            threading.Thread(target=supervise, args=(listener, state, socket_path),
                             name=f"container {name}", daemon=True).start()
        except RuntimeError as e:  # no thread to be had: ENOSYS for it, not a hang
            log.error("container %s: not supervised: %s", name, e)
            os.close(listener)


def raise_fd_limit() -> None:
    """RLIMIT_NOFILE's soft limit up to the hard one: each container costs us fds (its
    listener, a bpffsd connection per credential set, up to Threads.LIMIT cached pidfds and
    mem fds), and the usual soft limit of 1024 is soon reached."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as e:  # a hard limit of RLIM_INFINITY is above nr_open
        log.warning("cannot raise the open files limit from %d: %s", soft, e)


# -- the profile --------------------------------------------------------------------------------
def oci_seccomp(listener_path: str, metadata: str = "") -> dict[str, Any]:
    """The OCI config's linux.seccomp section sending what filter.build sends to the agent
    at listener_path (everything else allowed): for config.json, podman/docker's
    --security-opt seccomp=FILE, or a Kubernetes Localhost profile."""
    rules: list[dict[str, Any]] = [
        {"names": [nr.name for nr in seccomp_filter.ALWAYS], "action": "SCMP_ACT_NOTIFY"}]
    rules += [{"names": [nr.name], "action": "SCMP_ACT_NOTIFY",
               "args": [{"index": index, "value": abi.OPEN_NOT_PLAIN_READ, "valueTwo": 0,
                         "op": "SCMP_CMP_MASKED_EQ"}]}
              for nr, index in seccomp_filter.PLAIN_READ_OPENS.items()]
    section: dict[str, Any] = {"defaultAction": "SCMP_ACT_ALLOW",
                               "architectures": ["SCMP_ARCH_X86_64"],
                               "listenerPath": listener_path, "syscalls": rules}
    if metadata:
        section["listenerMetadata"] = metadata
    return section


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bpffs.client.seccomp.agent",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", metavar="PATH", help="the profiles' listenerPath")
    p.add_argument("--socket", help="bpffsd's control socket (default: as the client finds it)")
    p.add_argument("--profile", metavar="PATH",
                   help="print the OCI seccomp section for listenerPath PATH, and exit")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.profile:
        print(json.dumps(oci_seccomp(args.profile), indent=2))
        return 0
    if not args.listen:
        p.error("--listen PATH or --profile PATH is required")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="bpffs seccomp agent: %(message)s")
    raise_fd_limit()
    try:
        Client(args.socket).close()  # fail now, not at the first container
    except OSError as e:
        print(f"bpffs seccomp agent: {e}", file=sys.stderr)
        return 1
    server = listen(args.listen)
    signal.signal(signal.SIGTERM, lambda _s, _f: sys.exit(0))  # the daemon stops us so
    log.info("listening on %s", args.listen)
    try:
        serve(server, args.socket)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        os.unlink(args.listen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
