"""The reference tier: one instruction at a time, written for reading, not speed.

Semantics of ALU and JMP operations come from vm.ops (shared with the compiler); loads, stores
and calls go through the run's Memory and helper table. The compiled tier must give the same
results on every program (tests run both).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import ops
from .errors import VmFault
from .insn import call_target, is_local_call, jump_target
from .isa import (
    ATOMIC_SIZES,
    CALL,
    CLASS_MASK,
    EXIT,
    JA,
    JA32,
    LD_IMM64,
    U32,
    U64,
    Alu,
    Atomic,
    Class,
    Insn,
    Mode,
    Source,
    atomic_alu_op,
)
from .memory import Memory
from .runtime import MAX_CALL_FRAMES, PacketExit, TailCall, call_helper, run_tail_calls, stack_top

if TYPE_CHECKING:
    from .program import Program
    from .run import Run


def interpret(prog: Program, run: Run, r1: int, r2: int = 0, depth: int = 0) -> int:
    """Run `prog` from insn 0 with r1 = ctx; returns r0 (raises TailCall, PacketExit, VmFault)."""
    return _frame(prog, run, 0, [0, r1, r2, 0, 0, 0], depth)


def _frame(prog: Program, run: Run, pc: int, args: list[int], depth: int) -> int:
    insns: list[Insn] = prog.decoded
    costs = prog.block_costs
    mem = run.mem
    r = args + [0] * 5
    r[10] = 0 if pc in prog.stackless_functions else stack_top(mem, depth)
    while True:
        if pc >= len(insns) or pc < 0:
            raise VmFault("fell off the end of the program", pc)
        cost = costs.get(pc)
        if cost is not None:
            run.budget -= cost
            if run.budget < 0:
                raise VmFault("instruction budget exhausted", pc)
        i = insns[pc]
        op = i.opcode
        cls = op & CLASS_MASK
        if cls in (Class.ALU, Class.ALU64):
            _alu(i, r, pc)
        elif cls == Class.LDX and i.mode in (Mode.MEM, Mode.MEMSX):
            value = mem.load((r[i.src] + i.off) & U64, i.size)
            if i.mode == Mode.MEMSX:
                value = ops.sx(value, i.size * 8) & U64
            r[i.dst] = value
        elif cls == Class.ST and i.mode == Mode.MEM:
            mem.store((r[i.dst] + i.off) & U64, i.size, i.imm)
        elif cls == Class.STX and i.mode == Mode.MEM:
            mem.store((r[i.dst] + i.off) & U64, i.size, r[i.src])
        elif cls == Class.STX and i.mode == Mode.ATOMIC and i.size in ATOMIC_SIZES:
            _atomic(i, r, mem, pc)
        elif op == LD_IMM64:
            r[i.dst] = i.imm64
            pc += 1
        elif cls == Class.LD and i.mode in (Mode.ABS, Mode.IND):
            off = i.imm if i.mode == Mode.ABS else ops.sx((r[i.src] + i.imm) & U32, 32)
            value = run.load_packet(off, i.size)
            if value is None:
                raise PacketExit
            r[0] = value
        elif cls in (Class.JMP, Class.JMP32):
            jop = i.op
            if op == EXIT:
                return r[0]
            if op == CALL:
                if is_local_call(i):
                    if depth + 1 >= MAX_CALL_FRAMES:
                        raise VmFault(f"call depth above {MAX_CALL_FRAMES} frames", pc)
                    try:
                        r[0] = _frame(prog, run, call_target(i, pc), [0, *r[1:6]], depth + 1)
                    except TailCall:
                        r[0] = run_tail_calls(run, "interpreter", depth + 1, prog)
                else:
                    r[0] = call_helper(run, i.imm, r[1], r[2], r[3], r[4], r[5], pc)
            elif op in (JA, JA32):
                pc = jump_target(i, pc) - 1
            else:
                fn = (ops.JMP64_FN if cls == Class.JMP else ops.JMP32_FN).get(jop)
                if fn is None:
                    raise VmFault(f"unknown opcode {op:#04x}", pc)
                mask = U64 if cls == Class.JMP else U32
                s = r[i.src] if i.source == Source.X else i.imm
                if fn(r[i.dst] & mask, s & mask):
                    pc = jump_target(i, pc) - 1
        else:
            raise VmFault(f"unknown opcode {op:#04x}", pc)
        pc += 1


def _alu(i: Insn, r: list[int], pc: int) -> None:
    alu64 = i.cls == Class.ALU64
    mask = U64 if alu64 else U32
    if i.op == Alu.END:
        to_be = i.source == Source.X
        if i.imm not in (16, 32, 64):
            raise VmFault(f"invalid byte swap width {i.imm}", pc)
        r[i.dst] = ops.END_FN[alu64, to_be, i.imm](r[i.dst], 0) & U64
        return
    variant = i.off if i.op in (Alu.DIV, Alu.MOD, Alu.MOV) else 0
    fn = (ops.ALU64_FN if alu64 else ops.ALU32_FN).get((i.op, variant))
    if fn is None:
        raise VmFault(f"unknown ALU operation {i.opcode:#04x} off={i.off}", pc)
    s = r[i.src] if i.source == Source.X else i.imm
    r[i.dst] = fn(r[i.dst] & mask, s & mask) & mask


def _atomic(i: Insn, r: list[int], mem: Memory, pc: int) -> None:
    size = i.size
    mask = U64 if size == 8 else U32
    addr = (r[i.dst] + i.off) & U64
    old = mem.load(addr, size)
    src = r[i.src] & mask
    op = i.imm
    if op == Atomic.CMPXCHG:
        if (r[0] & mask) == old:
            mem.store(addr, size, src)
        r[0] = old
        return
    if op == Atomic.XCHG:
        mem.store(addr, size, src)
        r[i.src] = old
        return
    alu_op = atomic_alu_op(op)
    if alu_op is None:
        raise VmFault(f"unknown atomic operation {op:#x}", pc)
    fn = ops.ALU64_FN[alu_op, 0]
    mem.store(addr, size, fn(old, src) & mask)
    if op & Atomic.FETCH:
        r[i.src] = old
