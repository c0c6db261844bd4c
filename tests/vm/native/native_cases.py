"""Running one program on a tier and capturing everything a difference could show in: the
full 64-bit r0 or the exception (class and message), the frame-0 stack and the budget left;
and a seeded generator of unverified programs with loops, calls, atomics and faults."""

from __future__ import annotations

import random
from dataclasses import dataclass

from bpffs.vm import asm, load_program
from bpffs.vm.env import RunEnv
from bpffs.vm.isa import R0, R10, Alu, Atomic, Class, Insn, Jmp, Source
from bpffs.vm.memory import STACK_REGION
from bpffs.vm.run import Run
from bpffs.vm.uapi import ProgType

PACKET = bytes(6) + bytes.fromhex("020000000001") + b"\x08\x00" + bytes(range(64))
REFERENCE = "interpreter"


@dataclass(frozen=True)
class Outcome:
    result: str  # "r0=<hex>" or "<Exception class>: <message>"
    stack: bytes
    budget: int


def outcome(code: bytes, tier: str, budget: int = RunEnv.budget, maps: dict | None = None,
            prog_type: int = ProgType.SCHED_CLS, data: bytes = PACKET) -> Outcome:
    prog, _ = load_program(prog_type, code, license="GPL",
                           resolve_map=(maps or {}).__getitem__, verify=False)
    run = Run.for_test(prog, data, None, RunEnv(budget=budget))
    run.reset()
    try:
        result = f"r0={prog.execute(run, tier):#x}"
    except Exception as e:  # the class and message are what is compared
        result = f"{type(e).__name__}: {e}"
    stack = run.mem.regions.get(STACK_REGION)
    return Outcome(result, bytes(stack.buf) if stack else b"", run.budget)


REGS = (0, 1, 2, 3, 4, 5, 7, 8, 9)  # r6 counts the loop
INTERESTING = [0, 1, -1, 2, 7, 31, 32, 63, 64, 0x7FFFFFFF, -0x80000000, 0xFFFF, 0x80]
ALU_VARIANTS = [(op, 0) for op in Alu if op != Alu.END] + \
    [(Alu.DIV, 1), (Alu.MOD, 1), (Alu.MOV, 8), (Alu.MOV, 16), (Alu.MOV, 32)]
ATOMICS = [Atomic.ADD, Atomic.OR, Atomic.AND, Atomic.XOR, Atomic.ADD | Atomic.FETCH,
           Atomic.OR | Atomic.FETCH, Atomic.AND | Atomic.FETCH, Atomic.XOR | Atomic.FETCH,
           Atomic.XCHG, Atomic.CMPXCHG]
# Instructions no tier runs (with off=2, imm=5): callx, exit in JMP32, a JMP operation no
# Jmp names, gotol with a register, a byte swap of 5 bits, a division with off=2.
UNUSED_JMP_OP = next(op for op in range(0, 0x100, 0x10) if op not in set(Jmp))
INVALID = [Class.JMP | Jmp.CALL | Source.X, Class.JMP32 | Jmp.EXIT, Class.JMP | UNUSED_JMP_OP,
           Class.JMP32 | Jmp.JA | Source.X, Class.ALU64 | Alu.END, Class.ALU | Alu.DIV | Source.X]
JUMPS = [Jmp.JEQ, Jmp.JGT, Jmp.JGE, Jmp.JSET, Jmp.JNE, Jmp.JSGT, Jmp.JSGE, Jmp.JLT,
         Jmp.JLE, Jmp.JSLT, Jmp.JSLE]


def _imm(rng: random.Random) -> int:
    return rng.choice(INTERESTING) if rng.random() < 0.5 else rng.randint(-2**31, 2**31 - 1)


class _Writer:
    """Ops as lists of insns; jumps name the op they go to and are resolved at the end."""

    def __init__(self) -> None:
        self.ops: list[list[Insn] | tuple[Insn, int]] = []

    def add(self, *insns: Insn | list[Insn]) -> None:
        for i in insns:
            self.ops.append(i if isinstance(i, list) else [i])

    def jump(self, template: Insn, to_op: int) -> None:
        self.ops.append((template, to_op))

    def insns(self) -> list[Insn]:
        starts, slot = [], 0
        for op in self.ops:
            starts.append(slot)
            slot += 1 if isinstance(op, tuple) else len(op)
        starts.append(slot)
        out: list[Insn] = []
        for n, op in enumerate(self.ops):
            if isinstance(op, tuple):
                i, to = op
                off = starts[to] - starts[n] - 1
                if i.opcode == asm.ja(0).opcode:
                    out.append(asm.ja(off))
                else:
                    out.append(Insn(i.opcode, i.dst, i.src, off, i.imm))
            else:
                out.extend(op)
        return out


def wild_program(seed: int, length: int = 50) -> bytes:
    """Unverified: every ALU form, stack loads and stores of each size (now and then out of
    the stack), atomics, JMP/JMP32 forward, bounded loops and a recursive subprogram (which
    may go too deep); sometimes an invalid insn."""
    rng = random.Random(seed)
    w = _Writer()
    w.add(*[asm.ld_imm64(r, rng.getrandbits(64)) for r in REGS])
    w.add(asm.mov64_imm(6, rng.randint(1, 4)))  # a loop counter
    w.add(*[asm.st(8, R10, -8 * n, _imm(rng)) for n in range(1, 9)])
    loop_start = len(w.ops)
    for _ in range(length):
        kind = rng.random()
        dst, src = rng.choice(REGS), rng.choice(REGS)
        if kind < 0.40:
            op, variant = rng.choice(ALU_VARIANTS)
            wide = rng.random() < 0.6
            if not wide and variant == 32:
                variant = 16
            build = asm.alu64 if wide else asm.alu32
            if rng.random() < 0.5:
                w.add(build(op, dst, src, off=variant, reg=True))
            else:
                w.add(build(op, dst, imm=_imm(rng), off=variant, reg=False))
        elif kind < 0.45:
            cls = rng.choice([Class.ALU, Class.ALU64])
            source = rng.choice([Source.K, Source.X])
            bits = rng.choice([16, 32, 64]) if rng.random() < 0.97 else 8
            w.add(Insn(cls | Alu.END | source, dst, 0, 0, bits))
        elif kind < 0.62:
            size = rng.choice([1, 2, 4, 8])
            off = -8 * rng.randint(1, 8) + rng.randrange(0, 9 - size)
            if rng.random() < 0.03:
                off = rng.choice([0, -520, 4, -3])
            choice = rng.random()
            if choice < 0.3:
                w.add(asm.stx(size, R10, src, off))
            elif choice < 0.45:
                w.add(asm.st(size, R10, off, _imm(rng)))
            elif choice < 0.6 and size < 8:
                w.add(asm.ldxs(size, dst, R10, off))
            else:
                w.add(asm.ldx(size, dst, R10, off))
        elif kind < 0.70:
            size = rng.choice([4, 8])
            w.add(asm.atomic(size, rng.choice(ATOMICS), R10, src, -8 * rng.randint(1, 8)))
        elif kind < 0.85:
            cls = rng.choice([Class.JMP, Class.JMP32])
            to = len(w.ops) + 1 + rng.randint(0, 3)
            if rng.random() < 0.5:
                w.jump(asm.jmp_imm(rng.choice(JUMPS), dst, _imm(rng), 0, cls), to)
            else:
                w.jump(asm.jmp_reg(rng.choice(JUMPS), dst, src, 0, cls), to)
            w.add(asm.add64_imm(R0, 1))
            w.add(asm.alu64(Alu.XOR, dst, src, reg=True))
            w.add(asm.alu64(Alu.ADD, dst, imm=3, reg=False))
        elif kind < 0.93:
            w.add(asm.mov64_imm(1, rng.randint(0, 6) if rng.random() < 0.95 else 9))  # depth
            w.add(asm.call_local(0))  # resolved below: the subprogram
        elif kind < 0.935:
            w.add(Insn(rng.choice(INVALID), dst, src, 2, 5))
        else:
            w.add(asm.mov64_reg(R0, rng.choice(REGS)))
    w.add(asm.alu64(Alu.SUB, 6, imm=1, reg=False))
    w.jump(asm.jmp_imm(Jmp.JSGT, 6, 0, 0), loop_start)
    w.add(*[asm.alu64(Alu.XOR, R0, r, reg=True) for r in REGS[1:]])
    w.add(asm.exit())
    main = w.insns()
    sub = _subprogram(rng)
    out = []
    for pc, i in enumerate(main):
        if i.opcode == asm.call_local(0).opcode and i.src == asm.call_local(0).src:
            i = asm.call_local(len(main) - pc - 1)
        out.append(i)
    return asm.program(*out, *sub)


def _subprogram(rng: random.Random) -> list[Insn]:
    """f(r1 = depth wanted, r2..r5): its own stack, some ALU, recursion until r1 == 0."""
    return [asm.stx(8, R10, 2, -8), asm.st(4, R10, -16, _imm(rng)),
            asm.alu64(Alu.MUL, 2, imm=_imm(rng), reg=False),
            asm.ldx(4, R0, R10, -16),
            asm.alu64(Alu.ADD, R0, 2, reg=True),
            asm.jmp_imm(Jmp.JEQ, 1, 0, 3),
            asm.alu64(Alu.SUB, 1, imm=1, reg=False),
            asm.call_local(-8),
            asm.alu64(Alu.XOR, R0, 3, reg=True),
            asm.ldx(8, 3, R10, -8), asm.alu64(Alu.ADD, R0, 3, reg=True),
            asm.exit()]
