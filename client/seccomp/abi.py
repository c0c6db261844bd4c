"""The kernel ABI numbers the seccomp supervisor needs and vm/uapi.py does not hold.

One table, x86_64 only (the filter kills a caller of any other architecture): syscall numbers,
seccomp(2) and its user-notification ioctls, and the constants the emulated syscalls answer
with. bpf commands, map and program types come from bpffs.vm.uapi; nothing here repeats them.
"""

from __future__ import annotations

import os
import struct
from enum import IntEnum


class Nr(IntEnum):
    """x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl)."""

    open = 2
    readlink = 89
    statfs = 137
    fstatfs = 138
    setgroups = 116  # the raw syscalls change the calling thread's credentials only
    setresuid = 117
    setresgid = 119
    setfsuid = 122
    setfsgid = 123
    mount = 165
    openat = 257
    readlinkat = 267
    seccomp = 317
    bpf = 321
    pidfd_open = 434
    openat2 = 437
    pidfd_getfd = 438


AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000  # x32 ABI numbers on x86_64: another route to bpf(), refused

# seccomp(2)
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_NOTIF_SIZES = 3
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5  # 5.19: after RECV only fatal signals interrupt
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_ADDFD_FLAG_SEND = 1 << 1
PR_SET_NO_NEW_PRIVS = 38

# ioctls on the listener: _IOWR('!', n, struct) with the x86_64 struct sizes
SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102
SECCOMP_IOCTL_NOTIF_ADDFD = 0x40182103
SECCOMP_IOCTL_NOTIF_SET_FLAGS = 0x40082104  # 6.6; its argument is the flags themselves
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP = 1

# struct seccomp_notif {u64 id; u32 pid; u32 flags; struct seccomp_data {s32 nr; u32 arch;
# u64 instruction_pointer; u64 args[6]}}; seccomp_notif_resp {u64 id; s64 val; s32 error;
# u32 flags}; seccomp_notif_addfd {u64 id; u32 flags; u32 srcfd; u32 newfd; u32 newfd_flags}
NOTIF = struct.Struct("=QIIiIQ6Q")
NOTIF_RESP = struct.Struct("=QqiI")
NOTIF_ADDFD = struct.Struct("=QIIII")
U64 = struct.Struct("=Q")  # ID_VALID's id, pidfd_info's mask: u64 arguments read by pointer
NOTIF_SIZES = struct.Struct("=HHH")  # seccomp_notif_sizes {u16 notif, notif_resp, data}
SOCK_FPROG = struct.Struct("=HxxxxxxQ")  # struct sock_fprog {u16 len; sock_filter *filter}
SOCK_FILTER = struct.Struct("=HBBI")  # struct sock_filter {u16 code; u8 jt, jf; u32 k}
SECCOMP_DATA_NR = 0  # offsets in struct seccomp_data, for the classic-BPF loads
SECCOMP_DATA_ARCH = 4


def seccomp_data_arg(index: int) -> int:
    """Offset of args[index]'s low 32 bits in struct seccomp_data (little endian)."""
    return 16 + 8 * index


# classic BPF (include/uapi/linux/filter.h)
BPF_LD_W_ABS = 0x20
BPF_JMP_JEQ_K = 0x15
BPF_JMP_JSET_K = 0x45
BPF_RET_K = 0x06

# files, paths, processes
AT_FDCWD = -100
O_PATH = 0o10000000
RESOLVE_IN_ROOT = 0x10
OPEN_HOW = struct.Struct("=QQQ")  # struct open_how {u64 flags, mode, resolve}
PIDFD_THREAD = os.O_EXCL  # 6.9: a pidfd naming a thread (a notification's pid is a TID)
# ioctl(pidfd, PIDFD_GET_INFO) (6.13): struct pidfd_info {u64 mask, cgroupid; u32 pid, tgid,
# ppid, ruid, rgid, euid, egid, suid, sgid, fsuid, fsgid; s32 exit_code}, ids in our namespace
PIDFD_GET_INFO = 0xC040FF0B  # _IOWR(0xFF, 11, 64 bytes)
PIDFD_INFO = struct.Struct("=QQ12I")
PIDFD_INFO_CREDS = 1 << 1
PIDFD_INFO_EUID = 7  # index of euid (then egid) in PIDFD_INFO's fields

# capabilities (linux/capability.h): what the kernel's bpf() asks of a caller
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
PATH_MAX = 4096
INT_MAX = 0x7FFFFFFF  # an fd number, a readlink(2) bufsiz: C int arguments
# no user mapping lies above this (x86_64 with 5-level paging: 1 << 56); higher addresses are
# the kernel's, EFAULT for copy_from_user, and beyond pread's signed offset anyway
USER_ADDRESS_END = 1 << 57
# open flags that never reach us: bpftool reads fdinfo with fopen "r" (exactly O_RDONLY).
# O_CLOEXEC is in the mask because ld.so, Python, Go and most libraries open every file with
# it: sending those would cost each of them a round trip (~13 us) for nothing. (libbpf and
# cilium/ebpf read fdinfo with O_CLOEXEC only when OBJ_GET_INFO_BY_FD fails, which it does
# not for our objects.)
OPEN_NOT_PLAIN_READ = (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_DIRECTORY | O_PATH
                       | os.O_TRUNC | os.O_CLOEXEC)

# mount(2) flags that make a call something other than a new mount (its fstype is then
# ignored): path_mount's order of remount, bind, propagation change and move
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MOUNT_NOT_NEW = MS_REMOUNT | MS_BIND | MS_MOVE | MS_UNBINDABLE | MS_PRIVATE | MS_SLAVE | MS_SHARED

# what the kernel's bpffs and bpf fds look like, and what ours are
BPF_FS_MAGIC = 0xCAFE4A11
FUSE_SUPER_MAGIC = 0x65735546
PROC_PREFIX = b"/proc/"
STATFS = struct.Struct("=7q2i7q")  # struct statfs on x86_64: f_type first (120 bytes)
ANON_INODE_MAP = b"anon_inode:bpf-map"
ANON_INODE_PROG = b"anon_inode:bpf-prog"

# sizes of what the kernel exchanges with bpf(2) callers
MAP_INFO_SIZE = 88  # struct bpf_map_info (as bpftool 7.1 / libbpf 1.1 know it)
PROG_INFO_SIZE = 232  # struct bpf_prog_info
BPF_INSN_SIZE = 8
LICENSE_MAX = 128  # bpf_prog_load's license buffer: a longer license is cut to 127 bytes
TEST_RUN_MAX = 1 << 20  # data_in/ctx_in read for a test run at most (the kernel's is a page)
BATCH_MAX_BYTES = 64 << 20  # keys and values of one batch call read at most (E2BIG beyond)
HASH_BATCH_CURSOR_SIZE = 4  # a hash map's in_batch/out_batch: the kernel's u32 bucket
BATCH_CURSORS = 1024  # hash walk cursors the supervisor remembers
ENOTSUPP = 524  # the kernel-internal errno bpf() returns for a batch command a map lacks

# the OCI seccomp agent (agent.py)
OCI_SECCOMP_FD_NAME = "seccompFd"  # the listener's name in the runtime's "fds" list
OCI_STATE_MAX = 1 << 20  # bytes of container state JSON read from a runtime
OCI_FDS_MAX = 16  # fds accepted with it (runc sends one)
OCI_RECEIVE_TIMEOUT = 5.0  # seconds a runtime has to send it
AGENT_BACKLOG = 64
AGENT_CONNECTIONS = 64  # bpffsd connections per container, one per credential set, at most
AGENT_ACCEPT_PAUSE = 0.1  # seconds between accepts that fail (EMFILE: until a container ends)
ID_UNCHANGED = 0xFFFFFFFF  # (uid_t)-1: setres*id and setfs*id leave such an id as it is

