"""The reference tier: one instruction at a time, written for reading, not speed.

Semantics of ALU and JMP operations come from vm.ops (shared with the compiler); loads, stores
and calls go through the run's Memory and helper table. The compiled tier must give the same
results on every program (tests run both).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import ops
from .errors import VmFault
from .insn import call_target, is_jump, jump_target, subprograms, width
from .isa import (
    CALL,
    EXIT,
    FRAME_POINTER,
    JA,
    JA32,
    LD_IMM64,
    PSEUDO_CALL,
    U32,
    U64,
    Alu,
    Atomic,
    Class,
    Insn,
    Jmp,
    Mode,
    Source,
)
from .memory import STACK_FRAME_REGIONS, STACK_REGION, Memory, region_base
from .uapi import MAX_BPF_STACK, Helper

if TYPE_CHECKING:
    from .program import Program
    from .run import Run

MAX_CALL_FRAMES = 8


class PacketExit(Exception):
    """LD_ABS/LD_IND beyond the packet: the program ends with r0 = 0 (the kernel's rule)."""


class TailCall(Exception):
    """bpf_tail_call succeeded: the current program is replaced by run.tail_target."""


def block_leaders(insns: list[Insn], start: int, end: int) -> list[int]:
    """First insns of the basic blocks of the function [start, end): its start, jump
    targets inside it, and the insns after jumps and exits. Calls do not end a block."""
    leaders = {start}
    pc = start
    while pc < end:
        i = insns[pc]
        if i.cls in (Class.JMP, Class.JMP32) and i.op != Jmp.CALL:
            if is_jump(i):
                leaders.add(jump_target(i, pc))
            leaders.add(pc + 1)
        pc += width(i)
    return sorted(t for t in leaders if start <= t < end)


def block_cost(insns: list[Insn], start: int, stop: int) -> int:
    """Budget charged on entering the block [start, stop): its insns, LD_IMM64 counting
    once. Both tiers charge a whole block at its start, so they run out at the same place."""
    return sum(1 for pc in range(start, stop) if pc == start or insns[pc - 1].opcode != LD_IMM64)


def block_costs(insns: list[Insn]) -> dict[int, int]:
    """block_cost of every block of every function, by its first insn."""
    costs = {}
    for start, end in subprograms(insns):
        leaders = block_leaders(insns, start, end)
        for first, stop in zip(leaders, [*leaders[1:], end], strict=True):
            costs[first] = block_cost(insns, first, stop)
    return costs


def uses_frame_pointer(insns: list[Insn], start: int, end: int) -> bool:
    """Whether a function mentions r10 at all. One that does not runs without a stack:
    mapping and zeroing 512 bytes is a large part of a short program's run."""
    return any(FRAME_POINTER in (i.dst, i.src) for i in insns[start:end])


def stack_top(mem: Memory, depth: int) -> int:
    """Map a fresh, zeroed 512-byte stack for call depth `depth`; return the frame pointer."""
    region = STACK_REGION if depth == 0 else STACK_FRAME_REGIONS + depth
    mem.map_zeroed(region, MAX_BPF_STACK, f"stack of frame {depth}")
    return region_base(region) + MAX_BPF_STACK


def interpret(prog: Program, run: Run, r1: int, r2: int = 0, depth: int = 0) -> int:
    """Run `prog` from insn 0 with r1 = ctx; returns r0 (raises TailCall, PacketExit, VmFault)."""
    return _frame(prog, run, 0, [0, r1, r2, 0, 0, 0], depth)


def run_tail_calls(run: Run, tier: str, depth: int, caller: Program) -> int:
    """A bpf_tail_call made in a bpf-to-bpf callee: as in the kernel (x86-64 JIT), the
    target replaces the callee's frame, and its r0 goes back to the callee's caller, which
    then goes on with its own program (and maps)."""
    try:
        while True:
            target, run.tail_target = run.tail_target, None
            try:
                return target.entry(tier)(run, run.ctx_addr, depth=depth)
            except TailCall:
                continue
    finally:
        run.prog = caller


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
        cls = op & 0x07
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
        elif cls == Class.STX and i.mode == Mode.ATOMIC and i.size in (4, 8):
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
                if i.src == PSEUDO_CALL:
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


def call_helper(run: Run, helper_id: int, r1: int, r2: int, r3: int, r4: int, r5: int,
                pc: int | None = None) -> int:
    """Call a helper by id; raise TailCall when a tail call succeeded."""
    spec = run.helpers.get(helper_id)
    if spec is None:
        raise VmFault(f"call to unknown helper {helper_id}", pc)
    result = spec.fn(run, r1, r2, r3, r4, r5) & U64
    if helper_id == Helper.tail_call and run.tail_target is not None:
        raise TailCall
    return result


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
    base = op & ~Atomic.FETCH
    fn = ops.ALU64_FN.get((base, 0)) if base in (Atomic.ADD, Atomic.OR, Atomic.AND,
                                                  Atomic.XOR) else None
    if fn is None or op & ~(0xF0 | Atomic.FETCH):
        raise VmFault(f"unknown atomic operation {op:#x}", pc)
    mem.store(addr, size, fn(old, src) & mask)
    if op & Atomic.FETCH:
        r[i.src] = old
