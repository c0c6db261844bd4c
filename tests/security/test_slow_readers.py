"""Adversarial: a client that never reads its replies must not make the daemon hold memory.

A reply over protocol.INLINE_MAX travels in a memfd the daemon fills; until the client
receives it, the memfd's pages stay allocated (charged to the daemon). A client that sent
requests and never read the answers used to pin one such copy per request. Now a connection
holds at most one large reply unread (its next request is read once the client has received
it: SIOCOUTQ), and one user's large-reply requests run one at a time, refused (EAGAIN, before
they run) while its unread replies are at --max-reply-bytes-per-uid. The attacker is uid
65534 in a forked child; replies it has not read are counted in its own socket's receive queue
(FIONREAD: one byte a memfd reply).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import termios
import time
from pathlib import Path

from attack import raw_connection
from helpers import NOBODY, in_child

from bpffs import protocol
from bpffs.client import Client
from bpffs.vm.uapi import MapType

VALUE = 1000
ENTRIES = 1000  # a ~1 MB array map: each full lookup_batch reply is a ~1 MB memfd
REQUESTS = 60


def queued(s: socket.socket) -> int:
    """Bytes of the datagrams waiting unread in our socket (a memfd reply is 1 byte)."""
    return struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, bytes(4)))[0]


def _read_all(s: socket.socket, inbox: protocol.Inbox, n: int) -> list[int]:
    """Receive n replies (closing their fds): the sizes of their payloads."""
    replies = _replies(s, inbox, n)
    assert all(reply[0] == 0 for reply in replies), replies
    return [reply[1] for reply in replies]


def _replies(s: socket.socket, inbox: protocol.Inbox, n: int) -> list[list]:
    """Receive n replies (closing their fds): each decoded, with the payload's size in place
    of a success's result."""
    return [reply for reply, _wire in _replies_on_wire(s, inbox, n)]


def _replies_on_wire(s: socket.socket, inbox: protocol.Inbox, n: int
                     ) -> list[tuple[list, int]]:
    """As _replies, each with the size of its datagram (1 for a memfd reply)."""
    replies = []
    for _ in range(n):
        datagram, ancdata, flags = inbox.recvmsg(s)
        data, fds = protocol.open_payload(datagram, protocol.decode_fds(ancdata, flags))
        protocol.close_all(fds)
        reply = protocol.unpack(data)
        replies.append(([0, len(data)] if reply[0] == 0 else reply, len(datagram)))
    return replies


def _make_map(path: str) -> tuple[socket.socket, protocol.Inbox, int, int]:
    s, inbox = raw_connection(path, "slow", 20)
    protocol.send_message(s, protocol.pack(["map_create", MapType.ARRAY, 4, VALUE, ENTRIES, 0,
                                            "big"]))
    data, fds = protocol.recv_message(s, inbox)
    reply = protocol.unpack(data)
    assert reply[0] == 0, reply
    return s, inbox, reply[1]["handle"], fds[0]


def _pipeline_unread(path: str) -> tuple[int, list[int]]:
    """One connection, REQUESTS full-map lookup_batch requests, no reply read for a while:
    (replies queued unread then, sizes of all replies once read)."""
    s, inbox, handle, _fd = _make_map(path)
    request = protocol.pack(["map_lookup_batch", handle, None, ENTRIES, False])
    for _ in range(REQUESTS):
        s.send(request)
    time.sleep(1.0)  # the old daemon answered them all by now
    unread = queued(s)
    return unread, _read_all(s, inbox, REQUESTS)  # the rest are served as we read


def test_a_connection_holds_at_most_one_unread_large_reply(public_root: Path,
                                                          start_daemon) -> None:
    """red-team review, finding 1: uid 65534 sent map_lookup_batch requests on a 7 MB map
    without reading the answers; each reply was a fresh memfd queued in its socket, 400 of
    them pinning 1.86 GB of shmem. Now the connection's next request waits until the client
    has received the last large reply: one copy at most (here 1 MB, not 60), and every
    request is still answered once the client reads."""
    daemon = start_daemon(root=public_root / "d")
    unread, sizes = in_child(_pipeline_unread, str(daemon.socket), user=NOBODY)
    assert min(sizes) > protocol.INLINE_MAX, "the replies must travel in memfds"
    assert unread <= 1, f"{unread} large replies ({unread * sizes[0] >> 20} MiB) held unread"
    assert len(sizes) == REQUESTS


CONNECTIONS = 24
REPLY_LIMIT = 4 << 20  # --max-reply-bytes-per-uid: four ~1 MB replies


def _many_connections_unread(path: str) -> tuple[int, int, list]:
    """CONNECTIONS connections each with two full-map requests, nothing read for a while:
    (replies queued unread then over all connections, replies answered once read, the
    refusals)."""
    _owner, _inbox, _handle, fd = _make_map(path)  # kept open: the map's first connection
    conns = []
    for _ in range(CONNECTIONS):
        c, box = raw_connection(path, "slow", 20)
        protocol.send_message(c, protocol.pack(["bind"]), [fd])
        bound = protocol.unpack(protocol.recv_message(c, box)[0])
        assert bound[0] == 0, bound
        conns.append((c, box, bound[1]["handle"]))
    for c, _box, h in conns:
        for _ in range(2):
            c.send(protocol.pack(["map_lookup_batch", h, None, ENTRIES, False]))
    time.sleep(1.5)
    snapshot = [queued(c) for c, _box, _h in conns]  # all at once: nothing is read yet
    unread, replies = 0, []
    for (c, box, _h), waiting in zip(conns, snapshot, strict=True):
        for reply, wire in _replies_on_wire(c, box, 2):
            replies.append(reply)
            waiting -= wire
            if waiting >= 0 and reply[0] == 0:  # a memfd reply that was waiting unread
                unread += 1
    return unread, len(replies), [reply for reply in replies if reply[0]]


def test_a_users_unread_replies_are_capped(public_root: Path, start_daemon) -> None:
    """red-team review, finding 1 (per uid): one unread reply per connection is still 256
    copies with --max-connections-per-uid 256. Now a user's unread replies stop at
    --max-reply-bytes-per-uid (plus the one let through when under it): further requests
    are refused with EAGAIN before they run (a lookup_and_delete loses nothing), saying
    which limit. Every request is answered; root is served meanwhile."""
    daemon = start_daemon(root=public_root / "d",
                          args=("--max-reply-bytes-per-uid", str(REPLY_LIMIT)))
    unread, answered, refusals = in_child(_many_connections_unread, str(daemon.socket),
                                          user=NOBODY)
    reply = ENTRIES * (VALUE + 4)
    assert unread * reply <= REPLY_LIMIT + 2 * reply, f"{unread} replies of ~1 MB held unread"
    assert answered == 2 * CONNECTIONS
    assert refusals, "over the limit, requests are refused"
    assert {r[0] for r in refusals} == {errno.EAGAIN}, refusals
    assert "--max-reply-bytes-per-uid" in refusals[0][1], refusals[0]
    with Client(str(daemon.socket)) as root:
        fd = root.map_create(MapType.HASH, 4, 4, 1)
        root.map_update_elem(fd, bytes(4), b"root")
        os.close(fd)


def test_a_client_that_reads_its_replies_never_waits(public_root: Path,
                                                    start_daemon) -> None:
    """The ordinary client (request, reply, request) is not slowed by the bound: the next
    request finds the last reply received and is read at once."""
    daemon = start_daemon(root=public_root / "d")
    with Client(str(daemon.socket)) as client:
        fd = client.map_create(MapType.ARRAY, 4, VALUE, ENTRIES)
        client.map_lookup_batch(fd, ENTRIES)
        start = time.perf_counter()
        for _ in range(50):
            _keys, values, _cursor = client.map_lookup_batch(fd, ENTRIES)
            assert len(values) == ENTRIES
        elapsed = time.perf_counter() - start
        os.close(fd)
    assert elapsed < 5.0, f"50 large lookups took {elapsed:.2f} s"
