"""The classic-BPF seccomp program: which syscalls reach the supervisor.

Sent (SECCOMP_RET_USER_NOTIF): bpf() always (every command, feature probes included: a probe
the kernel answered would describe the kernel, not bpffsd); statfs, fstatfs, readlink,
readlinkat and mount, which tools use to accept our mount and fds (measured with strace, see
RESEARCH.md section 1); open and openat only when they are a plain read without O_CLOEXEC
(what fopen "r" of /proc/self/fdinfo/N does), since the filter cannot see the path.
Everything else runs in the kernel without a round trip. Another architecture, or the x32
ABI, is a second route to bpf() that this table does not cover: the process is killed rather
than let past.
"""

from __future__ import annotations

from . import abi

# syscalls sent whatever their arguments
ALWAYS: tuple[abi.Nr, ...] = (abi.Nr.bpf, abi.Nr.statfs, abi.Nr.fstatfs, abi.Nr.readlink,
                              abi.Nr.readlinkat, abi.Nr.mount)
# syscall -> index of its flags argument: sent only for a plain read (no OPEN_NOT_PLAIN_READ)
PLAIN_READ_OPENS: dict[abi.Nr, int] = {abi.Nr.openat: 2, abi.Nr.open: 1}

_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K


def _stmt(code: int, k: int) -> tuple[int, int, object, object]:
    return (code, k, None, None)


def build(always: tuple[abi.Nr, ...] = ALWAYS,
          plain_read_opens: dict[abi.Nr, int] | None = None) -> bytes:
    """The filter program. Jump targets are labels ('notify', 'allow', 'kill', or a
    per-open label) resolved to the kernel's forward offsets."""
    opens = PLAIN_READ_OPENS if plain_read_opens is None else plain_read_opens
    prog: list[tuple[int, int, object, object]] = [
        _stmt(abi.BPF_LD_W_ABS, abi.SECCOMP_DATA_ARCH),
        (abi.BPF_JMP_JEQ_K, abi.AUDIT_ARCH_X86_64, 0, "kill"),
        _stmt(abi.BPF_LD_W_ABS, abi.SECCOMP_DATA_NR),
        (_JGE_K, abi.X32_SYSCALL_BIT, "kill", 0),
    ]
    prog += [(abi.BPF_JMP_JEQ_K, int(nr), "notify", 0) for nr in always]
    prog += [(abi.BPF_JMP_JEQ_K, int(nr), f"open{int(nr)}", 0) for nr in opens]
    prog.append(_stmt(abi.BPF_RET_K, abi.SECCOMP_RET_ALLOW))
    labels: dict[str, int] = {}
    for nr, flags_arg in opens.items():
        labels[f"open{int(nr)}"] = len(prog)
        prog += [_stmt(abi.BPF_LD_W_ABS, abi.seccomp_data_arg(flags_arg)),
                 (abi.BPF_JMP_JSET_K, abi.OPEN_NOT_PLAIN_READ, "allow", "notify")]
    labels["allow"] = len(prog)
    prog.append(_stmt(abi.BPF_RET_K, abi.SECCOMP_RET_ALLOW))
    labels["notify"] = len(prog)
    prog.append(_stmt(abi.BPF_RET_K, abi.SECCOMP_RET_USER_NOTIF))
    labels["kill"] = len(prog)
    prog.append(_stmt(abi.BPF_RET_K, abi.SECCOMP_RET_KILL_PROCESS))

    def offset(pc: int, target: object) -> int:
        if target is None or isinstance(target, int):
            return target or 0
        jump = labels[str(target)] - pc - 1
        assert 0 <= jump <= 255, "classic BPF jumps are forward and at most 255"
        return jump

    return b"".join(abi.SOCK_FILTER.pack(code, offset(pc, jt), offset(pc, jf), k & 0xFFFFFFFF)
                    for pc, (code, k, jt, jf) in enumerate(prog))
