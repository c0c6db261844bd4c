"""The syscalls tools use to accept our mount and our fds, answered as on a kernel bpffs:
statfs/fstatfs (BPF_FS_MAGIC), readlink of /proc/self/fd/N (anon_inode:bpf-map / -prog),
open of /proc/self/fdinfo/N (the kernel's lines, in a sealed memfd) and mount -t bpf onto our
mount (a no-op, so that no tool hides our tree). Anything not ours CONTINUEs to the kernel."""

from __future__ import annotations

import errno
import fcntl
import os
import re

from . import abi
from .attr import fdinfo_head, fdinfo_map, fdinfo_prog
from .context import CONTINUE, Caller, Context, Inject, Outcome, Reply, fstatfs, object_fd


# -- what tools check on our mount and fds ------------------------------------------------------
def _statfs_reply(t: Caller, ctx: Context, fd: int, buf: int) -> Outcome:
    """The real statfs of our mount with f_type BPF_FS_MAGIC; CONTINUE when not ours."""
    if not ctx.on_bpffsd(fd):
        return CONTINUE
    raw = bytearray(abi.STATFS.size)
    fstatfs(fd, raw)
    fields = list(abi.STATFS.unpack(bytes(raw)))
    fields[0] = abi.BPF_FS_MAGIC
    t.write(buf, abi.STATFS.pack(*fields))
    return Reply()


def sys_statfs(t: Caller, args: tuple[int, ...], ctx: Context) -> Outcome:
    path = t.read_string(args[0])
    try:
        fd = t.resolve(path)
    except OSError:
        return CONTINUE  # the kernel says why, as it would
    try:
        t.check()  # root and cwd were the waiting caller's (its TID was not reused)
        return _statfs_reply(t, ctx, fd, args[1])
    finally:
        os.close(fd)


def sys_fstatfs(t: Caller, args: tuple[int, ...], ctx: Context) -> Outcome:
    try:
        fd = t.getfd(args[0] & 0xFFFFFFFF)
    except OSError:
        return CONTINUE
    try:
        return _statfs_reply(t, ctx, fd, args[1])
    finally:
        os.close(fd)


_PROC_FD = re.compile(rb"^/proc/(self|thread-self|\d+)/(fd|fdinfo)/(\d+)$")


def _own_object(t: Caller, ctx: Context, path: bytes, kind: bytes
                ) -> tuple[int, dict] | None:
    """(the caller's fd number, bpffsd's description) when path is
    /proc/{self,thread-self,its own pid or tid}/{kind}/N and N is one of its object fds."""
    if not path.startswith(abi.PROC_PREFIX):
        return None
    m = _PROC_FD.match(path)
    if not m or m.group(2) != kind:
        return None
    who = m.group(1)
    if who not in (b"self", b"thread-self") and int(who) not in (t.tid, t.tgid):
        return None  # another process's fd: the kernel's business (and permission checks)
    number = int(m.group(3))
    try:
        with object_fd(t, ctx, number) as (_, info):
            return number, info
    except OSError:
        return None


def _readlink(t: Caller, ctx: Context, path_addr: int, buf: int, size: int) -> Outcome:
    path = t.read_string(path_addr)
    t.check()
    found = _own_object(t, ctx, path, b"fd")
    if found is None or found[1].get("kind") not in ("map", "prog"):
        return CONTINUE
    if size <= 0 or size > abi.INT_MAX:
        return Reply(error=errno.EINVAL)
    text = abi.ANON_INODE_MAP if found[1]["kind"] == "map" else abi.ANON_INODE_PROG
    text = text[:size]  # readlink(2): truncated, no NUL
    t.write(buf, text)
    return Reply(len(text))


def sys_readlink(t: Caller, args: tuple[int, ...], ctx: Context) -> Outcome:
    return _readlink(t, ctx, args[0], args[1], args[2] & 0xFFFFFFFF)


def sys_readlinkat(t: Caller, args: tuple[int, ...], ctx: Context) -> Outcome:
    """Only absolute /proc paths are ours, and an absolute path ignores dirfd."""
    return _readlink(t, ctx, args[1], args[2], args[3] & 0xFFFFFFFF)


def _fdinfo(t: Caller, ctx: Context, path_addr: int, flags: int) -> Outcome:
    path = t.read_string(path_addr)
    t.check()
    found = _own_object(t, ctx, path, b"fdinfo")
    if found is None or found[1].get("kind") not in ("map", "prog"):
        return CONTINUE
    number, bound = found
    with object_fd(t, ctx, number) as (fd, _):
        info = ctx.client.obj_get_info_by_fd(fd)
    try:
        with open(f"/proc/{t.tgid}/fdinfo/{number}") as f:
            head = fdinfo_head(f.read())
    except OSError:
        return CONTINUE
    if bound["kind"] == "map":
        text = fdinfo_map(head, bound["type"], info["bytes_key"], info["bytes_value"],
                          info["max_entries"], info["flags"], info["bytes_memlock"],
                          info["id"], info.get("frozen", 0))
    else:
        text = fdinfo_prog(head, bound["type"], info["tag"], info["bytes_memlock"],
                           info["id"], info.get("run_time_ns", 0), info.get("run_cnt", 0))
    return Inject(sealed_memfd(text.encode()), cloexec=bool(flags & os.O_CLOEXEC))


def sealed_memfd(data: bytes) -> int:
    """A read-only fd on a sealed memfd holding data (the caller can neither change nor grow
    it; reopened O_RDONLY through /proc, as memfds open read-write)."""
    memfd = os.memfd_create("bpf-fdinfo", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(memfd, data)
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        return os.open(f"/proc/self/fd/{memfd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(memfd)


def sys_openat(t: Caller, args: tuple[int, ...], ctx: Context) -> Outcome:
    """As readlinkat: only absolute /proc paths are ours, whatever dirfd is."""
    return _fdinfo(t, ctx, args[1], args[2])


def sys_open(t: Caller, args: tuple[int, ...], ctx: Context) -> Outcome:
    return _fdinfo(t, ctx, args[0], args[1])


def sys_mount(t: Caller, args: tuple[int, ...], ctx: Context) -> Outcome:
    """`mount -t bpf` onto a bpffsd mount answers 0 without mounting: no tool can hide our
    tree behind a kernel bpffs. Any other mount is the kernel's."""
    if not args[2] or args[3] & abi.MOUNT_NOT_NEW:
        return CONTINUE
    fstype = t.read_string(args[2], 64)
    if fstype != b"bpf":
        return CONTINUE
    target = t.read_string(args[1])
    try:
        fd = t.resolve(target)
    except OSError:
        return CONTINUE
    try:
        t.check()  # root and cwd were the waiting caller's (its TID was not reused)
        return Reply() if ctx.on_bpffsd(fd) else CONTINUE
    finally:
        os.close(fd)
