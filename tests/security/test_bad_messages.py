"""Adversarial: malformed messages and the low items of issue 13 (finding 8).

Messages are written by hand on raw SOCK_SEQPACKET connections to a real daemon; the other
user is uid 65534 in a forked child. The daemon's log is read back to count what a flood of
bad messages costs there.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from pathlib import Path

import msgpack
import pytest
from helpers import NOBODY, DaemonProcess, in_child

from bpffs import protocol
from bpffs.client import Client
from bpffs.daemon import server


def send_raw(daemon: DaemonProcess, payload: bytes, greet: bool = True) -> list | None:
    """One message on a new connection: the decoded reply, or None when the daemon hung up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(10)
        s.connect(str(daemon.socket))
        if greet:
            s.send(protocol.pack(["hello", protocol.PROTOCOL_VERSION, "raw"]))
            assert protocol.unpack(s.recv(protocol.INLINE_MAX))[0] == 0
        s.send(payload)
        try:
            reply = s.recv(protocol.INLINE_MAX)
        except ConnectionResetError:
            return None
        return protocol.unpack(reply) if reply else None


# A msgpack map whose key is an array: msgpack raises TypeError (unhashable), not ValueError.
MAP_WITH_ARRAY_KEY = b"\x92\xa6status\x81\x91\x01\x01"


def test_a_map_with_an_array_as_key_is_a_protocol_error(daemon: DaemonProcess,
                                                        client: Client) -> None:
    """issue 13, finding 8: a map with an array as key gave "internal error: TypeError" and
    a traceback in the log. It is malformed msgpack: the connection is dropped, nothing
    more."""
    with pytest.raises(TypeError):
        msgpack.unpackb(MAP_WITH_ARRAY_KEY, strict_map_key=False)  # what the daemon meets
    assert send_raw(daemon, MAP_WITH_ARRAY_KEY) is None
    log = daemon.log_text()
    assert "Traceback" not in log and "internal error" not in log, log
    assert "malformed msgpack" in log
    assert client.status()["pid"] == daemon.proc.pid  # still serving


FLOOD = 1000


def test_a_flood_of_malformed_messages_does_not_flood_the_log(start_daemon) -> None:
    """issue 13, finding 8: every malformed message logged a WARNING (16k lines in 5
    minutes). Now a uid gets WARN_BURST lines an interval, then they are only counted."""
    daemon = start_daemon()
    lines_before = len(daemon.log_text().splitlines())
    for _ in range(FLOOD):
        assert send_raw(daemon, b"\x92\xa5hel", greet=False) is None  # truncated msgpack
    with daemon.client() as c:
        assert c.status()["pid"] == daemon.proc.pid
    log = daemon.log_text()
    new_lines = log.splitlines()[lines_before:]
    assert len(new_lines) <= server.WARN_BURST + 2, "\n".join(new_lines)
    assert "Traceback" not in log


def test_warnings_resume_with_a_count_of_those_not_logged(caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    """issue 13, finding 8: the rate limit's summary line says how many were not logged."""
    limiter = server.WarningLimiter("malformed messages", burst=2, interval=3600.0)
    with caplog.at_level(logging.WARNING, logger=server.log.name):
        for i in range(10):
            limiter.warn("uid 65534", "bad message %d", i)
        limiter.warn("uid 1000", "bad message %d", 99)  # another source has its own
        assert len(caplog.records) == 3
        limiter.interval = 0.0  # the window is over
        limiter.warn("uid 65534", "bad message %d", 10)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[1].startswith("bad message 1 (further"), messages
    assert messages[3] == "8 more malformed messages from uid 65534 in 0 s not logged", messages
    assert messages[4] == "bad message 10"


def test_trace_read_is_root_only(public_root: Path, start_daemon) -> None:
    """issue 13, finding 8: any user could read root's bpf_trace_printk output; the
    kernel's trace_pipe is root-only. Now trace_read by others is EPERM."""
    daemon = start_daemon(root=public_root / "d")

    def read_as_nobody() -> object:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(5)
            s.connect(str(daemon.socket))
            s.send(protocol.pack(["hello", protocol.PROTOCOL_VERSION, "nobody"]))
            s.recv(protocol.INLINE_MAX)
            s.send(protocol.pack(["trace_read", 0]))
            reply = protocol.unpack(s.recv(protocol.INLINE_MAX))
        if reply[0]:
            raise OSError(reply[0], reply[1])
        return reply[1]

    with pytest.raises(OSError) as info:
        in_child(read_as_nobody, user=NOBODY)
    assert info.value.errno == errno.EPERM, info.value
    assert "CAP_SYS_ADMIN" in str(info.value)
    assert os.geteuid() == 0  # and root may (tests/vm/test_daemon_programs.py reads it)
