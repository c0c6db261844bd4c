"""One function per bpf command, answering as the kernel would, and the dispatch of every
intercepted syscall (the extra ones are in files.py).

Each handler is a function of (the caller, its arguments, the Context) that returns an
Outcome: Reply(val) / Reply(error=E...), Inject(fd) (a new fd for the caller, which is also the
call's result), or CONTINUE (not ours: the kernel runs the call). The caller is anything with
Target's methods (read, read_string, write, check, getfd, resolve, tgid, tid), so the handlers
run in tests without seccomp. bpf() never continues: every command, feature probes included,
is answered from bpffsd, or refused as a kernel without it would refuse it.

Errors: Fault (a bad pointer) becomes EFAULT, an OSError (BpfError included) its errno, an
AttrError its errno; Gone means no answer at all.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Generator
from typing import Any

from bpffs.client import calls
from bpffs.vm.errors import BatchError, BpfError, VerifierError
from bpffs.vm.uapi import BPF_COMPLEXITY_LIMIT_INSNS, PAGE_SIZE, Cmd, MapType, ObjFlag, ProgType

from . import abi, files
from .attr import (
    Attr,
    AttrError,
    boot_ns,
    get,
    map_info,
    obj_name,
    put,
    read_attr,
    xlated_for_dump,
)
from .context import CONTINUE, Caller, Context, Inject, Outcome, Reply, object_fd
from .target import Fault

__all__ = ["BPF", "CONTINUE", "SYSCALLS", "Context", "Inject", "Outcome", "Reply", "handle"]


def _new_fd(reply: tuple[Any, list[int]], session: calls.Session) -> int:
    info, fds = reply
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise BpfError(errno.EPROTO, f"expected one fd from bpffsd, got {len(fds)}")
    session.bound[info["handle"]] = info
    return fds[0]


def _umask(t: Caller) -> int:
    try:
        return int(t.status().get(b"Umask", b"022"), 8)
    except OSError:
        return 0o022

# -- privileges ---------------------------------------------------------------------------------
# bpffsd grants what the kernel reserves for capable callers to root (Peer.privileged, its
# stand-in for capable(CAP_SYS_ADMIN)), and it sees only our connection's uid. So a caller
# served over a root connection that has dropped capabilities (capsh --drop, setpriv
# --bounding-set=-all, a container without CAP_SYS_ADMIN) is held here to what the kernel
# asks of it: each entry is a list of capability sets, the caller needing one of each set.
# bpffsd checks its own rule after ours, so a non-root connection stays unprivileged.
PRIVILEGED_COMMANDS: dict[int, tuple[tuple[int, ...], ...]] = {
    Cmd.MAP_GET_NEXT_ID: ((abi.CAP_SYS_ADMIN,),),
    Cmd.PROG_GET_NEXT_ID: ((abi.CAP_SYS_ADMIN,),),
    Cmd.MAP_GET_FD_BY_ID: ((abi.CAP_SYS_ADMIN,),),
    Cmd.PROG_GET_FD_BY_ID: ((abi.CAP_SYS_ADMIN,),),
    # bpffsd's rule (the kernel runs any program its caller holds)
    Cmd.PROG_TEST_RUN: ((abi.CAP_SYS_ADMIN,),),
}
_BPF = (abi.CAP_BPF, abi.CAP_SYS_ADMIN)
# program types bpffsd loads for any caller: socket filters (bpffsd/syscall.py's
# UNPRIVILEGED_PROG_TYPES); the others need what bpf_prog_load asks for them
PROG_TYPE_CAPABILITIES: dict[int, tuple[tuple[int, ...], ...]] = {
    ProgType.KPROBE: (_BPF, (abi.CAP_PERFMON, abi.CAP_SYS_ADMIN)),
    ProgType.SCHED_CLS: (_BPF, (abi.CAP_NET_ADMIN, abi.CAP_SYS_ADMIN)),
    ProgType.SCHED_ACT: (_BPF, (abi.CAP_NET_ADMIN, abi.CAP_SYS_ADMIN)),
}


def _require(t: Caller, needs: tuple[tuple[int, ...], ...], what: str) -> None:
    privileges = t.privileges()
    if not all(privileges.capable(*one_of) for one_of in needs):
        raise BpfError(errno.EPERM, f"{what} needs capabilities the caller does not have")


def _may(t: Caller, fd: int, want: int) -> None:
    """EACCES where the kernel refuses a root caller without CAP_DAC_OVERRIDE access to a pin
    or directory that bpffsd, seeing a root connection, would let it use (for any other
    caller bpffsd's own check, with the same ids, decides)."""
    privileges = t.privileges()
    if privileges.fsuid == 0 and not privileges.permits(os.fstat(fd), want):
        raise BpfError(errno.EACCES, "permission denied (the caller has no CAP_DAC_OVERRIDE)")


# -- bpf(2) -------------------------------------------------------------------------------------
def sys_bpf(t: Caller, args: tuple[int, ...], ctx: Context) -> Outcome:
    """bpf(cmd, attr, size): the attr read with the kernel's rules, then the command (EPERM
    first for a privileged command whose caller lacks the capabilities, as in the kernel)."""
    cmd, addr, size = args[0] & 0xFFFFFFFF, args[1], args[2] & 0xFFFFFFFF
    if not t.same_credentials():
        raise BpfError(errno.EPERM, "the caller changed its user or group since bpffs exec")
    attr = read_attr(cmd, addr, size, t.read)
    handler = BPF.get(cmd)
    if handler is None:
        return Reply(error=errno.EINVAL)  # a kernel without the command
    needs = PRIVILEGED_COMMANDS.get(cmd)
    if needs is not None:
        _require(t, needs, Cmd(cmd).name)
    return handler(t, attr, ctx)


def map_create(t: Caller, a: Attr, ctx: Context) -> Outcome:
    if a["map_ifindex"] or a["btf_key_type_id"] or a["btf_value_type_id"] \
            or a["btf_vmlinux_value_type_id"] or a["map_extra"]:
        raise BpfError(errno.EINVAL, "offload, BTF and map_extra are not supported")
    name = obj_name(a["map_name"])  # type: ignore[arg-type]
    t.check()
    fd = ctx.client.map_create(a.num("map_type"), a.num("key_size"), a.num("value_size"),
                               a.num("max_entries"), a.num("map_flags"), name)
    return Inject(fd)


def _key(t: Caller, addr: int, info: dict) -> bytes:
    return t.read(addr, info["key_size"])


def map_lookup_elem(t: Caller, a: Attr, ctx: Context) -> Outcome:
    if a["flags"]:
        raise BpfError(errno.EINVAL, "lookup flags are not supported (BPF_F_LOCK)")
    with object_fd(t, ctx, a.num("map_fd"), "map") as (fd, info):
        key = _key(t, a.num("key"), info)
        t.check()
        value = ctx.client.map_lookup_elem(fd, key)
    t.write(a.num("value"), value)
    return Reply()


def map_update_elem(t: Caller, a: Attr, ctx: Context) -> Outcome:
    with object_fd(t, ctx, a.num("map_fd"), "map") as (fd, info):
        key = _key(t, a.num("key"), info)
        value = t.read(a.num("value"), info["value_size"])
        t.check()
        if info["type"] in (MapType.PROG_ARRAY, MapType.PERF_EVENT_ARRAY):
            # the value names an fd in the caller's table: ours is a dup of it
            member = t.getfd(struct.unpack("<I", value)[0])
            try:
                ctx.client.map_update_elem(fd, key, struct.pack("<I", member), a.num("flags"))
            finally:
                os.close(member)
        else:
            ctx.client.map_update_elem(fd, key, value, a.num("flags"))
    return Reply()


def map_delete_elem(t: Caller, a: Attr, ctx: Context) -> Outcome:
    with object_fd(t, ctx, a.num("map_fd"), "map") as (fd, info):
        key = _key(t, a.num("key"), info)
        t.check()
        ctx.client.map_delete_elem(fd, key)
    return Reply()


def map_get_next_key(t: Caller, a: Attr, ctx: Context) -> Outcome:
    with object_fd(t, ctx, a.num("map_fd"), "map") as (fd, info):
        key = _key(t, a.num("key"), info) if a["key"] else None
        t.check()
        nxt = ctx.client.map_get_next_key(fd, key)
    t.write(a.num("next_key"), nxt)
    return Reply()


def _prog_load_call(session: calls.Session, a: Attr, insns: bytes, license: str, name: str,
                    map_fds: dict[int, int]) -> Generator[calls.Request, Any, tuple[int, str]]:
    """calls.prog_load with the caller's fd numbers left in the instructions: each is bound
    from our dup of it (map_fds: the caller's number -> our dup)."""
    handles = {}
    for number, mine in map_fds.items():
        try:
            handles[number], _ = yield from calls.bind(session, mine)
        except BpfError:
            pass  # not an object: the daemon reports the instruction naming it
    reply = yield calls.Request("prog_load", (
        a.num("prog_type"), insns, license, a.num("kern_version"), name, a.num("log_level"),
        a.num("log_size"), handles))
    return _new_fd(reply, session), reply[0].get("log", "")


def _write_log(t: Caller, a: Attr, log: str) -> None:
    if a["log_level"] and a["log_buf"] and a["log_size"]:
        data = log.encode()[:a.num("log_size") - 1] + b"\0"
        t.write(a.num("log_buf"), data)


def _bounded_string(t: Caller, addr: int, size: int) -> bytes:
    """strncpy_from_user into a size-byte buffer: a longer string is cut, not refused."""
    try:
        return t.read_string(addr, size)
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            raise
        return t.read(addr, size - 1)


def prog_load(t: Caller, a: Attr, ctx: Context) -> Outcome:
    count = a.num("insn_cnt")
    if count == 0 or count > BPF_COMPLEXITY_LIMIT_INSNS:
        raise BpfError(errno.E2BIG, f"insn_cnt {count} out of range")
    if a["prog_flags"] or a["prog_ifindex"] or a["func_info_cnt"] or a["line_info_cnt"] \
            or a["attach_btf_id"] or a["attach_prog_fd"] or a["fd_array"] \
            or a["core_relo_cnt"]:
        raise BpfError(errno.EINVAL, "prog_flags, offload, BTF info, attach targets, fd_array"
                       " and CO-RE relocations are not supported")
    if bool(a["log_level"]) != bool(a["log_buf"]):
        raise BpfError(errno.EINVAL, "log_level and log_buf go together")
    needs = PROG_TYPE_CAPABILITIES.get(a.num("prog_type"))
    if needs is not None:
        _require(t, needs, f"loading a {ProgType(a.num('prog_type')).name} program")
    insns = t.read(a.num("insns"), count * abi.BPF_INSN_SIZE)
    license = _bounded_string(t, a.num("license"), abi.LICENSE_MAX).decode("latin-1")
    name = obj_name(a["prog_name"])  # type: ignore[arg-type]
    t.check()
    map_fds: dict[int, int] = {}
    try:
        for number in set(calls.map_fds_in(insns)):
            try:
                map_fds[number] = t.getfd(number)
            except OSError:
                pass  # the daemon reports the instruction naming a bad fd
        try:
            fd, log = ctx.run(_prog_load_call(ctx.client.session, a, insns, license, name,
                                              map_fds))
        except VerifierError as e:
            _write_log(t, a, e.log)
            raise
    finally:
        for mine in map_fds.values():
            os.close(mine)
    try:
        _write_log(t, a, log)
    except BaseException:
        os.close(fd)
        raise
    return Inject(fd)


def _path(t: Caller, a: Attr) -> tuple[bytes, int]:
    """The pathname and the directory it is relative to (path_fd with BPF_F_PATH_FD)."""
    flags = a.num("file_flags")
    if flags & ~(ObjFlag.RDONLY | ObjFlag.WRONLY | ObjFlag.PATH_FD) or \
            (a["path_fd"] and not flags & ObjFlag.PATH_FD):
        raise BpfError(errno.EINVAL, f"file_flags {flags:#x}")
    path = t.read_string(a.num("pathname"))
    dirfd = a.num("path_fd") if flags & ObjFlag.PATH_FD else abi.AT_FDCWD
    return path, dirfd


def obj_get(t: Caller, a: Attr, ctx: Context) -> Outcome:
    if a["bpf_fd"]:
        raise BpfError(errno.EINVAL, "bpf_fd must be 0 for BPF_OBJ_GET")
    path, dirfd = _path(t, a)
    pfd = t.resolve(path, dirfd)
    try:
        t.check()  # the path, root and cwd were the waiting caller's (its TID was not reused)
        flags = a.num("file_flags") & (ObjFlag.RDONLY | ObjFlag.WRONLY)
        _may(t, pfd, {ObjFlag.RDONLY: os.R_OK, ObjFlag.WRONLY: os.W_OK}.get(
            flags, os.R_OK | os.W_OK))
        return Inject(ctx.client.obj_get(f"/proc/self/fd/{pfd}", flags))
    finally:
        os.close(pfd)


def _obj_pin_call(session: calls.Session, fd: int, dirfd: int, name: bytes, umask: int
                  ) -> calls.Call:
    handle, _ = yield from calls.bind(session, fd)
    yield calls.Request("obj_pin", (handle, name, umask), (dirfd,))


def obj_pin(t: Caller, a: Attr, ctx: Context) -> Outcome:
    path, dirfd = _path(t, a)
    if a.num("file_flags") & (ObjFlag.RDONLY | ObjFlag.WRONLY):
        raise BpfError(errno.EINVAL, "BPF_OBJ_PIN takes no access flags")
    if not path:
        raise BpfError(errno.ENOENT, "empty pin path")
    parent, name = os.path.split(path.rstrip(b"/") or b"/")
    t.check()
    with object_fd(t, ctx, a.num("bpf_fd")) as (fd, _info):
        pfd = t.resolve(parent or b".", dirfd)
        try:
            umask = _umask(t)
            t.check()  # root, cwd and umask were the waiting caller's (its TID was not reused)
            if name in (b"", b".", b"..") or path.endswith(b"/"):
                exists = os.path.lexists(b"/proc/self/fd/%d/%s" % (pfd, name))
                raise BpfError(errno.EEXIST if exists or name in (b"", b".", b"..")
                               else errno.ENOENT, "a pin path names a directory")
            if not os.path.lexists(b"/proc/self/fd/%d/%s" % (pfd, name)):  # else EEXIST
                _may(t, pfd, os.W_OK | os.X_OK)
            ctx.run(_obj_pin_call(ctx.client.session, fd, pfd, name, umask))
        finally:
            os.close(pfd)
    return Reply()


def prog_test_run(t: Caller, a: Attr, ctx: Context) -> Outcome:
    if (bool(a["ctx_size_in"]) != bool(a["ctx_in"])) or \
            (bool(a["ctx_size_out"]) != bool(a["ctx_out"])):
        raise BpfError(errno.EINVAL, "ctx sizes and pointers go together")
    if a["flags"] or a["cpu"] or a["batch_size"]:
        raise BpfError(errno.EINVAL, "flags, cpu and batch_size are not for these programs")
    size_in, ctx_size = a.num("data_size_in"), a.num("ctx_size_in")
    if size_in > abi.TEST_RUN_MAX or ctx_size > abi.TEST_RUN_MAX:
        raise BpfError(errno.EINVAL, f"data_size_in {size_in} too large")
    with object_fd(t, ctx, a.num("prog_fd"), "prog") as (fd, _info):
        data = t.read(a.num("data_in"), size_in)
        ctx_in = t.read(a.num("ctx_in"), ctx_size) if ctx_size else None
        t.check()
        run = ctx.client.prog_test_run(fd, data, a.num("repeat"), ctx_in)
    error = 0
    if a["data_out"]:  # bpf_test_finish: what fits, then ENOSPC with the full size
        room = a.num("data_size_out")
        if len(run.data_out) > room:
            error = errno.ENOSPC
        t.write(a.num("data_out"), run.data_out[:room])
    if a["ctx_out"] and run.ctx_out:
        room = a.num("ctx_size_out")
        if len(run.ctx_out) > room:
            error = errno.ENOSPC
        t.write(a.num("ctx_out"), run.ctx_out[:room])
        t.write(a.where("ctx_size_out"), a.pack("ctx_size_out", len(run.ctx_out)))
    t.write(a.where("data_size_out"), a.pack("data_size_out", len(run.data_out)))
    t.write(a.where("retval"), a.pack("retval", run.retval & 0xFFFFFFFF))
    t.write(a.where("duration"), a.pack("duration", min(run.duration, 0xFFFFFFFF)))
    return Reply(error=error)


def _kind(a: Attr) -> str:
    return "prog" if a.cmd in (Cmd.PROG_GET_NEXT_ID, Cmd.PROG_GET_FD_BY_ID) else "map"


def get_next_id(t: Caller, a: Attr, ctx: Context) -> Outcome:
    nxt = ctx.client.get_next_id(_kind(a), a.num("start_id"))
    t.write(a.where("next_id"), a.pack("next_id", nxt))
    return Reply()


def get_fd_by_id(t: Caller, a: Attr, ctx: Context) -> Outcome:
    if a.cmd == Cmd.MAP_GET_FD_BY_ID and a.num("open_flags") & ~(ObjFlag.RDONLY
                                                                    | ObjFlag.WRONLY):
        raise BpfError(errno.EINVAL, "open_flags")
    return Inject(ctx.client.get_fd_by_id(_kind(a), a.num("id")))


def obj_get_info_by_fd(t: Caller, a: Attr, ctx: Context) -> Outcome:
    """The kernel's rules: a caller's struct longer than ours needs a zero tail (E2BIG); we
    write min(its length, ours) and put that length back in info_len. A program's arrays go
    where the caller's struct points, within the counts it gives."""
    info_len, where = a.num("info_len"), a.num("info")
    # a closed fd is EBADFD here on the running kernel (6.18's CLASS(fd)), EBADF elsewhere
    with object_fd(t, ctx, a.num("bpf_fd"), closed=errno.EBADFD) as (fd, bound):
        kind = bound.get("kind")
        if kind not in ("map", "prog"):
            raise BpfError(errno.EINVAL, f"no info for a {kind} fd")
        ours = abi.MAP_INFO_SIZE if kind == "map" else abi.PROG_INFO_SIZE
        if info_len > PAGE_SIZE:  # bpf_check_uarg_tail_zero, before reading anything
            raise BpfError(errno.E2BIG, f"info_len {info_len} is more than a page")
        if info_len > ours and any(t.read(where + ours, info_len - ours)):
            raise BpfError(errno.E2BIG, "info struct with non-zero bytes past ours")
        n = min(info_len, ours)
        user = bytearray(t.read(where, n).ljust(ours, b"\0"))
        t.check()
        info = ctx.client.obj_get_info_by_fd(fd)
        if kind == "map":
            out = map_info(bound["type"], info["id"], info["bytes_key"], info["bytes_value"],
                           info["max_entries"], info["flags"], info["name"])
        else:
            out = _prog_info(t, ctx, fd, bound, info, user)
    t.write(where, out[:n])
    t.write(a.where("info_len"), a.pack("info_len", n))
    return Reply()


def _prog_info(t: Caller, ctx: Context, fd: int, bound: dict, info: dict, user: bytearray
               ) -> bytes:
    map_ids: list[int] = info["map_ids"]
    xlated = xlated_for_dump(ctx.client.prog_xlated(fd), map_ids)
    tag = bytes.fromhex(info["tag"])
    want_insns, want_maps = get(user, "xlated_prog_len"), get(user, "nr_map_ids")
    want_tags = get(user, "nr_prog_tags")
    if want_insns and xlated:
        t.write(get(user, "xlated_prog_insns"), xlated[:want_insns])
    if want_maps and map_ids:
        ids = map_ids[:want_maps]
        t.write(get(user, "map_ids"), struct.pack(f"<{len(ids)}I", *ids))
    if want_tags:
        t.write(get(user, "prog_tags"), tag)
    for name, value in (
            ("type", bound["type"]), ("id", info["id"]), ("tag", tag), ("jited_prog_len", 0),
            ("xlated_prog_len", len(xlated)), ("load_time", boot_ns(info["loaded_at"])),
            ("created_by_uid", info["uid"]), ("nr_map_ids", len(map_ids)),
            ("name", info["name"].encode("latin-1")[:15]), ("ifindex", 0),
            ("gpl_compatible", 1 if info["gpl_compatible"] else 0), ("netns_dev", 0),
            ("netns_ino", 0), ("nr_jited_ksyms", 0), ("nr_jited_func_lens", 0), ("btf_id", 0),
            ("nr_func_info", 0), ("nr_line_info", 0), ("nr_jited_line_info", 0),
            ("nr_prog_tags", 1), ("run_time_ns", info.get("run_time_ns", 0)),
            ("run_cnt", info.get("run_cnt", 0)), ("recursion_misses", 0),
            ("verified_insns", 0), ("attach_btf_obj_id", 0), ("attach_btf_id", 0)):
        put(user, name, value)
    return bytes(user)


def btf_load(t: Caller, a: Attr, ctx: Context) -> Outcome:
    """No BTF yet: EINVAL, on which libbpf and cilium/ebpf load without it (as on a kernel
    built without CONFIG_DEBUG_INFO_BTF)."""
    return Reply(error=errno.EINVAL)


# the batch commands each map type has (map->ops->map_*_batch); others are ENOTSUPP
BATCH_COMMANDS: dict[int, frozenset[int]] = {
    MapType.HASH: frozenset({Cmd.MAP_LOOKUP_BATCH, Cmd.MAP_LOOKUP_AND_DELETE_BATCH,
                             Cmd.MAP_UPDATE_BATCH, Cmd.MAP_DELETE_BATCH}),
    MapType.ARRAY: frozenset({Cmd.MAP_LOOKUP_BATCH, Cmd.MAP_UPDATE_BATCH}),
}


def _batch_args(a: Attr, info: dict, sizes: int) -> int:
    """The element count of a batch call, bounded before anything is read: at most the map's
    max_entries for a lookup, and BATCH_MAX_BYTES of keys and values in all."""
    if a.cmd not in BATCH_COMMANDS.get(info["type"], ()):
        raise BpfError(abi.ENOTSUPP, "this map type has no such batch command")
    if a["flags"] or a["elem_flags"]:
        raise BpfError(errno.EINVAL, "batch flags are not supported (BPF_F_LOCK)")
    count = a.num("count")
    if count * sizes > abi.BATCH_MAX_BYTES:
        raise BpfError(errno.E2BIG, f"a batch of {count} elements is too large here")
    return count


def _lookup_batch(t: Caller, a: Attr, ctx: Context, delete: bool) -> Outcome:
    """BPF_MAP_LOOKUP(_AND_DELETE)_BATCH. The cursor is the kernel's: a u32 for hash maps
    (here a token standing for bpffsd's cursor key, as the kernel's bucket number is opaque
    to callers), the last key for arrays. The buffers are read first, so an unmapped one is
    EFAULT before any element is deleted."""
    with object_fd(t, ctx, a.num("map_fd"), "map") as (fd, info):
        ks, vs = info["key_size"], info["value_size"]
        count = min(_batch_args(a, info, ks + vs), info["max_entries"])
        if count == 0:
            return Reply()
        hashed = info["type"] == MapType.HASH
        cursor = None
        if a["in_batch"]:
            raw = t.read(a.num("in_batch"), abi.HASH_BATCH_CURSOR_SIZE if hashed else ks)
            cursor = ctx.batch_cursor(info["handle"], raw) if hashed else raw
        t.read(a.num("keys"), count * ks)
        t.read(a.num("values"), count * vs)
        t.check()
        keys, values, nxt = ctx.client.map_lookup_batch(fd, count, cursor, delete)
    t.write(a.num("keys"), b"".join(keys))
    t.write(a.num("values"), b"".join(values))
    t.write(a.where("count"), a.pack("count", len(keys)))
    if nxt is not None:
        t.write(a.num("out_batch"), ctx.new_batch_cursor(info["handle"], nxt) if hashed else nxt)
        return Reply()
    return Reply(error=errno.ENOENT)  # the walk reached the end: the kernel's signal


def map_lookup_batch(t: Caller, a: Attr, ctx: Context) -> Outcome:
    return _lookup_batch(t, a, ctx, delete=False)


def map_lookup_and_delete_batch(t: Caller, a: Attr, ctx: Context) -> Outcome:
    return _lookup_batch(t, a, ctx, delete=True)


def _batch_done(t: Caller, a: Attr, call: Callable[[], int]) -> Outcome:
    """Run an update or delete batch; count says how many took effect, failure or not."""
    try:
        done = call()
    except BatchError as e:
        t.write(a.where("count"), a.pack("count", e.count))
        raise
    t.write(a.where("count"), a.pack("count", done))
    return Reply()


def map_update_batch(t: Caller, a: Attr, ctx: Context) -> Outcome:
    with object_fd(t, ctx, a.num("map_fd"), "map") as (fd, info):
        ks, vs = info["key_size"], info["value_size"]
        count = _batch_args(a, info, ks + vs)
        keys, values = t.read(a.num("keys"), count * ks), t.read(a.num("values"), count * vs)
        t.check()
        return _batch_done(t, a, lambda: ctx.client.map_update_batch(
            fd, [keys[i:i + ks] for i in range(0, len(keys), ks)],
            [values[i:i + vs] for i in range(0, len(values), vs)], a.num("elem_flags")))


def map_delete_batch(t: Caller, a: Attr, ctx: Context) -> Outcome:
    with object_fd(t, ctx, a.num("map_fd"), "map") as (fd, info):
        ks = info["key_size"]
        keys = t.read(a.num("keys"), _batch_args(a, info, ks) * ks)
        t.check()
        return _batch_done(t, a, lambda: ctx.client.map_delete_batch(
            fd, [keys[i:i + ks] for i in range(0, len(keys), ks)]))


BPF: dict[int, Callable[[Caller, Attr, Context], Outcome]] = {
    Cmd.MAP_CREATE: map_create,
    Cmd.MAP_LOOKUP_ELEM: map_lookup_elem,
    Cmd.MAP_UPDATE_ELEM: map_update_elem,
    Cmd.MAP_DELETE_ELEM: map_delete_elem,
    Cmd.MAP_GET_NEXT_KEY: map_get_next_key,
    Cmd.PROG_LOAD: prog_load,
    Cmd.OBJ_PIN: obj_pin,
    Cmd.OBJ_GET: obj_get,
    Cmd.PROG_TEST_RUN: prog_test_run,
    Cmd.PROG_GET_NEXT_ID: get_next_id,
    Cmd.MAP_GET_NEXT_ID: get_next_id,
    Cmd.PROG_GET_FD_BY_ID: get_fd_by_id,
    Cmd.MAP_GET_FD_BY_ID: get_fd_by_id,
    Cmd.OBJ_GET_INFO_BY_FD: obj_get_info_by_fd,
    Cmd.BTF_LOAD: btf_load,
    Cmd.MAP_LOOKUP_BATCH: map_lookup_batch,
    Cmd.MAP_LOOKUP_AND_DELETE_BATCH: map_lookup_and_delete_batch,
    Cmd.MAP_UPDATE_BATCH: map_update_batch,
    Cmd.MAP_DELETE_BATCH: map_delete_batch,
}


SYSCALLS: dict[int, Callable[[Caller, tuple[int, ...], Context], Outcome]] = {
    abi.Nr.bpf: sys_bpf,
    abi.Nr.statfs: files.sys_statfs,
    abi.Nr.fstatfs: files.sys_fstatfs,
    abi.Nr.readlink: files.sys_readlink,
    abi.Nr.readlinkat: files.sys_readlinkat,
    abi.Nr.openat: files.sys_openat,
    abi.Nr.open: files.sys_open,
    abi.Nr.mount: files.sys_mount,
}


def handle(t: Caller, nr: int, args: tuple[int, ...], ctx: Context) -> Outcome:
    """The outcome of one intercepted syscall, errors included (Gone propagates: no answer)."""
    handler = SYSCALLS.get(nr)
    if handler is None:
        return CONTINUE
    try:
        return handler(t, args, ctx)
    except Fault:
        t.check()  # a dead or interrupted caller's memory reads as nothing: not its fault
        return Reply(error=errno.EFAULT)
    except AttrError as e:
        return Reply(error=e.errno)
    except OSError as e:
        return Reply(error=e.errno or errno.EIO)

