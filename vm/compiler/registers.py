"""What each instruction does to registers, as the code generator needs it: which ones it
writes, which it needs exact (masked to 64 bits) before it runs, which one a move copies, and
the dataflow that finds the registers holding the context's address on entry to each block."""

from __future__ import annotations

from ..insn import successors, width
from ..isa import CALL, LD_IMM64, MOV64_X, Alu, Atomic, Class, Insn, Mode, Source


def writes(i: Insn) -> tuple[int, ...]:
    """Registers an instruction writes (always exact: it masks what it writes)."""
    if i.cls in (Class.ALU, Class.ALU64, Class.LDX) or i.opcode == LD_IMM64:
        return (i.dst,)
    if i.cls == Class.STX and i.mode == Mode.ATOMIC:
        if i.imm == Atomic.CMPXCHG:
            return (0,)
        return (i.src,) if i.imm == Atomic.XCHG or i.imm & Atomic.FETCH else ()
    if i.cls in (Class.ST, Class.STX):
        return ()
    return (0,)  # LD_ABS, LD_IND, calls


def exact_reads(i: Insn) -> tuple[int, ...]:
    """Registers an instruction needs in range before it runs (it reads them whole)."""
    if i.cls == Class.ALU64:
        if i.op in (Alu.DIV, Alu.MOD) and not i.off:  # unsigned: needs both exact
            return (i.dst, i.src) if i.source == Source.X else (i.dst,)
        if i.op in (Alu.RSH, Alu.END):
            return (i.dst,)
        return ()  # MUL, LSH: ring operations, masked after; ARSH, SDIV, SMOD, MOVSX: sx()
    if i.opcode == CALL:
        return (1, 2, 3, 4, 5)
    return ()


def copied_register(i: Insn) -> int | None:
    """The register a 64-bit register move copies."""
    return i.src if i.opcode == MOV64_X and not i.off else None


def context_registers(insns: list[Insn], start: int, end: int, leaders: list[int]
                      ) -> dict[int, frozenset[int]]:
    """For each reachable block: the registers that hold the context's address on entry on
    every path to it (r1 at the program's first insn, then copies of it), so that loads and
    stores at such a register + constant go straight to the context buffer."""
    if start != 0:
        return {}
    stops = dict(zip(leaders, [*leaders[1:], end], strict=True))
    at: dict[int, frozenset[int]] = {start: frozenset({1})}
    work = [start]
    while work:
        first = work.pop()
        regs, last = _through_block(insns, first, stops[first], set(at[first]))
        for successor in successors(insns, last):
            if successor in stops:
                joined = at[successor] & regs if successor in at else frozenset(regs)
                if at.get(successor) != joined:
                    at[successor] = joined
                    work.append(successor)
    return at


def _through_block(insns: list[Insn], first: int, stop: int, regs: set[int]
                   ) -> tuple[set[int], int]:
    """The context registers at the end of the block [first, stop), and its last insn."""
    pc = last = first
    while pc < stop:
        i = insns[pc]
        copied = copied_register(i) in regs
        regs.difference_update(writes(i))
        if copied:
            regs.add(i.dst)
        last, pc = pc, pc + width(i)
    return regs, last
