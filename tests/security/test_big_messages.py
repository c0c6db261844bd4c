"""Adversarial: what a request may cost the daemon to read and decode.

A request larger than a datagram arrives in a memfd, and was decoded whole (msgpack.unpackb,
no bounds) before any schema check: one 200 MB message of 200M zeros blocked the event loop
2.4 s, took 1.7 GB, was answered EINVAL and could be sent again. Now non-root messages stop at
--max-message-bytes (32 MiB), msgpack's lengths are bounded from what real requests carry, a
large message has a budget of objects, and breaking any of these drops the connection. The
attacker is uid 65534 in a forked child, on raw SOCK_SEQPACKET connections to a real daemon.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from attack import raw_connection, rss_mb
from helpers import NOBODY, in_child

from bpffs import protocol
from bpffs.client import Client
from bpffs.vm.uapi import MapType

DROPPED = "dropped"


def _recv(s: socket.socket, inbox: protocol.Inbox) -> object:
    try:
        data, fds = protocol.recv_message(s, inbox)
    except OSError:
        return DROPPED
    protocol.close_all(fds)
    return protocol.unpack(data)[:2] if data else DROPPED


def _send_memfd(path: str, payload: bytes | int) -> tuple[object, object, float]:
    """Say hello, send one memfd message (bytes, or an int: that many zero bytes, sparse),
    then a status request on the same connection. Returns (reply to the message, reply to
    the status, seconds until the first reply); DROPPED where the daemon hung up."""
    s, inbox = raw_connection(path, "big", 30)
    with s:
        if isinstance(payload, int):
            fd = os.memfd_create("big", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, payload)  # sparse: costs nothing
        else:
            fd = protocol.make_memfd(payload)
        start = time.perf_counter()
        try:
            s.sendmsg([protocol.LARGE_MESSAGE], protocol.encode_fds([fd]))
        finally:
            os.close(fd)
        first = _recv(s, inbox)
        elapsed = time.perf_counter() - start
        if first == DROPPED:
            return first, DROPPED, elapsed
        try:
            protocol.send_message(s, protocol.pack(["status"]))
        except OSError:
            return first, DROPPED, elapsed
        return first, _recv(s, inbox), elapsed


ZEROS = 20_000_000  # 20 MB of input: a 160 MB list once decoded


def test_a_huge_msgpack_array_drops_the_connection_unread(public_root: Path,
                                                          start_daemon) -> None:
    """red-team review, finding 3: one memfd message holding a msgpack array of 200M zeros
    was decoded whole (2.4 s of event loop, 1.7 GB), answered EINVAL, and the connection
    stayed for the next one. Here 20M zeros (160 MB decoded before): msgpack's
    max_array_len stops it at its header, and the connection is dropped."""
    daemon = start_daemon(root=public_root / "d")
    rss = rss_mb(daemon)
    payload = b"\xdd" + ZEROS.to_bytes(4, "big") + bytes(ZEROS)
    first, then, _elapsed = in_child(_send_memfd, str(daemon.socket), payload, user=NOBODY)
    assert (first, then) == (DROPPED, DROPPED), (first, then)
    assert rss_mb(daemon) < rss + 60, "the daemon decoded it anyway"
    assert "max_array_len" in daemon.log_text()


def test_a_message_over_the_users_limit_is_not_read(public_root: Path, start_daemon) -> None:
    """red-team review, finding 3 (size): a non-root user's message may be 32 MiB
    (--max-message-bytes), not 256 MiB: a bigger memfd is refused by its size, unread, and
    the connection dropped. Root keeps the 256 MiB limit."""
    daemon = start_daemon(root=public_root / "d",
                          args=("--max-message-bytes", str(4 << 20)))
    first, then, _ = in_child(_send_memfd, str(daemon.socket), (4 << 20) + 1, user=NOBODY)
    assert (first, then) == (DROPPED, DROPPED), (first, then)
    assert f"message of {(4 << 20) + 1} bytes exceeds {4 << 20}" in daemon.log_text()
    # root: read (and, being zeros with trailing data, a malformed message all the same)
    first, then, _ = _send_memfd(str(daemon.socket), (4 << 20) + 1)
    assert first == DROPPED
    assert "exceeds" not in daemon.log_text().split(f"exceeds {4 << 20}", 1)[1]


EMPTY_MAPS = 1_000_000  # 1 MB of input: ~64 MB of dicts once decoded


def test_many_small_containers_are_bounded(public_root: Path, start_daemon) -> None:
    """red-team review, finding 3 (amplification): each byte of msgpack can become ~64
    bytes of Python objects (an empty map is one byte). A request of 1M empty maps under
    every length bound was decoded whole (64 MB, ~0.1 s) and answered EINVAL; now the large
    message's object budget (2^18 for non-root) stops it early and the connection is
    dropped."""
    daemon = start_daemon(root=public_root / "d")
    payload = b"\x92\xa6status\xdd" + EMPTY_MAPS.to_bytes(4, "big") + b"\x80" * EMPTY_MAPS
    first, then, elapsed = in_child(_send_memfd, str(daemon.socket), payload, user=NOBODY)
    assert (first, then) == (DROPPED, DROPPED), (first, then)
    assert "objects in one request" in daemon.log_text()
    assert elapsed < 1.0


def _update_and_delete_in_batches(path: str) -> tuple[int, int, int]:
    with Client(path) as client:
        fd = client.map_create(MapType.HASH, 4, 248, 8192)
        keys = [i.to_bytes(4, "little") for i in range(8192)]
        updated = client.map_update_batch(fd, keys, [bytes(248)] * 8192, chunk=8192)
        _k, values, _cursor = client.map_lookup_batch(fd, 8192)
        deleted = client.map_delete_batch(fd, keys)
        os.close(fd)
        return updated, len(values), deleted


def test_real_big_requests_of_a_user_still_work(public_root: Path, start_daemon) -> None:
    """The bounds are sized from real requests: a non-root user's 2 MB map_update_batch (a
    memfd message), the 2 MB lookup reply and a one-request delete of every key all work."""
    daemon = start_daemon(root=public_root / "d")
    assert in_child(_update_and_delete_in_batches, str(daemon.socket),
                    user=NOBODY) == (8192, 8192, 8192)


def _send_inline(path: str, payload: bytes) -> tuple[object, object]:
    """As _send_memfd, for a message sent inline."""
    s, inbox = raw_connection(path, "deep", 30)
    with s:
        s.send(payload)
        first = _recv(s, inbox)
        if first == DROPPED:
            return first, DROPPED
        try:
            protocol.send_message(s, protocol.pack(["status"]))
        except OSError:
            return first, DROPPED
        return first, _recv(s, inbox)


def test_deep_nesting_drops_the_connection(public_root: Path, start_daemon) -> None:
    """red-team review, finding 3 (nesting): msgpack nests up to 1024 levels. A 900-deep
    (here 500: older msgpack packers stop at 511) option value was decoded and handed to the
    handler (here answered EBADF, the connection kept); repr() of such a value, as a run
    option's EINVAL message makes, raises
    RecursionError. No request nests more than a few levels: beyond
    protocol.REQUEST_DEPTH_MAX (8) the message is a protocol violation and the connection
    is dropped."""
    daemon = start_daemon(root=public_root / "d")
    nested: object = 0
    for _ in range(500):
        nested = [nested]
    payload = protocol.pack(["prog_test_run", 1, b"", None, 1, 0, {"cpu": nested}])
    assert in_child(_send_inline, str(daemon.socket), payload, user=NOBODY) == (DROPPED,
                                                                                DROPPED)
    assert "nested deeper than" in daemon.log_text()
    # a real request's nesting is fine
    ok = protocol.pack(["status"])
    assert in_child(_send_inline, str(daemon.socket), ok, user=NOBODY)[0][0] == 0
