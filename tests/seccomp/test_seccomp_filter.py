"""The seccomp filter's decisions, by running its classic-BPF program here on made-up
seccomp_data (no kernel needed): what reaches the supervisor and what never does."""

from __future__ import annotations

import os
import struct

import pytest

from bpffs.client.seccomp import abi
from bpffs.client.seccomp import filter as seccomp_filter

_JGE_K = 0x35


def decide(program: bytes, nr: int, args: tuple[int, ...] = (0,) * 6,
           arch: int = abi.AUDIT_ARCH_X86_64) -> int:
    """Run the program as the kernel would on struct seccomp_data: its return value."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *args)
    insns = [abi.SOCK_FILTER.unpack_from(program, off)
             for off in range(0, len(program), abi.SOCK_FILTER.size)]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == abi.BPF_LD_W_ABS:
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == abi.BPF_RET_K:
            return k
        elif code in (abi.BPF_JMP_JEQ_K, abi.BPF_JMP_JSET_K, _JGE_K):
            taken = {abi.BPF_JMP_JEQ_K: acc == k, abi.BPF_JMP_JSET_K: bool(acc & k),
                     _JGE_K: acc >= k}[code]
            pc += jt if taken else jf
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


PROGRAM = seccomp_filter.build()


@pytest.mark.parametrize("nr", [abi.Nr.bpf, abi.Nr.statfs, abi.Nr.fstatfs, abi.Nr.readlink,
                                abi.Nr.readlinkat, abi.Nr.mount])
def test_always_notified(nr: int) -> None:
    assert decide(PROGRAM, nr) == abi.SECCOMP_RET_USER_NOTIF


@pytest.mark.parametrize(("nr", "flags_arg"), [(abi.Nr.openat, 2), (abi.Nr.open, 1)])
def test_opens_notified_only_when_a_plain_read(nr: int, flags_arg: int) -> None:
    """fopen "r" (bpftool's fdinfo reads) is sent; O_CLOEXEC opens (ld.so, Go, Python: almost
    every open) are not, nor anything that writes, creates or is no read of a file."""
    def with_flags(flags: int) -> tuple[int, ...]:
        args = [0] * 6
        args[flags_arg] = flags
        return tuple(args)

    for plain in (os.O_RDONLY, os.O_RDONLY | os.O_NOCTTY, os.O_RDONLY | os.O_LARGEFILE):
        assert decide(PROGRAM, nr, with_flags(plain)) == abi.SECCOMP_RET_USER_NOTIF
    for more in (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_DIRECTORY, abi.O_PATH,
                 os.O_RDONLY | os.O_TRUNC, os.O_RDONLY | os.O_CLOEXEC):
        assert decide(PROGRAM, nr, with_flags(more)) == abi.SECCOMP_RET_ALLOW


def test_everything_else_runs_in_the_kernel() -> None:
    for nr in (0, 1, 39, 59, 231, abi.Nr.seccomp, abi.Nr.pidfd_getfd, 450):
        assert decide(PROGRAM, nr) == abi.SECCOMP_RET_ALLOW


def test_other_routes_to_bpf_are_killed() -> None:
    """A 32-bit (int 0x80) or x32 caller would reach bpf() under numbers this table does not
    know: killed, never let past."""
    i386 = 0x40000003  # AUDIT_ARCH_I386
    assert decide(PROGRAM, 357, arch=i386) == abi.SECCOMP_RET_KILL_PROCESS
    assert decide(PROGRAM, abi.X32_SYSCALL_BIT | abi.Nr.bpf) == abi.SECCOMP_RET_KILL_PROCESS
