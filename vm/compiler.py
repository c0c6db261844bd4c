"""The compiled tier: each program becomes Python source once, then runs without dispatch.

Registers are local variables; each basic block is straight-line code guarded by one
`if L == <block>:` test. Blocks are emitted in program order inside `while True:`, so a forward
jump just sets L and falls through the tests of the blocks it skips; a backward jump (only in
programs verified with loops allowed) sets L and restarts the loop. Every subprogram of a
bpf-to-bpf call is its own function. Semantics come from vm.ops, as in the interpreter.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import ops
from .errors import VmFault
from .interpreter import MAX_CALL_FRAMES, PacketExit, call_helper, stack_top
from .isa import (
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

if TYPE_CHECKING:
    from .program import Program

Entry = Callable[..., int]


def compile_program(prog: Program) -> Entry:
    """Translate `prog` to one Python function per subprogram; returns the entry's."""
    insns = prog.decoded
    entries = sorted({0} | {pc + 1 + i.imm for pc, i in enumerate(insns)
                            if i.opcode == Class.JMP | Jmp.CALL and i.src == PSEUDO_CALL})
    bounds = [*entries[1:], len(insns)]
    source = []
    for start, end in zip(entries, bounds, strict=False):
        source += _function(insns, start, end)
    namespace = dict(ops.NAMESPACE, VmFault=VmFault, PacketExit=PacketExit,
                     call_helper=call_helper, stack_top=stack_top, MAX_FRAMES=MAX_CALL_FRAMES)
    text = "\n".join(source)
    exec(compile(text, f"<bpf prog {prog.name or prog.tag}>", "exec"), namespace)
    entry = namespace["f0"]
    entry.source = text  # for debugging: print(prog.compiled.source)
    return entry


def _leaders(insns: list[Insn], start: int, end: int) -> list[int]:
    leaders = {start}
    pc = start
    while pc < end:
        i = insns[pc]
        if i.cls in (Class.JMP, Class.JMP32) and i.op not in (Jmp.CALL,):
            if i.op != Jmp.EXIT:
                leaders.add(pc + 1 + (i.imm if i.opcode == JA32 else i.off))
            leaders.add(pc + 1)
        pc += 2 if i.opcode == LD_IMM64 else 1
    for target in leaders:
        if not start <= target <= end:
            raise VmFault(f"jump out of range to insn {target}")
        if target < end and target > start and insns[target - 1].opcode == LD_IMM64:
            raise VmFault(f"jump into the middle of ld_imm64 at insn {target - 1}")
    return sorted(t for t in leaders if t < end)


def _function(insns: list[Insn], start: int, end: int) -> list[str]:
    out = [f"def f{start}(run, r1, r2=0, r3=0, r4=0, r5=0, depth=0):",
           "    mem = run.mem; load = mem.load; store = mem.store",
           "    r0 = r6 = r7 = r8 = r9 = 0",
           "    r10 = stack_top(mem, depth)",
           "    budget = run.budget",
           f"    L = {start}",
           "    while True:"]
    leaders = _leaders(insns, start, end)
    for n, block_start in enumerate(leaders):
        block_end = leaders[n + 1] if n + 1 < len(leaders) else end
        out.append(f"        if L == {block_start}:")
        out += ["            " + line for line in _block(insns, block_start, block_end, end)]
    return out


def _block(insns: list[Insn], start: int, stop: int, end: int) -> list[str]:
    count = sum(1 for pc in range(start, stop) if pc == start or
                insns[pc - 1].opcode != LD_IMM64)
    lines = [f"budget -= {count}",
             f"if budget < 0: run.budget = budget; raise VmFault('instruction budget exhausted',"
             f" {start})"]
    dirty: set[int] = set()  # registers whose value may lie outside [0, 2**64)

    def clean(regs: set[int] | list[int] | tuple[int, ...]) -> None:
        for reg in sorted(dirty.intersection(regs)):
            lines.append(f"r{reg} &= {U64:#x}")
            dirty.discard(reg)

    pc = start
    while pc < stop:
        i = insns[pc]
        if i.cls in (Class.JMP, Class.JMP32) and i.op != Jmp.CALL:
            clean(set(dirty))
            lines += _jump(i, pc, start)
            return lines
        lazy = _lazy(i)
        if lazy is not None:
            lines.append(lazy)
            copies_clean = i.op == Alu.MOV and (i.source == Source.K or i.src not in dirty)
            (dirty.discard if copies_clean else dirty.add)(i.dst)
        else:
            clean(_clean_reads(i))
            lines += _straight(i, pc)
            dirty.difference_update(_writes(i))
        pc += 2 if i.opcode == LD_IMM64 else 1
    clean(set(dirty))
    if stop >= end:
        lines.append(f"raise VmFault('fell off the end of the program', {stop - 1})")
    else:
        lines.append(f"L = {stop}")
    return lines


# ALU64 operations that commute with reduction modulo 2**64 (Python ints are unbounded two's
# complement): their results may stay unmasked until a reader needs the exact value. Masking
# is the largest cost of straight-line code, so blocks mask lazily.
LAZY_OPS = {Alu.ADD: "+", Alu.SUB: "-", Alu.XOR: "^", Alu.OR: "|", Alu.AND: "&"}


def _lazy(i: Insn) -> str | None:
    """The unmasked source line of an ALU64 op that commutes with reduction mod 2**64."""
    if i.cls != Class.ALU64 or i.off:
        return None
    src = f"r{i.src}" if i.source == Source.X else None
    if i.op == Alu.MOV:
        return f"r{i.dst} = {src or i.imm & U64}"
    op = LAZY_OPS.get(i.op)
    return None if op is None else f"r{i.dst} {op}= {src or i.imm & U64}"


def _clean_reads(i: Insn) -> tuple[int, ...]:
    """Registers an instruction needs in range before it runs (it reads them whole)."""
    if i.cls == Class.ALU64:
        if i.op in (Alu.DIV, Alu.MOD) and not i.off:  # unsigned: needs both exact
            return (i.dst, i.src) if i.source == Source.X else (i.dst,)
        if i.op in (Alu.RSH, Alu.END):
            return (i.dst,)
        return ()  # MUL, LSH: ring operations, masked after; ARSH, SDIV, SMOD, MOVSX: sx()
    if i.opcode == Class.JMP | Jmp.CALL:
        return (1, 2, 3, 4, 5)
    return ()


def _writes(i: Insn) -> tuple[int, ...]:
    """Registers an instruction leaves in range (it masks what it writes)."""
    if i.cls in (Class.ALU, Class.ALU64, Class.LDX) or i.opcode == LD_IMM64:
        return (i.dst,)
    if i.cls == Class.STX and i.mode == Mode.ATOMIC:
        return (0, i.src)
    return (0,)


def _operand(i: Insn, mask: int) -> str:
    if i.source == Source.X:
        return f"r{i.src}" if mask == U64 else f"(r{i.src} & {U32:#x})"
    return str(i.imm & mask)


def _straight(i: Insn, pc: int) -> list[str]:
    cls = i.cls
    if cls in (Class.ALU, Class.ALU64):
        return [_alu(i, pc)]
    addr = f"(r{i.dst} + {i.off}) & {U64:#x}"
    if cls == Class.LDX and i.mode in (Mode.MEM, Mode.MEMSX):
        src_addr = f"(r{i.src} + {i.off}) & {U64:#x}"
        value = f"load({src_addr}, {i.size})"
        if i.mode == Mode.MEMSX:
            value = f"sx({value}, {i.size * 8}) & {U64:#x}"
        return [f"r{i.dst} = {value}"]
    if cls == Class.ST and i.mode == Mode.MEM:
        return [f"store({addr}, {i.size}, {i.imm})"]
    if cls == Class.STX and i.mode == Mode.MEM:
        return [f"store({addr}, {i.size}, r{i.src})"]
    if cls == Class.STX and i.mode == Mode.ATOMIC and i.size in (4, 8):
        return _atomic(i, pc, addr)
    if i.opcode == LD_IMM64:
        return [f"r{i.dst} = {i.imm64}"]
    if cls == Class.LD and i.mode in (Mode.ABS, Mode.IND):
        off = str(i.imm) if i.mode == Mode.ABS else f"sx((r{i.src} + {i.imm}) & {U32:#x}, 32)"
        return [f"r0 = run.load_packet({off}, {i.size})",
                "if r0 is None: raise PacketExit"]
    if i.opcode == Class.JMP | Jmp.CALL:
        if i.src == PSEUDO_CALL:
            target = pc + 1 + i.imm
            return ["run.budget = budget",
                    f"if depth + 1 >= MAX_FRAMES: raise VmFault('call depth above'"
                    f" ' {MAX_CALL_FRAMES} frames', {pc})",
                    f"r0 = f{target}(run, r1, r2, r3, r4, r5, depth + 1)",
                    "budget = run.budget"]
        return ["run.budget = budget",
                f"r0 = call_helper(run, {i.imm}, r1, r2, r3, r4, r5, {pc})"]
    return [f"raise VmFault('unknown opcode {i.opcode:#04x}', {pc})"]


def _alu(i: Insn, pc: int) -> str:
    alu64 = i.cls == Class.ALU64
    mask = U64 if alu64 else U32
    d = f"r{i.dst}" if alu64 else f"(r{i.dst} & {U32:#x})"
    if i.op == Alu.END:
        if i.imm not in (16, 32, 64):
            return f"raise VmFault('invalid byte swap width {i.imm}', {pc})"
        expr = ops.end_expr(alu64, i.source == Source.X, i.imm)  # on the whole register
        return f"r{i.dst} = ({_subst(expr, f'r{i.dst}', '0')}) & {U64:#x}"
    if i.source == Source.K and i.op in (Alu.LSH, Alu.RSH) and alu64:
        count = i.imm & 63  # constant shifts: fold the count; a right shift needs no mask
        if i.op == Alu.RSH:
            return f"r{i.dst} = r{i.dst} >> {count}"
        return f"r{i.dst} = (r{i.dst} << {count}) & {U64:#x}"
    variant = i.off if i.op in (Alu.DIV, Alu.MOD, Alu.MOV) else 0
    expr = (ops.ALU64 if alu64 else ops.ALU32).get((i.op, variant))
    if expr is None:
        return f"raise VmFault('unknown ALU operation {i.opcode:#04x} off={i.off}', {pc})"
    return f"r{i.dst} = ({_subst(expr, d, _operand(i, mask))}) & {mask:#x}"


def _subst(expr: str, d: str, s: str) -> str:
    """Put operand source into an ops template (its variables are the single letters d, s)."""
    return re.sub(r"\b[ds]\b", lambda m: f"({d})" if m.group() == "d" else f"({s})", expr)


def _atomic(i: Insn, pc: int, addr: str) -> list[str]:
    mask = U64 if i.size == 8 else U32
    src = f"(r{i.src} & {mask:#x})"
    lines = [f"a = {addr}", f"old = load(a, {i.size})"]
    op = i.imm
    if op == Atomic.CMPXCHG:
        return [*lines, f"if (r0 & {mask:#x}) == old: store(a, {i.size}, {src})", "r0 = old"]
    if op == Atomic.XCHG:
        return [*lines, f"store(a, {i.size}, {src})", f"r{i.src} = old"]
    base = op & ~Atomic.FETCH
    if base not in (Atomic.ADD, Atomic.OR, Atomic.AND, Atomic.XOR) or op & ~(0xF0 | Atomic.FETCH):
        return [f"raise VmFault('unknown atomic operation {op:#x}', {pc})"]
    lines.append(f"store(a, {i.size}, ({_subst(ops.ALU64[base, 0], 'old', src)}) & {mask:#x})")
    if op & Atomic.FETCH:
        lines.append(f"r{i.src} = old")
    return lines


def _jump(i: Insn, pc: int, block_start: int) -> list[str]:
    if i.op == Jmp.EXIT:
        if i.cls != Class.JMP:
            return [f"raise VmFault('unknown opcode {i.opcode:#04x}', {pc})"]
        return ["run.budget = budget", "return r0"]
    target = pc + 1 + (i.imm if i.opcode == JA32 else i.off)
    again = "; continue" if target <= block_start else ""
    if i.op == Jmp.JA:
        return [f"L = {target}{again}"]
    mask = U64 if i.cls == Class.JMP else U32
    template = ops.JMP.get(i.op)
    if template is None:
        return [f"raise VmFault('unknown opcode {i.opcode:#04x}', {pc})"]
    d = f"r{i.dst}" if mask == U64 else f"(r{i.dst} & {U32:#x})"
    cond = _subst(template.format(bits=64 if mask == U64 else 32), d, _operand(i, mask))
    return [f"if {cond}:", f"    L = {target}{again}", "else:", f"    L = {pc + 1}"]
