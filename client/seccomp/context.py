"""What every handler works with: the outcomes it returns, the caller it serves, the Context
it shares (the bpffsd client, our mounts), and the caller's object fds as bpffsd knows them."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from bpffs.client import calls
from bpffs.client.sync import Client
from bpffs.vm.errors import BpfError

from . import abi
from .target import Privileges

_libc = ctypes.CDLL(None, use_errno=True)


# -- outcomes -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    val: int = 0
    error: int = 0  # a positive errno; 0 for success


@dataclass(frozen=True)
class Inject:
    """Install fd (ours; the supervisor closes it after) in the caller as the call's result."""

    fd: int
    cloexec: bool = True


class _Continue:
    def __repr__(self) -> str:
        return "CONTINUE"


CONTINUE = _Continue()
Outcome = Reply | Inject | _Continue


class Caller(Protocol):
    tid: int

    @property
    def tgid(self) -> int: ...
    def check(self) -> None: ...
    def read(self, addr: int, size: int) -> bytes: ...
    def read_string(self, addr: int, limit: int = ...) -> bytes: ...
    def write(self, addr: int, data: bytes) -> None: ...
    def getfd(self, number: int) -> int: ...
    def resolve(self, path: bytes, dirfd: int = ..., follow: bool = ...) -> int: ...
    def same_credentials(self) -> bool: ...
    def privileges(self) -> Privileges: ...
    def status(self) -> dict[bytes, bytes]: ...


@dataclass
class Context:
    """What the handlers share: the bpffsd client (acting with the supervisor's credentials,
    which are the target user's) and the bpffsd mounts, by st_dev."""

    client: Client
    mount_devs: set[int] = field(default_factory=set)
    _batch_cursors: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    _batch_token: int = 0

    def on_bpffsd(self, fd: int) -> bool:
        """Whether an fd is on a bpffsd mount: a FUSE file whose device is one of ours
        (mountinfo is read again when a FUSE device is new to us: mounts come and go)."""
        dev = os.fstat(fd).st_dev
        if dev in self.mount_devs:
            return True
        if _fs_type(fd) != abi.FUSE_SUPER_MAGIC:
            return False
        self.mount_devs = bpffsd_mount_devices()
        return dev in self.mount_devs

    def run(self, call: calls.Call) -> Any:
        return self.client.run(call)

    def new_batch_cursor(self, handle: int, key: bytes) -> bytes:
        """A u32 token for bpffsd's cursor of a hash map walk (the kernel's out_batch is a
        bucket number: 4 bytes, whatever the key size). The newest BATCH_CURSORS are kept."""
        self._batch_token = (self._batch_token + 1) & 0xFFFFFFFF
        self._batch_cursors[self._batch_token] = (handle, key)
        while len(self._batch_cursors) > abi.BATCH_CURSORS:
            del self._batch_cursors[next(iter(self._batch_cursors))]
        return struct.pack("<I", self._batch_token)

    def batch_cursor(self, handle: int, token: bytes) -> bytes:
        """The cursor a token stands for; ENOENT for one we never gave for this map (the
        kernel's answer to a bucket past the end)."""
        found = self._batch_cursors.get(struct.unpack("<I", token)[0])
        if found is None or found[0] != handle:
            raise BpfError(errno.ENOENT, "unknown batch cursor")
        return found[1]


def _fs_type(fd: int) -> int:
    buf = bytearray(abi.STATFS.size)
    fstatfs(fd, buf)
    return abi.STATFS.unpack(bytes(buf))[0]


def fstatfs(fd: int, buf: bytearray) -> None:
    raw = (ctypes.c_char * len(buf)).from_buffer(buf)
    if _libc.fstatfs(fd, raw) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def bpffsd_mount_devices() -> set[int]:
    """st_dev of every bpffsd FUSE mount visible here (mountinfo fstype fuse.bpffsd)."""
    devs = set()
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            left, _, right = line.partition(b" - ")
            if right.split(b" ", 1)[0] == b"fuse.bpffsd":
                major, minor = left.split()[2].split(b":")
                devs.add(os.makedev(int(major), int(minor)))
    return devs


# -- the caller's object fds --------------------------------------------------------------------
_SOCKFS_DEV: list[int] = []


def _sockfs_dev() -> int:
    """st_dev of every socket (sockfs is one superblock). A socket file's O_PATH fd is also
    S_ISSOCK, but on its own filesystem, where its inode number could be an object's."""
    if not _SOCKFS_DEV:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            _SOCKFS_DEV.append(os.fstat(s.fileno()).st_dev)
    return _SOCKFS_DEV[0]


@contextmanager
def object_fd(t: Caller, ctx: Context, number: int, kind: str | None = None,
              closed: int = errno.EBADF) -> Iterator[tuple[int, dict]]:
    """(our dup of the caller's fd `number`, what bpffsd says it is). EBADF when the caller
    has no such fd (`closed`), EINVAL when it is not a bpffsd object (or not of `kind`), as
    the kernel's answer for a file that is no map or program."""
    try:
        mine = t.getfd(number)
    except OSError as e:
        if e.errno != errno.EBADF:
            raise
        raise BpfError(closed, f"fd {number} is not open") from None
    try:
        st = os.fstat(mine)
        if not stat.S_ISSOCK(st.st_mode) or st.st_dev != _sockfs_dev():
            if fcntl.fcntl(mine, fcntl.F_GETFL) & abi.O_PATH:  # fdget() skips O_PATH fds
                raise BpfError(closed, f"fd {number} is an O_PATH fd")
            raise BpfError(errno.EINVAL, f"fd {number} is not a bpf object")
        try:  # calls.bind's cache, looked up with this fstat (bind would make a second)
            info = ctx.client.session.bound.get(st.st_ino) or \
                ctx.run(calls.bind(ctx.client.session, mine))[1]
        except BpfError as e:
            if e.errno not in (errno.EBADF, errno.EINVAL):
                raise  # the daemon's trouble (a lost connection), not the caller's fd
            raise BpfError(errno.EINVAL, f"fd {number} is not a bpf object ({e})") from None
        if kind is not None and info.get("kind") != kind:
            raise BpfError(errno.EINVAL, f"fd {number} is a {info.get('kind')}, not a {kind}")
        yield mine, info
    finally:
        os.close(mine)
