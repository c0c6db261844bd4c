"""The compiled tier: each program becomes Python source once, then runs without dispatch.

Registers are local variables; each basic block is straight-line code guarded by one
`if L == <block>:` test. Blocks are emitted in program order inside `while True:`, so a forward
jump just sets L and falls through the tests of the blocks it skips; a backward jump (only in
programs verified with loops allowed) sets L and restarts the loop. Every subprogram of a
bpf-to-bpf call is its own function. Semantics come from vm.ops, as in the interpreter.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from . import ops
from .errors import VmFault
from .insn import call_target, is_jump, is_local_call, jump_target, subprograms, successors, width
from .interpreter import (
    MAX_CALL_FRAMES,
    PacketExit,
    TailCall,
    block_cost,
    block_leaders,
    call_helper,
    run_tail_calls,
    stack_top,
)
from .isa import (
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
from .memory import CTX_REGION, PACK, SIZE_MASK, UNPACK, region_base
from .uapi import MAX_BPF_STACK

if TYPE_CHECKING:
    from .program import Program

Entry = Callable[..., int]
_MEMORY_CALL = re.compile(r"(?<![\w.])(load|store)\(")  # a call of the bound mem.load/store
CTX_BASE = region_base(CTX_REGION)
# LD_ABS reads network byte order (sizes 1, 2, 4: BPF_B, BPF_H, BPF_W).
BE_UNPACK = {size: struct.Struct(fmt).unpack_from for size, fmt in ((1, ">B"), (2, ">H"),
                                                                     (4, ">I"))}


def compile_program(prog: Program) -> Entry:
    """Translate `prog` to one Python function per subprogram; returns the entry's."""
    insns = prog.decoded
    source = []
    for start, end in subprograms(insns):
        source += _function(insns, start, end, start not in prog.stackless_functions)
    for target in {call_target(i, pc) for pc, i in enumerate(insns)
                   if is_local_call(i)} - set(range(len(insns))):
        source += [f"def f{target}(*args):",  # a call outside the program: (unverified code)
                   f"    raise VmFault('fell off the end of the program', {target})"]
    namespace = dict(ops.NAMESPACE, VmFault=VmFault, PacketExit=PacketExit, TailCall=TailCall,
                     call_helper=call_helper, stack_top=stack_top, MAX_FRAMES=MAX_CALL_FRAMES,
                     run_tail_calls=run_tail_calls, prog=prog,
                     **{f"unpack{size}": fn for size, fn in UNPACK.items()},
                     **{f"pack{size}": fn for size, fn in PACK.items()},
                     **{f"unpack_be{size}": fn for size, fn in BE_UNPACK.items()})
    text = "\n".join(source)
    exec(compile(text, f"<bpf prog {prog.name or prog.tag}>", "exec"), namespace)
    entry = namespace["f0"]
    entry.source = text  # for debugging: print(prog.compiled.source)
    return entry


def _function(insns: list[Insn], start: int, end: int, uses_stack: bool) -> list[str]:
    # r10 is read-only in verified programs; where no instruction writes it, every access at
    # r10 + constant is a fixed offset into this frame's stack, checked here at compile time.
    fixed_stack = uses_stack and not any(FRAME_POINTER in _writes(i)
                                         for i in insns[start:end])
    leaders = block_leaders(insns, start, end)
    ctx_at = _context_registers(insns, start, end, leaders)
    # The first block runs once, before the loop, unless a jump leads back to it.
    entered_again = any(jump_target(i, pc) == start for pc, i in enumerate(insns[start:end], start)
                        if is_jump(i))
    head: list[str] = []
    body: list[str] = []
    uses_ctx = [False]
    for n, block_start in enumerate(leaders):
        block_end = leaders[n + 1] if n + 1 < len(leaders) else end
        lines = _block(insns, block_start, block_end, start, end, fixed_stack,
                       ctx_at.get(block_start, frozenset()), uses_ctx)
        if block_start == start and not entered_again:
            head = ["    " + line for line in lines]
        else:
            body += [f"        if L == {block_start}:", *("            " + line for line in lines)]
    # load/store of Memory bound once, where the code calls them outside the fallbacks of
    # direct accesses (which go through mem.load / mem.store).
    bound = any(_MEMORY_CALL.search(line) for line in head + body)
    # The context is where r1 points on entry to the program (a conformance-suite run may
    # pass no context): direct accesses fall back to Memory unless it is mapped there.
    return [f"def f{start}(run, r1, r2=0, r3=0, r4=0, r5=0, depth=0):",
            "    mem = run.mem; load = mem.load; store = mem.store" if bound else
            "    mem = run.mem",
            *([f"    ctx, ctx_size = run.ctx_view if r1 == {CTX_BASE:#x} else (None, -1)"]
              if uses_ctx[0] else []),
            "    r0 = r6 = r7 = r8 = r9 = 0",
            *(["    r10 = stack_top(mem, depth)"] if uses_stack else []),  # else never named
            *([f"    stack = mem.view(r10 - {MAX_BPF_STACK}, {MAX_BPF_STACK}, True)"]
              if fixed_stack else []),
            "    budget = run.budget",
            *(head or [f"    L = {start}"]),
            *(["    while True:", *body] if body else [])]


def _context_registers(insns: list[Insn], start: int, end: int, leaders: list[int]
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
        regs, pc, last = set(at[first]), first, first
        while pc < stops[first]:
            i = insns[pc]
            copied = _copies(i) in regs
            regs.difference_update(_writes(i))
            if copied:
                regs.add(i.dst)
            last, pc = pc, pc + width(i)
        for successor in successors(insns, last):
            if successor in stops:
                joined = at[successor] & regs if successor in at else frozenset(regs)
                if at.get(successor) != joined:
                    at[successor] = joined
                    work.append(successor)
    return at


def _copies(i: Insn) -> int | None:
    """The register a 64-bit register move copies."""
    return i.src if i.opcode == Class.ALU64 | Alu.MOV | Source.X and not i.off else None


def _block(insns: list[Insn], start: int, stop: int, first: int, end: int,
           fixed_stack: bool, ctx_regs: frozenset[int], uses_ctx: list[bool]) -> list[str]:
    """Source of the block [start, stop) of the function [first, end); sets uses_ctx[0]
    when it accesses the context directly."""
    ctx_regs = set(ctx_regs)
    lines = [f"budget -= {block_cost(insns, start, stop)}",
             f"if budget < 0: run.budget = budget; raise VmFault('instruction budget exhausted',"
             f" {start})"]
    widths: dict[int, Width] = {}  # registers known narrower than EXACT, or unmasked

    def clean(regs: Iterable[int]) -> None:
        for reg in sorted(regs):
            bits, negative = widths.get(reg, EXACT)
            if bits > 64 or negative:
                lines.append(f"r{reg} &= {U64:#x}")
                widths.pop(reg)

    pc = start
    while pc < stop:
        i = insns[pc]
        if pc + 1 < stop and _zero_extends(i, insns[pc + 1]):
            lines.append(f"r{i.dst} &= {U32:#x}")
            widths[i.dst] = (32, False)
            ctx_regs.discard(i.dst)
            pc += 2
            continue
        if i.cls in (Class.JMP, Class.JMP32) and i.op != Jmp.CALL:
            clean([0] if i.opcode == EXIT else list(widths))  # exit reads only r0
            lines += _jump(insns, i, pc, start, range(first, end))
            return lines
        copies_ctx = _copies(i) in ctx_regs
        lazy = _lazy(i, widths)
        if lazy is not None:
            line, widths[i.dst] = lazy
            lines.append(line)
        else:
            clean(_clean_reads(i))
            direct = _stack_access(i, widths) if fixed_stack else None
            if direct is None:
                direct = _context_access(i, ctx_regs, widths)
                uses_ctx[0] |= direct is not None
            lines += [direct] if direct else _straight(i, pc)
            for reg in _writes(i):
                widths.pop(reg, None)
        ctx_regs.difference_update(_writes(i))
        if copies_ctx:
            ctx_regs.add(i.dst)
        pc += 2 if i.opcode == LD_IMM64 else 1
    clean(list(widths))
    if stop >= end:
        lines.append(f"raise VmFault('fell off the end of the program', {stop - 1})")
    else:
        lines.append(f"L = {stop}")
    return lines


def _zero_extends(i: Insn, following: Insn) -> bool:
    """`r <<= 32; r >>= 32` (clang's cast of a 64-bit register to u32): one mask."""
    lsh, rsh = Class.ALU64 | Alu.LSH | Source.K, Class.ALU64 | Alu.RSH | Source.K
    return (i.opcode == lsh and following.opcode == rsh and i.dst == following.dst
            and i.imm == following.imm == 32 and not i.off and not following.off)


# Masking is the largest cost of straight-line code, so blocks mask lazily. Python ints are
# unbounded two's complement, and ADD, SUB, MUL, LSH, AND, OR, XOR commute with reduction
# modulo 2**64: their results may stay unmasked (congruent to the exact value) until an
# instruction needs the exact value (a comparison, a right shift, a division, a helper
# argument, the end of the block). The compiler tracks a bound on each unmasked register's
# size and whether it may be negative, and masks once a value would outgrow LAZY_BITS (big
# ints get slower with size) -- negative values are avoided where it costs nothing, because
# CPython's bitwise operations on negative ints take a slow path.
Width = tuple[int, bool]  # (bound on the bit length of |value|, may be negative)
EXACT: Width = (64, False)
LAZY_BITS = 128


def _lazy(i: Insn, widths: dict[int, Width]) -> tuple[str, Width] | None:
    """An ALU64 op emitted without a mask: its source line and the width of the result."""
    if i.cls != Class.ALU64 or i.off:
        return None
    dst, op = f"r{i.dst}", i.op
    d_bits, d_neg = widths.get(i.dst, EXACT)
    if i.source == Source.X:
        s, (s_bits, s_neg) = f"r{i.src}", widths.get(i.src, EXACT)
    else:
        value = i.imm & U64
        s, s_bits, s_neg = str(value), value.bit_length(), False
        if op == Alu.SUB:  # d - k == d + (2**64 - k) mod 2**64, and stays non-negative
            value = -i.imm & U64
            return f"{dst} += {value}", (max(d_bits, value.bit_length()) + 1, d_neg)
    if op == Alu.MOV:
        return f"{dst} = {s}", (s_bits, s_neg)
    if op in (Alu.ADD, Alu.SUB):
        width = (max(d_bits, s_bits) + 1, d_neg or s_neg or op == Alu.SUB)
    elif op in (Alu.XOR, Alu.OR):
        width = (max(d_bits, s_bits), d_neg or s_neg)
    elif op == Alu.AND:  # a non-negative operand bounds the result
        bounds = [b for b, neg in ((d_bits, d_neg), (s_bits, s_neg)) if not neg]
        width = (min(bounds), False) if bounds else (max(d_bits, s_bits), True)
    elif op == Alu.MUL:
        width = (d_bits + s_bits, d_neg or s_neg)
    elif op == Alu.LSH and i.source == Source.K:
        width, s = (d_bits + (i.imm & 63), d_neg), str(i.imm & 63)
    else:
        return None
    if width[0] > LAZY_BITS:
        return None
    symbol = {Alu.ADD: "+", Alu.SUB: "-", Alu.XOR: "^", Alu.OR: "|", Alu.AND: "&",
              Alu.MUL: "*", Alu.LSH: "<<"}[op]
    return f"{dst} {symbol}= {s}", width


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


def _stack_access(i: Insn, widths: dict[int, Width]) -> str | None:
    """A load or store at r10 + constant as direct struct access to the frame's stack, or
    None (other instructions, and accesses outside the stack, which fault through Memory)."""
    base = i.src if i.cls == Class.LDX else i.dst
    if base != FRAME_POINTER or i.cls not in (Class.LDX, Class.ST, Class.STX):
        return None
    off = MAX_BPF_STACK + i.off
    if off < 0 or off + i.size > MAX_BPF_STACK:
        return None
    if i.cls == Class.LDX and i.mode == Mode.MEM:
        return f"r{i.dst} = unpack{i.size}(stack, {off})[0]"
    if i.cls == Class.LDX and i.mode == Mode.MEMSX:
        return f"r{i.dst} = sx(unpack{i.size}(stack, {off})[0], {i.size * 8}) & {U64:#x}"
    if i.cls == Class.ST and i.mode == Mode.MEM:
        return f"pack{i.size}(stack, {off}, {i.imm & SIZE_MASK[i.size]})"
    if i.cls == Class.STX and i.mode == Mode.MEM:
        bits, negative = widths.get(i.src, EXACT)
        value = f"r{i.src}" if bits <= i.size * 8 and not negative else \
            f"r{i.src} & {SIZE_MASK[i.size]:#x}"
        return f"pack{i.size}(stack, {off}, {value})"
    return None


def _context_access(i: Insn, ctx_regs: set[int], widths: dict[int, Width]) -> str | None:
    """A load or store at (a copy of) the context pointer + constant, straight to the
    context buffer when it is in bounds; otherwise Memory's load or store, which faults."""
    if i.cls not in (Class.LDX, Class.ST, Class.STX) or i.mode != Mode.MEM or i.off < 0:
        return None
    base = i.src if i.cls == Class.LDX else i.dst
    if base not in ctx_regs:
        return None
    inside = f"ctx_size >= {i.off + i.size}"
    addr = f"r{base} + {i.off}"  # exact: the context's address plus a small offset
    if i.cls == Class.LDX:
        return f"r{i.dst} = unpack{i.size}(ctx, {i.off})[0] if {inside} else" \
               f" mem.load({addr}, {i.size})"
    if i.cls == Class.ST:
        value = str(i.imm & SIZE_MASK[i.size])
    else:
        bits, negative = widths.get(i.src, EXACT)
        value = f"r{i.src}" if bits <= i.size * 8 and not negative else \
            f"r{i.src} & {SIZE_MASK[i.size]:#x}"
    return f"pack{i.size}(ctx, {i.off}, {value}) if {inside} else" \
           f" mem.store({addr}, {i.size}, {value})"


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
    if cls == Class.LD and i.mode == Mode.ABS and i.imm >= 0 and i.size in BE_UNPACK:
        # SkBuff.load for an offset into the data, inline: the packet from the skb each time
        # (a helper may have changed it); no skb or beyond the packet ends the program.
        return ["skb = run.skb",
                f"if skb is None or skb.data_start + {i.imm + i.size} > len(skb.current):"
                " raise PacketExit",
                f"r0 = unpack_be{i.size}(skb.current, skb.data_start + {i.imm})[0]"]
    if cls == Class.LD and i.mode in (Mode.ABS, Mode.IND):
        off = str(i.imm) if i.mode == Mode.ABS else f"sx((r{i.src} + {i.imm}) & {U32:#x}, 32)"
        return [f"r0 = run.load_packet({off}, {i.size})",
                "if r0 is None: raise PacketExit"]
    if i.opcode == Class.JMP | Jmp.CALL:
        if i.src == PSEUDO_CALL:
            target = call_target(i, pc)
            return ["run.budget = budget",
                    f"if depth + 1 >= MAX_FRAMES: raise VmFault('call depth above'"
                    f" ' {MAX_CALL_FRAMES} frames', {pc})",
                    "try:",
                    f"    r0 = f{target}(run, r1, r2, r3, r4, r5, depth + 1)",
                    "except TailCall:",
                    "    r0 = run_tail_calls(run, 'compiled', depth + 1, prog)",
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


def _jump(insns: list[Insn], i: Insn, pc: int, block_start: int, function: range
          ) -> list[str]:
    if i.op == Jmp.EXIT:
        if i.opcode != EXIT:
            return [f"raise VmFault('unknown opcode {i.opcode:#04x}', {pc})"]
        return ["run.budget = budget", "return r0"]
    target = jump_target(i, pc)
    if target not in function:  # the interpreter would run on outside this function's code
        return [f"raise VmFault('fell off the end of the program', {target})"]
    if target > function.start and insns[target - 1].opcode == LD_IMM64:
        return [f"raise VmFault('unknown opcode 0x00', {target})"]  # its second half
    again = "; continue" if target <= block_start else ""
    if i.op == Jmp.JA:
        if i.opcode not in (JA, JA32):
            return [f"raise VmFault('unknown opcode {i.opcode:#04x}', {pc})"]
        return [f"L = {target}{again}"]
    mask = U64 if i.cls == Class.JMP else U32
    template = ops.JMP.get(i.op)
    if template is None:
        return [f"raise VmFault('unknown opcode {i.opcode:#04x}', {pc})"]
    d = f"r{i.dst}" if mask == U64 else f"(r{i.dst} & {U32:#x})"
    cond = _subst(template.format(bits=64 if mask == U64 else 32), d, _operand(i, mask))
    return [f"if {cond}:", f"    L = {target}{again}", "else:", f"    L = {pc + 1}"]
