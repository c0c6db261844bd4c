"""union bpf_attr as the kernel reads it, bpf_map_info / bpf_prog_info as it writes them, and
the fdinfo text of a bpf fd.

LAYOUTS is the one table of the attr's members per command (offsets from linux/bpf.h, checked
against Debian 12's header with offsetof). The kernel's rules, applied in its order:
  * a size above a page is E2BIG; a size above the union it knows needs a zero tail (E2BIG
    otherwise) and is cut to the union; a shorter one is zero-filled (bpf_check_uarg_tail_zero);
  * then, per command, every byte after the command's last member must be zero (CHECK_ATTR):
    EINVAL otherwise.
"""

from __future__ import annotations

import errno
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from bpffs.vm.isa import LD_IMM64, SRC_SHIFT
from bpffs.vm.uapi import BPF_OBJ_NAME_LEN, BPF_PSEUDO_MAP_FD, PAGE_SIZE, Cmd

from . import abi


@dataclass(frozen=True)
class Field:
    offset: int
    fmt: str  # struct format of the member (little endian, "I" u32, "Q" u64, "16s" a name)

    @property
    def size(self) -> int:
        return struct.calcsize("<" + self.fmt)


def _fields(*spec: tuple[str, int, str]) -> dict[str, Field]:
    return {name: Field(offset, fmt) for name, offset, fmt in spec}


_ELEM = _fields(("map_fd", 0, "I"), ("key", 8, "Q"), ("value", 16, "Q"), ("flags", 24, "Q"))
_OBJ = _fields(("pathname", 0, "Q"), ("bpf_fd", 8, "I"), ("file_flags", 12, "I"),
               ("path_fd", 16, "i"))
_BATCH = _fields(("in_batch", 0, "Q"), ("out_batch", 8, "Q"), ("keys", 16, "Q"),
                 ("values", 24, "Q"), ("count", 32, "I"), ("map_fd", 36, "I"),
                 ("elem_flags", 40, "Q"), ("flags", 48, "Q"))

# command -> (its members, the end of its last member: CHECK_ATTR's bound)
LAYOUTS: dict[int, tuple[dict[str, Field], int]] = {
    Cmd.MAP_CREATE: (_fields(
        ("map_type", 0, "I"), ("key_size", 4, "I"), ("value_size", 8, "I"),
        ("max_entries", 12, "I"), ("map_flags", 16, "I"), ("inner_map_fd", 20, "I"),
        ("numa_node", 24, "I"), ("map_name", 28, f"{BPF_OBJ_NAME_LEN}s"),
        ("map_ifindex", 44, "I"), ("btf_fd", 48, "I"), ("btf_key_type_id", 52, "I"),
        ("btf_value_type_id", 56, "I"), ("btf_vmlinux_value_type_id", 60, "I"),
        ("map_extra", 64, "Q")), 72),
    Cmd.MAP_LOOKUP_ELEM: (_ELEM, 32),
    Cmd.MAP_UPDATE_ELEM: (_ELEM, 32),
    Cmd.MAP_DELETE_ELEM: (_ELEM, 16),
    Cmd.MAP_GET_NEXT_KEY: (_fields(("map_fd", 0, "I"), ("key", 8, "Q"), ("next_key", 16, "Q")),
                           24),
    Cmd.PROG_LOAD: (_fields(
        ("prog_type", 0, "I"), ("insn_cnt", 4, "I"), ("insns", 8, "Q"), ("license", 16, "Q"),
        ("log_level", 24, "I"), ("log_size", 28, "I"), ("log_buf", 32, "Q"),
        ("kern_version", 40, "I"), ("prog_flags", 44, "I"),
        ("prog_name", 48, f"{BPF_OBJ_NAME_LEN}s"), ("prog_ifindex", 64, "I"),
        ("expected_attach_type", 68, "I"), ("prog_btf_fd", 72, "I"),
        ("func_info_rec_size", 76, "I"), ("func_info", 80, "Q"), ("func_info_cnt", 88, "I"),
        ("line_info_rec_size", 92, "I"), ("line_info", 96, "Q"), ("line_info_cnt", 104, "I"),
        ("attach_btf_id", 108, "I"), ("attach_prog_fd", 112, "I"), ("core_relo_cnt", 116, "I"),
        ("fd_array", 120, "Q"), ("core_relos", 128, "Q"), ("core_relo_rec_size", 136, "I")),
        140),
    Cmd.OBJ_PIN: (_OBJ, 20),
    Cmd.OBJ_GET: (_OBJ, 20),
    Cmd.PROG_TEST_RUN: (_fields(
        ("prog_fd", 0, "I"), ("retval", 4, "I"), ("data_size_in", 8, "I"),
        ("data_size_out", 12, "I"), ("data_in", 16, "Q"), ("data_out", 24, "Q"),
        ("repeat", 32, "I"), ("duration", 36, "I"), ("ctx_size_in", 40, "I"),
        ("ctx_size_out", 44, "I"), ("ctx_in", 48, "Q"), ("ctx_out", 56, "Q"),
        ("flags", 64, "I"), ("cpu", 68, "I"), ("batch_size", 72, "I")), 76),
    Cmd.PROG_GET_NEXT_ID: (_fields(("start_id", 0, "I"), ("next_id", 4, "I")), 8),
    Cmd.MAP_GET_NEXT_ID: (_fields(("start_id", 0, "I"), ("next_id", 4, "I")), 8),
    Cmd.PROG_GET_FD_BY_ID: (_fields(("id", 0, "I")), 4),
    Cmd.MAP_GET_FD_BY_ID: (_fields(("id", 0, "I"), ("open_flags", 8, "I")), 12),
    Cmd.OBJ_GET_INFO_BY_FD: (_fields(("bpf_fd", 0, "I"), ("info_len", 4, "I"),
                                     ("info", 8, "Q")), 16),
    Cmd.BTF_LOAD: (_fields(("btf", 0, "Q"), ("btf_log_buf", 8, "Q"), ("btf_size", 16, "I"),
                           ("btf_log_size", 20, "I"), ("btf_log_level", 24, "I"),
                           ("btf_log_true_size", 28, "I")), 32),
    Cmd.MAP_LOOKUP_BATCH: (_BATCH, 56),
    Cmd.MAP_LOOKUP_AND_DELETE_BATCH: (_BATCH, 56),
    Cmd.MAP_UPDATE_BATCH: (_BATCH, 56),
    Cmd.MAP_DELETE_BATCH: (_BATCH, 56),
}
# sizeof(union bpf_attr) as this table knows it (Linux 6.1's: PROG_LOAD is the largest member)
ATTR_SIZE = 144


class AttrError(Exception):
    """The attr is refused before any command runs: errno is the kernel's."""

    def __init__(self, err: int, message: str):
        super().__init__(message)
        self.errno = err


@dataclass
class Attr:
    """A decoded attr: its members by name, the address it came from (members the kernel
    writes back, such as next_id or info_len, go to addr + offset)."""

    cmd: int
    addr: int
    raw: bytes
    fields: dict[str, Field]

    def __getitem__(self, name: str) -> int | bytes:
        f = self.fields[name]
        return struct.unpack_from("<" + f.fmt, self.raw, f.offset)[0]

    def num(self, name: str) -> int:
        value = self[name]
        assert isinstance(value, int)
        return value

    def where(self, name: str) -> int:
        """The target address of a member (to write it back)."""
        return self.addr + self.fields[name].offset

    def pack(self, name: str, value: int) -> bytes:
        return struct.pack("<" + self.fields[name].fmt, value)


def read_attr(cmd: int, addr: int, size: int, read: Callable[[int, int], bytes]) -> Attr:
    """The attr of bpf(cmd, addr, size) with the kernel's size rules. read(addr, n) reads the
    caller's memory (raising its own fault). Unknown commands are read too (EFAULT or E2BIG
    come before EINVAL, as in __sys_bpf); the caller refuses them after."""
    if size > PAGE_SIZE:
        raise AttrError(errno.E2BIG, f"attr size {size} is more than a page")
    if size > ATTR_SIZE:
        if any(read(addr + ATTR_SIZE, size - ATTR_SIZE)):
            raise AttrError(errno.E2BIG, "attr has non-zero bytes past the union")
        size = ATTR_SIZE
    raw = read(addr, size).ljust(ATTR_SIZE, b"\0")
    fields, end = LAYOUTS.get(cmd, ({}, ATTR_SIZE))
    if any(raw[end:]):
        raise AttrError(errno.EINVAL, f"attr has non-zero bytes past command {cmd}'s members")
    return Attr(cmd, addr, raw, fields)


def obj_name(raw: bytes) -> str:
    """A map or program name (bpf_obj_name_cpy): NUL-terminated within 16 bytes, or EINVAL.
    The characters are the daemon's to check: latin-1 keeps every byte for it to refuse."""
    if b"\0" not in raw:
        raise AttrError(errno.EINVAL, "object name is not NUL-terminated")
    return raw.split(b"\0", 1)[0].decode("latin-1")


# -- what the kernel writes: bpf_map_info, bpf_prog_info --------------------------------------
MAP_INFO = struct.Struct("<6I16sIIQQIII4xQ")  # type, id, key, value, max, flags, name, ...
assert MAP_INFO.size == abi.MAP_INFO_SIZE


def map_info(map_type: int, map_id: int, key_size: int, value_size: int, max_entries: int,
             flags: int, name: str) -> bytes:
    """struct bpf_map_info of a map without BTF, offload or netns (those stay zero)."""
    return MAP_INFO.pack(map_type, map_id, key_size, value_size, max_entries, flags,
                         name.encode("latin-1")[:BPF_OBJ_NAME_LEN - 1], 0, 0, 0, 0, 0, 0, 0, 0)


# bpf_prog_info members (offset, format): what the kernel fills in, and the caller's
# (count, pointer) pairs it reads first.
PROG_INFO: dict[str, tuple[int, str]] = {
    "type": (0, "I"), "id": (4, "I"), "tag": (8, "8s"), "jited_prog_len": (16, "I"),
    "xlated_prog_len": (20, "I"), "jited_prog_insns": (24, "Q"),
    "xlated_prog_insns": (32, "Q"), "load_time": (40, "Q"), "created_by_uid": (48, "I"),
    "nr_map_ids": (52, "I"), "map_ids": (56, "Q"), "name": (64, "16s"), "ifindex": (80, "I"),
    "gpl_compatible": (84, "I"), "netns_dev": (88, "Q"), "netns_ino": (96, "Q"),
    "nr_jited_ksyms": (104, "I"), "nr_jited_func_lens": (108, "I"), "btf_id": (128, "I"),
    "nr_func_info": (144, "I"), "nr_line_info": (148, "I"), "nr_jited_line_info": (168, "I"),
    "nr_prog_tags": (180, "I"), "prog_tags": (184, "Q"), "run_time_ns": (192, "Q"),
    "run_cnt": (200, "Q"), "recursion_misses": (208, "Q"), "verified_insns": (216, "I"),
    "attach_btf_obj_id": (220, "I"), "attach_btf_id": (224, "I"),
}


def get(info: bytes | bytearray, name: str) -> int:
    offset, fmt = PROG_INFO[name]
    return struct.unpack_from("<" + fmt, info, offset)[0]


def put(info: bytearray, name: str, value: int | bytes) -> None:
    offset, fmt = PROG_INFO[name]
    struct.pack_into("<" + fmt, info, offset, value)


def boot_ns(wall_seconds: float) -> int:
    """A wall-clock time as ns since boot (bpf_prog_info.load_time's clock)."""
    booted = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return max(0, int((wall_seconds - booted) * 1e9))


def xlated_for_dump(insns: bytes, map_ids: list[int]) -> bytes:
    """The daemon's xlated program (map loads name the map's index in the program) as the
    kernel dumps it (bpf_insn_prepare_dump): imm is the map's id, the second half's imm 0."""
    out = bytearray(insns)
    for off in range(0, len(out) - 15, abi.BPF_INSN_SIZE):
        if out[off] == LD_IMM64 and out[off + 1] >> SRC_SHIFT == BPF_PSEUDO_MAP_FD:
            index = struct.unpack_from("<i", out, off + 4)[0]
            map_id = map_ids[index] if 0 <= index < len(map_ids) else 0
            struct.pack_into("<I", out, off + 4, map_id)
            struct.pack_into("<I", out, off + 12, 0)
    return bytes(out)


# -- /proc/PID/fdinfo/N ---------------------------------------------------------------------
def fdinfo_map(head: str, map_type: int, key_size: int, value_size: int, max_entries: int,
               flags: int, memlock: int, map_id: int, frozen: int) -> str:
    """A map fd's fdinfo as the kernel (6.x) prints it, after the generic head lines."""
    return (f"{head}map_type:\t{map_type}\nkey_size:\t{key_size}\nvalue_size:\t{value_size}\n"
            f"max_entries:\t{max_entries}\nmap_flags:\t{flags:#x}\nmap_extra:\t0x0\n"
            f"memlock:\t{memlock}\nmap_id:\t{map_id}\nfrozen:\t{frozen}\n")


def fdinfo_prog(head: str, prog_type: int, tag: str, memlock: int, prog_id: int,
                run_time_ns: int, run_cnt: int) -> str:
    """A program fd's fdinfo (never jited: we have no JIT the kernel would call one)."""
    return (f"{head}prog_type:\t{prog_type}\nprog_jited:\t0\nprog_tag:\t{tag}\n"
            f"memlock:\t{memlock}\nprog_id:\t{prog_id}\nrun_time_ns:\t{run_time_ns}\n"
            f"run_cnt:\t{run_cnt}\nrecursion_misses:\t0\nverified_insns:\t0\n")


def fdinfo_head(real: str) -> str:
    """pos, flags, mnt_id and ino of the real fd's fdinfo: an object fd is a socket opened
    O_RDWR and injected O_CLOEXEC, the flags of a kernel bpf fd (02000002)."""
    return "".join(line + "\n" for line in real.splitlines()
                   if line.split(":", 1)[0] in ("pos", "flags", "mnt_id", "ino"))
