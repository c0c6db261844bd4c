"""`bpffsd`: start the daemon. With no options it picks a working default: as root the control
socket /run/bpffsd/control.sock and a mount at /sys/fs/bpf, or at /run/bpffsd/bpf where the
kernel's own bpffs is mounted at /sys/fs/bpf (every systemd host: ours must never hide it);
otherwise per-user paths. With --detach it returns once the daemon serves, and the daemon logs
to bpffsd.log beside its socket."""

from __future__ import annotations

import argparse
import errno
import importlib.util
import logging
import os
import resource
import signal
import socket
import stat
import sys
from collections.abc import Callable, Iterator
from typing import Any

import trio

from bpffs import paths, protocol

from . import limits, logfmt, sdnotify
from .daemon import VERSION, Config, Daemon
from .persist import statedir

log = logging.getLogger(__name__)

LOG_NAME = "bpffsd.log"  # --detach's log, beside the socket
PROBE_TIMEOUT = 5.0  # seconds a daemon already on our socket path has to answer a hello


class StartupError(Exception):
    """A reason not to start, told in one line (never a traceback)."""


def non_negative(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"{text} is negative")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid ... value" error
    return parse


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bpffsd", description=__doc__)
    p.add_argument("--socket", default=paths.default_socket(),
                   help="control socket path (default: %(default)s; env BPFFS_SOCKET)")
    p.add_argument("--mount", metavar="DIR",
                   help="mount the default instance here (default: as root /sys/fs/bpf, or"
                   f" {paths.SYSTEM_ALT_MOUNT} where the kernel's bpffs is mounted at"
                   " /sys/fs/bpf; otherwise $XDG_RUNTIME_DIR/bpffsd/bpf or /tmp/bpffsd-UID/bpf)")
    p.add_argument("--no-mount", action="store_true", help="start without mounting anything")
    p.add_argument("--shadow-kernel-bpffs", action="store_true",
                   help="let --mount cover a kernel bpffs mount (refused otherwise: its pins"
                   " would be hidden from every tool while bpffsd runs)")
    p.add_argument("--state-dir", default=paths.default_state_dir(),
                   help="where named instances persist (default: %(default)s)")
    p.add_argument("--no-persist", action="store_true",
                   help="keep nothing across restarts (no state directory)")
    p.add_argument("--persist-interval", type=non_negative(float),
                   default=Config.persist_interval,
                   metavar="SECONDS",
                   help="map writes made by programs persist within this time (default 0.1)")
    p.add_argument("--memory-limit", type=non_negative(int), default=Config.memory_limit,
                   metavar="BYTES",
                   help="cap on memory all objects together may charge (default: 1 GiB)")
    # Per-uid limits (bpffsd/limits.py; root is never refused).
    p.add_argument("--max-connections-per-uid", type=int, default=limits.MAX_CONNECTIONS_PER_UID,
                   metavar="N", help="control connections one user may hold (default %(default)s)")
    p.add_argument("--max-fds-per-uid", type=int, default=limits.MAX_FDS_PER_UID, metavar="N",
                   help="object fds one user may hold open (default %(default)s)")
    p.add_argument("--max-parked-per-uid", type=int, default=limits.MAX_PARKED_PER_UID,
                   metavar="N", help="requests of one user that may wait at once, e.g."
                   " trace_read (default %(default)s)")
    p.add_argument("--hello-timeout", type=float, default=limits.HELLO_TIMEOUT,
                   metavar="SECONDS", help="close connections that have not said hello by"
                   " then (default %(default)s)")
    p.add_argument("--root-reserve", type=int, default=limits.ROOT_RESERVE, metavar="N",
                   help="daemon fds only root may use (default %(default)s)")
    p.add_argument("--max-message-bytes", type=int, default=limits.MAX_MESSAGE_BYTES,
                   metavar="BYTES", help="largest request a non-root user may send"
                   " (default %(default)s)")
    p.add_argument("--max-reply-bytes-per-uid", type=int,
                   default=limits.MAX_REPLY_BYTES_PER_UID, metavar="BYTES",
                   help="bytes of large replies one user may leave unread before its"
                   " batch requests are refused (default %(default)s)")
    p.add_argument("--max-fs-nodes-per-uid", type=int, default=limits.MAX_FS_NODES_PER_UID,
                   metavar="N", help="bpffs entries one user may make (default %(default)s)")
    p.add_argument("--max-symlink-bytes-per-uid", type=int, metavar="BYTES",
                   default=limits.MAX_SYMLINK_BYTES_PER_UID,
                   help="bytes of bpffs symlink targets one user may make (default %(default)s)")
    p.add_argument("--seccomp-agent", metavar="PATH",
                   help="serve container runtimes' seccomp notify on this socket (the"
                   " profile's listenerPath): bpf() in their containers comes to bpffsd")
    p.add_argument("--detach", action="store_true",
                   help="run in the background; return once the daemon is ready")
    p.add_argument("--log-file", metavar="FILE",
                   help=f"append log lines here (default: standard error; with --detach,"
                   f" {LOG_NAME} in the socket's directory)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("--version", action="version", version=f"bpffsd {VERSION}")
    return p.parse_args(argv)


def raise_fd_limit() -> None:
    """Every object fd costs the daemon one socket: allow as many as the hard limit does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- logging ------------------------------------------------------------------------------------
# The formatters live in logfmt, shared with the mount workers (their lines go to our stderr).
def setup_logging(verbose: int) -> None:
    logfmt.setup(logging.WARNING - 10 * min(verbose, 2))


# -- checks before starting ---------------------------------------------------------------------
def choose_mount(args: argparse.Namespace) -> str | None:
    """The default instance's mountpoint. The default never covers a kernel bpffs, and an
    explicit --mount over one is refused unless --shadow-kernel-bpffs says so."""
    if args.no_mount:
        return None
    if args.mount is None:
        mount = paths.default_mount()
        if os.geteuid() == 0 and mount == paths.SYSTEM_ALT_MOUNT:
            log.warning("the kernel's bpffs is mounted at %s (systemd mounts it at boot): not"
                        " covering it, mounting at %s instead (--mount DIR to choose)",
                        paths.SYSTEM_MOUNT, mount)
        return mount
    if paths.kernel_bpffs_at(args.mount) and not args.shadow_kernel_bpffs:
        raise StartupError(
            f"{args.mount} is a kernel bpffs mount (on a systemd host, PID 1 mounts one at"
            " /sys/fs/bpf at boot): mounting over it would hide its pins from every tool."
            f" Mount elsewhere (--mount DIR; without --mount, root's default is then"
            f" {paths.SYSTEM_ALT_MOUNT}), or pass --shadow-kernel-bpffs to cover it anyway")
    return args.mount


def check_socket_path(path: str) -> None:
    """The path must fit in sockaddr_un (the kernel's limit is 107 bytes and a NUL)."""
    if len(os.fsencode(path)) > 107:
        raise StartupError(f"the socket path {path} is too long for a Unix socket (at most 107"
                           " bytes): choose a shorter --socket")


def check_not_serving(path: str) -> None:
    """Refuse, in one line naming its pid, to start where another bpffsd already serves."""
    if sdnotify.activated():
        return  # systemd listens there on our behalf and hands us the socket
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise StartupError(f"{path} exists and is not a socket")
    except FileNotFoundError:
        return
    except OSError as e:
        raise StartupError(f"cannot use the socket path {path}: {e.strerror}") from None
    try:
        pid = serving_pid(path)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return  # a stale socket of a daemon that died: the daemon replaces it
        raise StartupError(f"something listens on {path} but does not answer as bpffsd"
                           f" ({e.strerror or e}); stop it or choose another --socket") from None
    raise StartupError(f"a bpffsd already serves {path} (pid {pid})")


def serving_pid(path: str) -> int | str:
    """The pid the daemon listening at `path` gives in answer to a hello (OSError if none
    answers so). A plain socket and bpffs.protocol: the daemon loads no client code."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(PROBE_TIMEOUT)
        sock.connect(path)
        sock.send(protocol.pack(["hello", protocol.PROTOCOL_VERSION, f"bpffsd/{os.getpid()}"]))
        data = sock.recv(protocol.INLINE_MAX)
    try:
        reply = protocol.unpack(data)
    except protocol.ProtocolError:  # not msgpack (b"": it hung up)
        reply = None
    if not isinstance(reply, list) or len(reply) < 2:
        raise OSError(errno.EPROTO, "its answer is not a bpffsd reply")
    if reply[0]:
        raise protocol.error_from_reply(reply)
    return reply[1].get("pid", "unknown") if isinstance(reply[1], dict) else "unknown"


def check_directory(path: str, what: str, mode: int = 0o755) -> None:
    """Create `path` (and its parents) if needed; refuse in one line if it is not a directory
    this process may write in."""
    try:
        if not os.path.isdir(path):
            if os.path.lexists(path):
                raise NotADirectoryError(errno.ENOTDIR, "it exists and is not a directory")
            os.makedirs(path, mode=mode, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as e:
        raise StartupError(f"{what} {path}: {e.strerror}") from None


def check_fuse_support() -> None:
    """The mount worker needs pyfuse3, which a client-only install leaves out."""
    if importlib.util.find_spec("pyfuse3") is None:
        raise StartupError("mounting needs pyfuse3, which this install lacks: install the"
                           " daemon extra (pip install 'bpffsd[daemon]', or run install.sh"
                           " without --client), or start with --no-mount")


def check_state_dir(path: str) -> None:
    """The persistence layer's own trust check (owner, mode, ancestors, no symlink), before
    anything is created: a refused state directory is never made or written."""
    try:
        os.close(statedir.open_state_dir(path))
    except OSError as e:
        raise StartupError(e.strerror) from None


def open_log(path: str) -> int:
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as e:
        raise StartupError(f"cannot open the log file {path}: {e.strerror}"
                           " (--log-file FILE)") from None


def explain(exc: BaseException) -> str:
    """One line for a failure to start or to run. Expected failures (OSError, BpfError: a
    mount refused, a path not writable) say what was wrong; anything else is a bug, logged
    with its traceback."""
    found = list(_leaves(exc))
    if all(isinstance(e, OSError) for e in found):
        return "; ".join(dict.fromkeys(_oserror_line(e) for e in found))
    log.error("internal error", exc_info=exc)
    first = next(e for e in found if not isinstance(e, OSError))
    return f"internal error: {type(first).__name__}: {first} (the log has the traceback)"


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _oserror_line(e: OSError) -> str:
    text = e.strerror or str(e)
    return f"{e.filename}: {text}" if e.filename else text


# -- running --------------------------------------------------------------------------------------
class Ready:
    """Tells the --detach parent, once, that the daemon serves (b"1") or why it could not
    (b"0" and one line)."""

    def __init__(self, fd: int | None):
        self.fd = fd

    def send(self, ok: bool, message: str = "") -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.write(fd, (b"1" if ok else b"0") + message.encode())
        except OSError:
            pass  # the parent is gone: nobody to tell
        finally:
            os.close(fd)


async def serve(config: Config, ready: Ready | None = None) -> None:
    daemon = Daemon(config)
    # Catch the signals before serving: the daemon answers (and says READY=1) before
    # daemon.run returns, and a SIGTERM then must still shut it down cleanly.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            if ready is not None:
                ready.send(True)
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def detach(log_fd: int, says: str) -> Ready:
    """Fork into the background; the parent waits until the child reports ready (or why not)
    and exits with its status, as mount helpers must. The child's stdin is /dev/null and its
    stdout and stderr (log lines, its mount workers' too) go to the log file."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read()
        if report.startswith(b"1"):
            print(f"bpffsd: running (pid {pid}); {says}")
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        why = report[1:].decode(errors="replace").strip()
        if not why:
            why = f"the daemon exited ({code}) before it was ready"
        print(f"bpffsd: {why}", file=sys.stderr)
        os._exit(code if code > 0 else 1)
    os.close(read_end)
    os.setsid()
    try:
        stdin = os.open(os.devnull, os.O_RDONLY)
    except OSError:  # a /dev without null (a bare container): an empty pipe reads as EOF too
        stdin, write_end_of_stdin = os.pipe()
        os.close(write_end_of_stdin)
    os.dup2(stdin, 0)
    os.close(stdin)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    return Ready(write_end)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.verbose)
    raise_fd_limit()
    log_path = args.log_file or (os.path.join(os.path.dirname(os.path.abspath(args.socket)),
                                              LOG_NAME) if args.detach else None)
    try:
        mountpoint = choose_mount(args)
        state_dir = None if args.no_persist else args.state_dir
        check_directory(os.path.dirname(os.path.abspath(args.socket)),
                        "cannot create the control socket in")
        check_socket_path(args.socket)
        if args.seccomp_agent:
            check_socket_path(args.seccomp_agent)
        check_not_serving(args.socket)
        if state_dir is not None:
            check_state_dir(state_dir)
        if mountpoint is not None:
            check_directory(mountpoint, "cannot mount at")
            check_fuse_support()
        log_fd = open_log(log_path) if log_path else None
    except StartupError as e:
        print(f"bpffsd: {e}", file=sys.stderr)
        return 1
    config = Config(socket_path=args.socket, mountpoint=mountpoint, state_dir=state_dir,
                    memory_limit=args.memory_limit, persist_interval=args.persist_interval,
                    seccomp_agent=args.seccomp_agent and os.path.abspath(args.seccomp_agent))
    config.limits = limits.LimitConfig(
        max_connections_per_uid=args.max_connections_per_uid,
        max_fds_per_uid=args.max_fds_per_uid, max_parked_per_uid=args.max_parked_per_uid,
        hello_timeout=args.hello_timeout, root_reserve=args.root_reserve,
        max_message_bytes=args.max_message_bytes,
        max_reply_bytes_per_uid=args.max_reply_bytes_per_uid,
        max_fs_nodes_per_uid=args.max_fs_nodes_per_uid,
        max_symlink_bytes_per_uid=args.max_symlink_bytes_per_uid)
    ready = None
    if log_fd is not None and args.detach:
        where = f"mounted at {mountpoint}" if mountpoint else "no mount"
        ready = detach(log_fd, f"socket {args.socket}, {where}; log {log_path}")
    elif log_fd is not None:  # --log-file in the foreground
        os.dup2(log_fd, 2)
        os.close(log_fd)
    setup_logging(args.verbose)  # stderr may be a log file now: timestamps again
    try:
        trio.run(serve, config, ready)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        message = explain(exc)
        if ready is not None:
            ready.send(False, message)
        print(f"bpffsd: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
