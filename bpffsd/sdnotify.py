"""The two halves of systemd's service protocol, without libsystemd.

sd_notify(3): newline-separated assignments in one datagram to $NOTIFY_SOCKET (a path, or an
abstract socket when it starts with '@'). sd_listen_fds(3): sockets passed from fd 3 on when
LISTEN_PID is our pid; the variables are removed once read, as the man page asks.
"""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


def notify(*assignments: str) -> bool:
    """Send e.g. notify("READY=1", "STATUS=serving"); False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto("\n".join(assignments).encode(), address)
        except OSError:
            return False
    return True


def activated() -> bool:
    """Whether systemd passed us listening sockets (without taking them: listen_fds does)."""
    try:
        return (int(os.environ.get("LISTEN_PID", "")) == os.getpid()
                and int(os.environ.get("LISTEN_FDS", "0")) > 0)
    except ValueError:
        return False


def listen_fds() -> list[socket.socket]:
    """The sockets systemd passed us (socket activation), or [] when there are none."""
    try:
        ours = int(os.environ.get("LISTEN_PID", "")) == os.getpid()
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        ours, count = False, 0
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if not ours:
        return []
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks
