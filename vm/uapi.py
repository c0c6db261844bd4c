"""The kernel's BPF ABI: one table of every number the rest of the code base uses.

Values are those of include/uapi/linux/bpf.h, pkt_cls.h, if_ether.h and filter.h (the 4.4
enums keep their numbers in today's header). Nothing else in the project spells these numbers;
import them from here.
Instruction opcodes live in `bpffs.vm.isa`, beside the decoder that uses them.
"""

from enum import IntEnum, IntFlag


class Cmd(IntEnum):
    """bpf(2) commands (the subset this project implements, plus those named in errors)."""

    MAP_CREATE = 0
    MAP_LOOKUP_ELEM = 1
    MAP_UPDATE_ELEM = 2
    MAP_DELETE_ELEM = 3
    MAP_GET_NEXT_KEY = 4
    PROG_LOAD = 5
    OBJ_PIN = 6
    OBJ_GET = 7
    PROG_TEST_RUN = 10
    PROG_GET_NEXT_ID = 11
    MAP_GET_NEXT_ID = 12
    PROG_GET_FD_BY_ID = 13
    MAP_GET_FD_BY_ID = 14
    OBJ_GET_INFO_BY_FD = 15
    BTF_LOAD = 18
    MAP_LOOKUP_BATCH = 24
    MAP_LOOKUP_AND_DELETE_BATCH = 25
    MAP_UPDATE_BATCH = 26
    MAP_DELETE_BATCH = 27


class MapType(IntEnum):
    """enum bpf_map_type: the map kinds of Linux 4.4 that bpffsd implements."""

    UNSPEC = 0
    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERF_EVENT_ARRAY = 4


class ProgType(IntEnum):
    """enum bpf_prog_type: the program kinds of Linux 4.4 that bpffsd verifies and runs."""

    UNSPEC = 0
    SOCKET_FILTER = 1
    KPROBE = 2
    SCHED_CLS = 3
    SCHED_ACT = 4


# bpftool's names for the types, used in CLI output and JSON ("type": "hash").
MAP_TYPE_NAMES = {
    MapType.HASH: "hash",
    MapType.ARRAY: "array",
    MapType.PROG_ARRAY: "prog_array",
    MapType.PERF_EVENT_ARRAY: "perf_event_array",
}
PROG_TYPE_NAMES = {
    ProgType.SOCKET_FILTER: "socket_filter",
    ProgType.KPROBE: "kprobe",
    ProgType.SCHED_CLS: "sched_cls",
    ProgType.SCHED_ACT: "sched_act",
}


class UpdateFlag(IntEnum):
    """flags of BPF_MAP_UPDATE_ELEM."""

    ANY = 0  # create a new element or update an existing one
    NOEXIST = 1  # create a new element only if it did not exist
    EXIST = 2  # update an existing element


BPF_ANY = UpdateFlag.ANY
BPF_NOEXIST = UpdateFlag.NOEXIST
BPF_EXIST = UpdateFlag.EXIST


class ObjFlag(IntFlag):
    """file_flags of BPF_OBJ_GET (and map_flags of MAP_CREATE for the access bits)."""

    RDONLY = 1 << 3
    WRONLY = 1 << 4
    PATH_FD = 1 << 14


class Helper(IntEnum):
    """Helper function ids: the 4.4 set (1-25), in the kernel's order."""

    map_lookup_elem = 1
    map_update_elem = 2
    map_delete_elem = 3
    probe_read = 4
    ktime_get_ns = 5
    trace_printk = 6
    get_prandom_u32 = 7
    get_smp_processor_id = 8
    skb_store_bytes = 9
    l3_csum_replace = 10
    l4_csum_replace = 11
    tail_call = 12
    clone_redirect = 13
    get_current_pid_tgid = 14
    get_current_uid_gid = 15
    get_current_comm = 16
    get_cgroup_classid = 17
    skb_vlan_push = 18
    skb_vlan_pop = 19
    skb_get_tunnel_key = 20
    skb_set_tunnel_key = 21
    perf_event_read = 22
    redirect = 23
    get_route_realm = 24
    perf_event_output = 25


# Helper flag bits (include/uapi/linux/bpf.h).
BPF_F_RECOMPUTE_CSUM = 1 << 0  # skb_store_bytes
BPF_F_INVALIDATE_HASH = 1 << 1  # skb_store_bytes (4.5+)
BPF_F_HDR_FIELD_MASK = 0xF  # l3/l4_csum_replace: size of the field in the low bits
BPF_F_PSEUDO_HDR = 1 << 4  # l4_csum_replace: the field is part of the pseudo-header
BPF_F_MARK_MANGLED_0 = 1 << 5  # l4_csum_replace (4.6+)
BPF_F_INGRESS = 1 << 0  # redirect, clone_redirect
BPF_F_TUNINFO_IPV6 = 1 << 0  # skb_get/set_tunnel_key (4.5+)
BPF_F_INDEX_MASK = 0xFFFFFFFF  # perf_event_read/output: the map index
BPF_F_CURRENT_CPU = BPF_F_INDEX_MASK
BPF_F_CTXLEN_MASK = 0xFFFFF << 32

# Pseudo source registers (the only ones named here): an LD_IMM64 whose imm is a map fd, and a
# bpf-to-bpf call (a BPF_CALL whose imm is a relative instruction offset, not a helper id).
BPF_PSEUDO_MAP_FD = 1
BPF_PSEUDO_CALL = 1


class TcAct(IntEnum):
    """Verdicts of cls_bpf direct-action and act_bpf programs (pkt_cls.h)."""

    UNSPEC = -1
    OK = 0
    RECLASSIFY = 1
    SHOT = 2
    PIPE = 3
    STOLEN = 4
    QUEUED = 5
    REPEAT = 6
    REDIRECT = 7


# Limits of the 4.4 kernel (include/linux/filter.h, kernel/bpf/*.c).
MAX_BPF_STACK = 512
BPF_MAXINSNS = 4096
BPF_OBJ_NAME_LEN = 16
MAX_TAIL_CALL_CNT = 32
BPF_LOG_MIN_SIZE = 128  # log_size below this (with log_level set) is EINVAL
BPF_LOG_MAX_SIZE = (1 << 24) - 1  # UINT_MAX >> 8 in 4.4; larger is EINVAL
TASK_COMM_LEN = 16
PAGE_SIZE = 4096
# map_flags at BPF_MAP_CREATE.
BPF_F_NO_PREALLOC = 1 << 0  # hash (4.6+)
BPF_F_MMAPABLE = 1 << 10  # array (5.5+): user space may mmap the values, and write them
# The largest kmalloc on x86_64 (KMALLOC_MAX_SIZE = 1 << (MAX_PAGE_ORDER + PAGE_SHIFT)): bounds
# a hash map's key_size + value_size, as in the running kernel.
KMALLOC_MAX_SIZE = 1 << 22
BPF_F_MARK_ENFORCE = 1 << 6  # l4_csum_replace (4.9+)
CSUM_MANGLED_0 = 0xFFFF  # a UDP checksum computed as 0 is sent as this
BPF_COMPLEXITY_LIMIT_INSNS = 1_000_000  # privileged programs (5.2+); unprivileged keep BPF_MAXINSNS

# Ethernet (include/uapi/linux/if_ether.h, if_vlan.h).
ETH_HLEN = 14
ETH_ALEN = 6
VLAN_HLEN = 4
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
# BPF_LD_ABS negative offsets (include/uapi/linux/filter.h).
SKF_NET_OFF = -0x100000
SKF_LL_OFF = -0x200000
