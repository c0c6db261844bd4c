"""`bpffsd`: start the daemon. With no options it picks a working default: as root the control
socket /run/bpffsd/control.sock and a mount at /sys/fs/bpf; otherwise per-user paths."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import sys

import trio

from bpffs.client import paths

from . import __version__
from .daemon import Config, Daemon


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bpffsd", description=__doc__)
    p.add_argument("--socket", default=paths.default_socket(),
                   help="control socket path (default: %(default)s; env BPFFS_SOCKET)")
    p.add_argument("--mount", default=paths.default_mount(), metavar="DIR",
                   help="mount the default instance here (default: %(default)s)")
    p.add_argument("--no-mount", action="store_true", help="start without mounting anything")
    p.add_argument("--state-dir", default=paths.default_state_dir(),
                   help="where named instances persist (default: %(default)s)")
    p.add_argument("--no-persist", action="store_true",
                   help="keep nothing across restarts (no state directory)")
    p.add_argument("--persist-interval", type=float, default=0.1, metavar="SECONDS",
                   help="map writes made by programs persist within this time (default 0.1)")
    p.add_argument("--memory-limit", type=int, default=1 << 30, metavar="BYTES",
                   help="cap on memory all objects together may charge (default: 1 GiB)")
    p.add_argument("--detach", action="store_true",
                   help="run in the background; return once the daemon is ready")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("--version", action="version", version=f"bpffsd {__version__}")
    return p.parse_args(argv)


def raise_fd_limit() -> None:
    """Every object fd costs the daemon one socket: allow as many as the hard limit does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(config: Config, ready_fd: int | None = None) -> None:
    daemon = Daemon(config)
    # Catch the signals before serving: the daemon answers (and says READY=1) before
    # daemon.run returns, and a SIGTERM then must still shut it down cleanly.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            if ready_fd is not None:
                os.write(ready_fd, b"1")
                os.close(ready_fd)
            async for signum in signals:
                logging.getLogger("bpffsd").info("%s: shutting down",
                                                 signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def detach() -> int | None:
    """Fork into the background; the parent waits until the child reports ready (or fails)
    and exits with its status, as mount helpers must."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        ok = os.read(read_end, 1)
        if ok:
            print(f"bpffsd: running (pid {pid})")
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) or 1)
    os.close(read_end)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    return write_end


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="bpffsd: %(levelname)s %(name)s: %(message)s")
    raise_fd_limit()
    config = Config(socket_path=args.socket,
                    mountpoint=None if args.no_mount else args.mount,
                    state_dir=None if args.no_persist else args.state_dir,
                    memory_limit=args.memory_limit, persist_interval=args.persist_interval)
    ready_fd = detach() if args.detach else None
    try:
        trio.run(serve, config, ready_fd)
    except OSError as e:
        print(f"bpffsd: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
