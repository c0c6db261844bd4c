"""State pruning never changes a verdict: it only skips paths whose outcome a state already
explored decides. Random programs that branch, set and measure constants, build stack
pointers and call helpers are verified twice, with the liveness and precision masks and with
every register, slot and value counted as live (4.4's exact comparison). The verdicts must be
the same; the pruned walk must not be longer."""

from __future__ import annotations

import random

import pytest
from verifier_cases import SOCK, pruned_and_exact

from bpffs.vm import BpfError, asm, load_program
from bpffs.vm.context import SKB
from bpffs.vm.isa import R0, R1, R2, R6, R10, Alu, Insn, Jmp
from bpffs.vm.uapi import Helper

SCRATCH = (2, 3, 4, 5, 7, 8, 9)
VALUES = (-64, -8, 1, 8, 64, 100)  # sizes and stack offsets, each valid for some uses only


def a_set(rng: random.Random) -> list[Insn]:
    """What one side of a branch does: the value, type or slot it sets decides whether the
    uses after the join are safe."""
    r, s = rng.choice(SCRATCH), rng.choice(SCRATCH)
    return rng.choice([
        lambda: [asm.mov64_imm(r, rng.choice(VALUES))],
        lambda: [asm.mov64_reg(r, s)],
        lambda: [asm.alu32(Alu.MOV, r, s, reg=True)],
        lambda: [asm.mov64_reg(r, R10)],  # a pointer now
        lambda: [asm.alu64(Alu.XOR, r, s, reg=True)],  # an unknown scalar now
        lambda: [asm.st(8, R10, -72, 1)],  # -72 starts uninitialised
        lambda: [asm.stx(8, R10, r, -80)],  # spills a pointer, or writes a scalar
    ])()


def a_use(rng: random.Random) -> list[Insn]:
    """What may come after the join, safe for some of the values set before it."""
    r = rng.choice(SCRATCH)
    return rng.choice([
        lambda: [asm.mov64_reg(R1, R10), asm.add64_imm(R1, -64), asm.mov64_reg(R2, r),
                 asm.call(Helper.trace_printk),  # r is a size
                 *(asm.mov64_imm(n, 8) for n in (2, 3, 4, 5))],
        lambda: [asm.mov64_reg(R1, R10), asm.alu64(Alu.ADD, R1, r, reg=True),
                 asm.st(1, R1, 0, 1)],  # r is a stack offset
        lambda: [asm.ldx(8, r, R10, -72)],
        lambda: [asm.ldx(8, R1, R10, -80), asm.st(1, R1, -1, 1)],  # a spilled pointer
        lambda: [asm.st(1, r, -1, 1)],  # r is a stack pointer
    ])()


def random_program(rng: random.Random) -> bytes:
    """Branches whose one side sets something, then uses of what was set, mixed."""
    body: list[Insn] = [asm.mov64_reg(R6, R1),
                        *(asm.mov64_reg(r, R10) if rng.random() < 0.4 else
                          asm.mov64_imm(r, rng.choice(VALUES)) for r in SCRATCH),
                        *(asm.st(8, R10, -8 * k, 0) for k in range(1, 9)),
                        *([asm.st(8, R10, -72, 0)] if rng.random() < 0.6 else []),
                        *([asm.stx(8, R10, R10, -80)] if rng.random() < 0.6 else [])]
    for _ in range(rng.randint(2, 7)):
        if rng.random() < 0.85:
            side = a_set(rng)
            body += [asm.ldx(4, R0, R6, SKB["len"]),
                     asm.jmp_imm(Jmp.JGT, R0, rng.randint(0, 9), len(side)), *side]
        else:
            body += a_use(rng)
    body += a_use(rng)
    # r0: 0, or a register that may be a pointer (a leak, for unprivileged programs)
    r0 = rng.choice([asm.mov64_imm(R0, 0), asm.mov64_reg(R0, rng.choice(SCRATCH))])
    return asm.program(*body, r0, asm.exit())


def verdict(code: bytes, privileged: bool) -> tuple[bool, int]:
    """(accepted, instructions processed)."""
    try:
        _, log = load_program(SOCK, code, license="GPL", resolve_map=None,
                              privileged=privileged, log_level=1)
    except BpfError:
        return False, 0
    return True, int(log.splitlines()[-1].split()[1])


@pytest.mark.parametrize("privileged", [True, False], ids=["root", "unprivileged"])
def test_pruning_never_changes_a_verdict(privileged: bool, monkeypatch) -> None:
    rng = random.Random(13)
    programs = [random_program(rng) for _ in range(1000)]
    accepted, shorter = pruned_and_exact(programs, lambda code: verdict(code, privileged),
                                         monkeypatch)
    # (dropping any one part of the masks changes 4-40 verdicts of these 1000)
    assert accepted > 80 and shorter > 50, "too few programs pruned to mean anything"
