"""Per-user limits on what the daemon holds for its callers, in the kernel's spirit.

Every connection and every object fd costs the daemon one fd of its own, and a request parked
in an async handler holds its fds until it ends. Without limits one user can use up the
daemon's RLIMIT_NOFILE and lock everyone else out. So, as the kernel charges RLIMIT_NOFILE and
memlock to the caller, each is counted per uid (SO_PEERCRED of the connection that asked) and
refused beyond its limit with the kernel's errno (EMFILE for fds, EAGAIN for the rest). Root
(uid 0) is never refused, as CAP_SYS_RESOURCE overrides rlimits, and non-root users together
leave a reserve of the daemon's fds for root.
"""

from __future__ import annotations

import errno
import resource
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass

from bpffs import protocol
from bpffs.vm.errors import BpfError

# Defaults (bpffsd options of the same names; README "Limits").
MAX_CONNECTIONS_PER_UID = 256
MAX_FDS_PER_UID = 4096  # object fds held; the kernel's default hard RLIMIT_NOFILE
MAX_PARKED_PER_UID = 64  # requests waiting in an async handler (trace_read, obj_get, ...)
HELLO_TIMEOUT = 10.0  # seconds a new connection has to say hello
ROOT_RESERVE = 1024  # daemon fds that only root may use
# Largest request message (a memfd) a non-root caller may send; root's is protocol.MESSAGE_MAX.
# Real requests stay far below: the client library sends ~1 MiB map_update_batch requests and
# 4096-packet prog_test_run_batch requests (a few MiB).
MAX_MESSAGE_BYTES = 32 << 20
# Bytes of large replies (each in a memfd the daemon fills) sent to one user and not yet
# received. A connection holds at most one such reply unread: its next request waits until the
# client has received it. Past this sum, the user's requests that may answer in a memfd are
# refused (EAGAIN) before they run. Under it, one is let through, however big.
MAX_REPLY_BYTES_PER_UID = 64 << 20
MAX_FS_NODES_PER_UID = 65536  # bpffs entries (dirs, pins, symlinks, links) one user made
MAX_SYMLINK_BYTES_PER_UID = 4 << 20  # bytes of bpffs symlink targets one user made

# The uid a request is served for, set in each connection's task: ObjectFds.open charges the
# fd it makes to it, including in the continuation of an async handler (contextvars follow
# the trio task). None: the daemon's own work, not charged.
caller_uid: ContextVar[int | None] = ContextVar("caller_uid", default=None)


@dataclass
class LimitConfig:
    max_connections_per_uid: int = MAX_CONNECTIONS_PER_UID
    max_fds_per_uid: int = MAX_FDS_PER_UID
    max_parked_per_uid: int = MAX_PARKED_PER_UID
    hello_timeout: float = HELLO_TIMEOUT
    root_reserve: int = ROOT_RESERVE
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_reply_bytes_per_uid: int = MAX_REPLY_BYTES_PER_UID
    max_fs_nodes_per_uid: int = MAX_FS_NODES_PER_UID
    max_symlink_bytes_per_uid: int = MAX_SYMLINK_BYTES_PER_UID


class UidCounter:
    """One resource counted per uid, refused beyond `limit` with `err`."""

    def __init__(self, what: str, limit: int, err: int, option: str, fds: bool = True):
        self.what, self.limit, self.err, self.option = what, limit, err, option
        self.fds = fds  # each one is an fd of the daemon's (counts against the root reserve)
        self.counts: Counter[int] = Counter()

    def refusal(self, uid: int) -> BpfError | None:
        """Why uid may not have one more (None: it may)."""
        if uid == 0 or self.counts[uid] < self.limit:
            return None
        return BpfError(self.err, f"uid {uid} has {self.counts[uid]} {self.what}, the most"
                        f" bpffsd allows a user ({self.option} {self.limit})")

    def charge(self, uid: int) -> None:
        self.counts[uid] += 1

    def uncharge(self, uid: int) -> None:
        self.counts[uid] -= 1
        if self.counts[uid] <= 0:
            del self.counts[uid]

    def total(self) -> int:
        return sum(self.counts.values())


class Limits:
    """The daemon's per-uid counters; `in_use` tells how many fds the daemon holds for its
    callers (connections and object fds), to keep the root reserve."""

    def __init__(self, config: LimitConfig):
        self.config = config
        self.connections = UidCounter("connections", config.max_connections_per_uid,
                                      errno.EAGAIN, "--max-connections-per-uid")
        self.fds = UidCounter("object fds open", config.max_fds_per_uid, errno.EMFILE,
                              "--max-fds-per-uid")
        # Each array and hash map holds two fds of the daemon's (its memfd and the mapping's)
        self.map_fds = UidCounter("fds of map memory", config.max_fds_per_uid, errno.EMFILE,
                                  "--max-fds-per-uid")
        self.parked = UidCounter("requests waiting", config.max_parked_per_uid, errno.EAGAIN,
                                 "--max-parked-per-uid", fds=False)
        # Bytes of large replies sent and not yet received, per uid (server.py).
        self.unread_replies: Counter[int] = Counter()

    def message_limit(self, uid: int) -> int:
        """The largest request message uid may send."""
        return protocol.MESSAGE_MAX if uid == 0 else min(self.config.max_message_bytes,
                                                         protocol.MESSAGE_MAX)

    def replies_over(self, uid: int) -> bool:
        """Whether uid's unread large replies have reached its limit (root's never do)."""
        return uid != 0 and self.unread_replies[uid] >= self.config.max_reply_bytes_per_uid

    @staticmethod
    def nofile() -> int:
        """The daemon's RLIMIT_NOFILE now (an operator may change it with prlimit)."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return soft if soft != resource.RLIM_INFINITY else 1 << 20

    def _check(self, counter: UidCounter, uid: int) -> None:
        refusal = counter.refusal(uid)
        if refusal is not None:
            raise refusal
        if not uid or not counter.fds:
            return
        nofile = self.nofile()
        reserve = min(self.config.root_reserve, nofile // 2)  # a small limit: half at most
        if self.in_use() >= nofile - reserve:
            raise BpfError(counter.err, f"bpffsd holds {self.in_use()} fds for its users, near"
                           f" its limit of {nofile}; the last {reserve} are kept for root"
                           " (--root-reserve)")

    def in_use(self) -> int:
        return self.connections.total() + self.fds.total() + self.map_fds.total()

    def charge(self, counter: UidCounter, uid: int) -> None:
        """Count one more for uid, or raise the kernel's errno with what limit was hit."""
        self._check(counter, uid)
        counter.charge(uid)
