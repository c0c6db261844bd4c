"""Static liveness: the registers and stack slots the rest of a path may still read at each
instruction (today's kernels compute the same before do_check: compute_live_registers() and
the stack liveness of kernel/bpf/liveness.c).

State pruning compares only what is live. Without it, paths that differ in a value nobody
reads again never meet: a program of n branches that each set a register or a stack byte has
2**n states, and the 4.4 rules walk them all. The kernel accepts such programs after a few
dozen instructions; with liveness so do we.

A third part says which registers' scalar values matter ("precise", as the kernel's
precision tracking): a constant's value is only ever used as a pointer offset (ADD/SUB) or a
helper's size argument, directly or through register copies. Where it is not, any scalar
covers any other, so branches that only set constants nobody measures with meet again.

The analysis over-approximates reads, which is what keeps pruning sound: any access through a
register that may hold a stack pointer other than r10 itself (and any call) counts as reading
the whole stack; a stack slot is killed only by a full 8-byte store at r10 + constant.
"""

from __future__ import annotations

from ..helpers import HELPERS
from ..insn import Flow, is_local_call
from ..isa import EXIT, LD_IMM64, MOV64_X, R0, R6, R10, Alu, Atomic, Class, Insn, Jmp, Mode, Source
from ..uapi import MAX_BPF_STACK

SLOT = 8  # bytes of a stack slot (BPF_REG_SIZE)
SLOTS = MAX_BPF_STACK // SLOT
# Live masks: bit n is register n read, bit STACK_SHIFT + k stack slot k read, bit
# PRECISE_SHIFT + n the scalar value of register n used.
STACK_SHIFT = 16
PRECISE_SHIFT = STACK_SHIFT + SLOTS
REGS = (1 << (R10 + 1)) - 1
ALL_STACK = ((1 << SLOTS) - 1) << STACK_SHIFT
EVERYTHING = REGS | ALL_STACK | REGS << PRECISE_SHIFT
Effect = tuple[int, int, tuple[int, int] | None]  # (use, kill, (dst, src) of a register copy)


def reg_bits(*regs: int) -> int:
    bits = 0
    for r in regs:
        if 0 <= r <= R10:
            bits |= 1 << r
    return bits


def precise_bits(*regs: int) -> int:
    return reg_bits(*regs) << PRECISE_SHIFT


def written(*regs: int) -> int:
    """Registers overwritten: neither their old type nor their old value matters."""
    return reg_bits(*regs) | precise_bits(*regs)


CALL_CLOBBERED = written(0, 1, 2, 3, 4, 5)  # r0 set, r1-r5 made unreadable by every call


def slot_bits(off: int, size: int) -> int:
    """The slots holding stack bytes [off, off + size) relative to r10 (none out of range)."""
    bits = 0
    for byte in range(max(off, -MAX_BPF_STACK), min(off + size, 0)):
        bits |= 1 << (STACK_SHIFT + (MAX_BPF_STACK + byte) // SLOT)
    return bits


def stack_mask(live: int) -> bytes:
    """The live stack slots of a mask, as 0xFF over each live byte of the 512."""
    return b"".join(b"\xff" * SLOT if live >> (STACK_SHIFT + k) & 1 else bytes(SLOT)
                    for k in range(SLOTS))


def live_in(insns: list[Insn], flow: Flow) -> list[int]:
    """For each instruction, the mask of what is live on entry to it."""
    stack_regs = _may_point_to_stack(insns)
    effects = [_use_kill(i, stack_regs) for i in insns]
    # A callee's r0 goes back to its caller, which may measure with it (a pointer offset, a
    # size): its value is used at the callee's exit. (The main program's is only returned.)
    for start, end in flow.functions[1:]:
        for pc in range(start, end):
            if insns[pc].opcode == EXIT:
                use, kill, copy = effects[pc]
                effects[pc] = (use | precise_bits(R0), kill, copy)
    n = len(insns)
    live = [0] * n
    # Backward data flow to a fixpoint. Without a backward jump one pass in reverse order is
    # exact; loops need passes until nothing changes.
    loops = any(nxt <= pc for pc, succ in enumerate(flow.succ) for nxt in succ)
    changed = True
    while changed:
        changed = False
        for pc in range(n - 1, -1, -1):
            out = 0
            for nxt in flow.succ[pc]:
                if 0 <= nxt < n:
                    out |= live[nxt]
            use, kill, copy = effects[pc]
            new = use | (out & ~kill)
            if copy and out & precise_bits(copy[0]):  # a copy's value: its source's
                new |= precise_bits(copy[1])
            if new != live[pc]:
                live[pc] = new
                changed = loops
    return live


def _may_point_to_stack(insns: list[Insn]) -> frozenset[int]:
    """Registers that may ever hold a stack pointer (r10, copies of one, fills of a spilled
    one), whatever the path: the verifier's PTR_TO_STACK only arises that way."""
    regs = {R10}
    grew = True
    while grew:
        grew = False
        for i in insns:
            copy = i.opcode == MOV64_X and i.src in regs
            fill = i.cls == Class.LDX and i.mode == Mode.MEM and i.size == 8 and i.src in regs
            if (copy or fill) and i.dst not in regs:
                regs.add(i.dst)
                grew = True
    return frozenset(regs)


def _memory_read(base: int, off: int, size: int, stack_regs: frozenset[int]) -> int:
    if base == R10:
        return slot_bits(off, size)
    return ALL_STACK if base in stack_regs else 0


def _use_kill(i: Insn, stack_regs: frozenset[int]) -> Effect:
    """What the instruction may read, what it surely overwrites (as live masks), and the
    (dst, src) of a register copy."""
    cls = i.cls
    if cls in (Class.ALU, Class.ALU64):
        return _alu_use_kill(i)
    if cls == Class.LDX:
        return (reg_bits(i.src) | _memory_read(i.src, i.off, i.size, stack_regs),
                written(i.dst), None)
    if cls in (Class.ST, Class.STX) and i.mode == Mode.MEM:
        use = reg_bits(i.dst, *((i.src,) if cls == Class.STX else ()))
        full_slot = i.dst == R10 and i.size == SLOT and i.off % SLOT == 0
        return use, slot_bits(i.off, SLOT) if full_slot else 0, None
    if cls == Class.STX and i.mode == Mode.ATOMIC:
        r0 = (R0,) if i.imm == Atomic.CMPXCHG else ()
        return (reg_bits(i.dst, i.src, *r0) | _memory_read(i.dst, i.off, i.size, stack_regs),
                0, None)
    if i.opcode == LD_IMM64:
        return 0, written(i.dst), None
    if cls == Class.LD and i.mode in (Mode.ABS, Mode.IND):
        src = (i.src,) if i.mode == Mode.IND else ()
        return reg_bits(R6, *src), CALL_CLOBBERED, None
    if cls in (Class.JMP, Class.JMP32):
        return _jump_use_kill(i, stack_regs)
    return EVERYTHING, 0, None  # not an instruction the verifier accepts: it may read it all


def _alu_use_kill(i: Insn) -> Effect:
    """An ALU op writes dst. A move copies its source (a constant stays one); ADD and SUB use
    a source register's value when dst is a pointer (its new offset); nothing else keeps a
    constant's value (the result is an unknown scalar)."""
    x = i.source == Source.X and i.op not in (Alu.NEG, Alu.END)
    if i.op == Alu.MOV:
        return (reg_bits(i.src), written(i.dst), (i.dst, i.src)) if x else \
            (0, written(i.dst), None)
    use = reg_bits(i.dst, *((i.src,) if x else ()))
    if x and i.op in (Alu.ADD, Alu.SUB):
        use |= precise_bits(i.src)
    return use, written(i.dst), None


def _jump_use_kill(i: Insn, stack_regs: frozenset[int]) -> Effect:
    if i.op == Jmp.EXIT:
        return reg_bits(R0), 0, None
    if i.op == Jmp.CALL:
        spec = HELPERS.get(i.imm)
        nargs = 5 if is_local_call(i) or spec is None else len(spec.args)
        args = range(1, nargs + 1)
        # a pointer argument may let the callee read any of the caller's stack; a size
        # argument's value is used
        stack = ALL_STACK if is_local_call(i) or stack_regs.intersection(args) else 0
        return reg_bits(*args) | precise_bits(*args) | stack, CALL_CLOBBERED, None
    if i.op == Jmp.JA:
        return 0, 0, None
    return reg_bits(i.dst, *((i.src,) if i.source == Source.X else ())), 0, None
