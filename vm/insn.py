"""Instruction facts, decoded once: where control goes after each instruction, the target of
each jump and bpf-to-bpf call, and the functions of a program.

The kernel keeps these in one place (bpf_insn_successors() and bpf_jmp_offset() in
kernel/bpf/cfg.c and verifier.c) so that every pass agrees on them; so do we. The interpreter,
the compiler and the verifier read them from here and nowhere else decodes a jump offset: the
one irregular case, JA32 (gotol) with its 32-bit offset in imm instead of off, is handled once.
"""

from __future__ import annotations

from dataclasses import dataclass

from .isa import CALL, JA32, LD_IMM64, Class, Insn, Jmp
from .uapi import BPF_PSEUDO_CALL


def width(i: Insn) -> int:
    """Slots taken by an instruction: LD_IMM64 has a second half."""
    return 2 if i.opcode == LD_IMM64 else 1


def is_second_half(insns: list[Insn], pc: int) -> bool:
    """Whether slot pc follows an LD_IMM64 (the kernel's test: no jump may land there)."""
    return pc > 0 and insns[pc - 1].opcode == LD_IMM64


def ends_block(i: Insn) -> bool:
    """A jump or an exit: control does not simply go on to the next insn (calls return)."""
    return i.cls in (Class.JMP, Class.JMP32) and i.op != Jmp.CALL


def is_jump(i: Insn) -> bool:
    """A goto or conditional jump (a JMP/JMP32 that is neither a call nor an exit)."""
    return i.cls in (Class.JMP, Class.JMP32) and i.op not in (Jmp.CALL, Jmp.EXIT)


def jump_target(i: Insn, pc: int) -> int:
    """Where the jump at pc goes when taken (bpf_jmp_offset: gotol's offset is in imm)."""
    return pc + 1 + (i.imm if i.opcode == JA32 else i.off)


def is_local_call(i: Insn) -> bool:
    """A bpf-to-bpf call (BPF_PSEUDO_CALL): imm is the callee's offset, not a helper id."""
    return i.opcode == CALL and i.src == BPF_PSEUDO_CALL


def is_helper_call(i: Insn) -> bool:
    """A call of a helper by its id in imm (the kernel's bpf_helper_call: src_reg 0)."""
    return i.opcode == CALL and i.src == 0


def call_target(i: Insn, pc: int) -> int:
    """First insn of the function a bpf-to-bpf call at pc enters."""
    return pc + 1 + i.imm


def successors(insns: list[Insn], pc: int) -> tuple[int, ...]:
    """bpf_insn_successors(): the insns control may reach right after insns[pc], fall-through
    first. A call returns to the next insn (its callee is a function of its own); an exit has
    none. Targets are not range-checked here: the verifier does that, the VMs fault."""
    i = insns[pc]
    if not ends_block(i):
        return (pc + width(i),)
    if i.op == Jmp.EXIT:
        return ()
    if i.op == Jmp.JA:
        return (jump_target(i, pc),)
    return (pc + 1, jump_target(i, pc))


def subprograms(insns: list[Insn]) -> list[tuple[int, int]]:
    """(start, end) of the entry function and of each bpf-to-bpf callee, in program order: a
    function runs from its entry to the next one (the kernel's subprog_info)."""
    entries = sorted({0} | {call_target(i, pc) for pc, i in enumerate(insns)
                            if is_local_call(i) and 0 <= call_target(i, pc) < len(insns)})
    return list(zip(entries, [*entries[1:], len(insns)], strict=True))


@dataclass(frozen=True)
class Flow:
    """The control flow of one program, computed once and shared by every pass over it."""

    succ: tuple[tuple[int, ...], ...]  # successors of each slot; () for LD_IMM64's 2nd half
    jump_targets: frozenset[int]  # where jumps land: the points where paths meet
    functions: tuple[tuple[int, int], ...]  # subprograms()


def flow(insns: list[Insn]) -> Flow:
    """Successors of every instruction, the jump targets and the functions of a program."""
    succ: list[tuple[int, ...]] = []
    targets: set[int] = set()
    second_half = False
    for pc, i in enumerate(insns):
        if second_half:
            succ.append(())
            second_half = False
            continue
        succ.append(successors(insns, pc))
        if is_jump(i):
            targets.add(jump_target(i, pc))
        second_half = i.opcode == LD_IMM64
    return Flow(tuple(succ), frozenset(targets), tuple(subprograms(insns)))
