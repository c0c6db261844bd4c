"""Adversarial: no program keeps the verifier busy for long (issue 13, finding 5).

A 252-instruction socket filter with 60 branch levels, each setting something on one side
only, kept the verifier busy for 31 s: under 4.4's pruning rules every path has a state of its
own (2**60). branch_levels() builds that shape (255 insns for 60 levels). Now, as in today's
kernel:
- pruning compares only the registers and stack slots read later (liveness) and, of scalars,
  only those whose value a check uses (a pointer offset, a helper's size: precision), so the
  verdict comes after one instruction a level here, a few in the kernel;
- where the values are measured, no two paths meet: the walk stops at 4.4's complexity limit
  (E2BIG, "BPF program is too large. Processed 32769 insn"; the kernel refuses it the same
  way at its own limit of 1M), or after CPU_LIMIT_S of CPU.
Each load runs in a forked child, so that a regression fails on a timeout instead of hanging.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import re
import time
from typing import Any

import pytest

from bpffs.vm import BpfError, asm, kernel, load_program
from bpffs.vm.context import SKB
from bpffs.vm.isa import R0, R1, R2, R6, R7, R8, R9, R10, Alu, Insn, Jmp
from bpffs.vm.uapi import Helper, ProgType
from bpffs.vm.verifier import check

SOCK = ProgType.SOCKET_FILTER
CPU_BOUND_S = 2.0  # the goal: no load takes more than ~1-2 s of CPU
WAIT_S = 20.0  # wall time granted to a child on a busy machine before calling it a hang
LEVEL_REGS = (R2, R6, R7, R8, R9)  # set by the levels (r1 is the context, r0 the input)
TOO_LARGE = f"BPF program is too large. Processed {check.COMPLEXITY_LIMIT_INSNS_UNPRIV + 1} insn"
ENDINGS = ("return 0", "read them", "measure with them")
MAX_LEVELS = 1015  # the most levels that fit in BPF_MAXINSNS (4096) with every ending


def branch_levels(levels: int, ending: str = "return 0") -> bytes:
    """The finding's shape: each level is a packet-dependent branch whose one side sets a
    register to a constant and a stack byte (4 insns). The program then ends by:
    - "return 0": nothing reads those values again (dead);
    - "read them": r0 ^= each register (read, but no check depends on the values);
    - "measure with them": each register is the size of a trace_printk buffer, so that its
      value matters and no two paths meet."""
    body: list[Insn] = [*(asm.mov64_imm(r, 1) for r in LEVEL_REGS),
                        *(asm.st(8, R10, -8 * k, 0) for k in range(1, 9))]
    for k in range(levels):
        body += [asm.ldx(4, R0, R1, SKB["len"]), asm.jmp_imm(Jmp.JGT, R0, k, 2),
                 asm.mov64_imm(LEVEL_REGS[k % len(LEVEL_REGS)], k % 64 + 1),
                 asm.st(1, R10, -65 - k % 440, 1)]
    body.append(asm.mov64_imm(R0, 0))
    if ending == "read them":
        body += [asm.alu64(Alu.XOR, R0, r, reg=True) for r in LEVEL_REGS]
    elif ending == "measure with them":
        for r in LEVEL_REGS:
            body += [asm.mov64_reg(R1, R10), asm.add64_imm(R1, -64),
                     *([asm.mov64_reg(R2, r)] if r != R2 else []),
                     asm.call(Helper.trace_printk)]
    return asm.program(*body, asm.exit())


def _verify(code: bytes, privileged: bool, conn: Any) -> None:
    start = time.thread_time()
    try:
        _, log = load_program(SOCK, code, license="GPL", resolve_map=None,
                              privileged=privileged, log_level=1)
        outcome: tuple = (0, "accepted", log.splitlines()[-1])
    except BpfError as e:
        outcome = (e.errno, e.strerror, getattr(e, "log", "").splitlines()[-2:])
    conn.send((*outcome, time.thread_time() - start))


def verify_in_child(code: bytes, privileged: bool = False) -> tuple[int, str, Any, float]:
    """(errno or 0, message, end of the log, CPU seconds) of verifying `code` (by default as
    uid 65534's is verified: unprivileged), in a forked child killed after WAIT_S."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_verify, args=(code, privileged, child))
    proc.start()
    try:
        if not parent.poll(WAIT_S):
            pytest.fail(f"verification of {len(code) // 8} insns still busy after {WAIT_S} s")
        return parent.recv()
    finally:
        proc.kill()
        proc.join()


def processed(log_line: str) -> int:
    assert log_line.startswith("processed "), log_line
    return int(log_line.split()[1])


@pytest.mark.parametrize("levels", [60, MAX_LEVELS])
@pytest.mark.parametrize("ending", ENDINGS[:2])
def test_branches_whose_values_no_check_uses_are_pruned(levels: int, ending: str) -> None:
    """The finding's program (60 levels) and a 4,096-insn one are accepted after a few
    instructions a level, as the kernel accepts them."""
    err, message, last, cpu = verify_in_child(branch_levels(levels, ending))
    assert (err, message) == (0, "accepted")
    assert processed(last) < 10 * levels
    assert cpu < CPU_BOUND_S


@pytest.mark.parametrize("levels", [60, MAX_LEVELS])
def test_branches_that_nothing_prunes_stop_at_the_complexity_limit(levels: int) -> None:
    """Where every path's constants are measured, no two paths meet: the walk stops at 4.4's
    limit with the kernel's errno and message, within the CPU bound."""
    err, message, last, cpu = verify_in_child(branch_levels(levels, "measure with them"))
    assert (err, message) == (errno.E2BIG, TOO_LARGE)
    assert last[-1] == TOO_LARGE
    assert cpu < CPU_BOUND_S


def test_root_has_the_kernels_limit_and_the_same_cpu_bound() -> None:
    """Root's limit is the kernel's 1M (it may load programs that large); the CPU bound stops
    the walk long before, with the same errno and message."""
    err, message, last, cpu = verify_in_child(branch_levels(MAX_LEVELS, "measure with them"),
                                              privileged=True)
    assert err == errno.E2BIG
    assert re.fullmatch(r"BPF program is too large\. Processed \d+ insn", message)
    assert last == [f"verification stopped after {check.CPU_LIMIT_S} s of CPU", message]
    assert cpu < CPU_BOUND_S


def test_the_cpu_bound_stops_a_walk_below_the_instruction_limit(monkeypatch) -> None:
    """With no CPU left, the walk stops at its first check: E2BIG, the kernel's message, and
    a log line that says why."""
    monkeypatch.setattr(check, "CPU_LIMIT_S", 0.0)
    err, message, last, _ = verify_in_child(branch_levels(60, "measure with them"))
    assert err == errno.E2BIG
    assert message == f"BPF program is too large. Processed {check.CPU_CHECK_EVERY} insn"
    assert last[0] == "verification stopped after 0.0 s of CPU"


needs_kernel = pytest.mark.skipif(not kernel.available(), reason="needs the kernel's bpf(2)")


@pytest.mark.kernel
@needs_kernel
@pytest.mark.parametrize("levels", [60, MAX_LEVELS])
@pytest.mark.parametrize("ending", ENDINGS[:2])
def test_the_kernel_accepts_what_we_prune(levels: int, ending: str) -> None:
    fd, _ = kernel.prog_load(SOCK, branch_levels(levels, ending))
    os.close(fd)


@pytest.mark.kernel
@needs_kernel
def test_the_kernel_refuses_what_nothing_prunes_at_its_own_limit() -> None:
    """E2BIG after walking 1M instructions (~3 s here). Its log then ends in "BPF program is
    too large. Processed 1000001 insn", but writing the log makes it ~12 s: not asked for."""
    with pytest.raises(OSError) as info:
        kernel.prog_load(SOCK, branch_levels(60, "measure with them"))
    assert info.value.errno == errno.E2BIG
