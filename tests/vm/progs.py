"""Program builders shared by the VM tests and benchmarks: seeded random loop-free programs
that both the kernel's verifier and ours accept, and a helper to run bytecode on both tiers."""

from __future__ import annotations

import random

from bpffs.vm import asm, load_program
from bpffs.vm.isa import R0, R1, R6, R10, Alu, Class, Jmp
from bpffs.vm.uapi import ProgType

ETH_IPV4 = bytes(6) + bytes.fromhex("020000000001") + b"\x08\x00"
SCRATCH = (R0, 1, 2, 3, 4, 5, 7, 8, 9)  # every register but r6 (ctx) and r10
STACK_SLOTS = [-8 * n for n in range(1, 9)]
ALU_OPS = [Alu.ADD, Alu.SUB, Alu.MUL, Alu.DIV, Alu.OR, Alu.AND, Alu.LSH, Alu.RSH, Alu.NEG,
           Alu.MOD, Alu.XOR, Alu.MOV, Alu.ARSH]
JMP_OPS = [Jmp.JEQ, Jmp.JGT, Jmp.JGE, Jmp.JSET, Jmp.JNE, Jmp.JSGT, Jmp.JSGE, Jmp.JLT,
           Jmp.JLE, Jmp.JSLT, Jmp.JSLE]
INTERESTING = [0, 1, -1, 2, 0x7FFFFFFF, -0x80000000, 0xFFFF, 63, 64, 31, 32, 7]


def load(code: bytes, prog_type: int = ProgType.SOCKET_FILTER, maps: dict | None = None):
    prog, _ = load_program(prog_type, code, license="GPL",
                           resolve_map=lambda fd: (maps or {})[fd])
    return prog


def _imm(rng: random.Random) -> int:
    return rng.choice(INTERESTING) if rng.random() < 0.4 else rng.randint(-2**31, 2**31 - 1)


def random_program(seed: int, length: int = 60, packet: bool = False) -> bytes:
    """A loop-free SOCKET_FILTER program over scalars and an initialised stack; with
    `packet`, LD_ABS/LD_IND loads feed r0 (LD_* clobber r1-r5, so those are re-initialised)."""
    rng = random.Random(seed)
    body: list = [asm.mov64_reg(R6, R1)]
    for reg in SCRATCH:
        body.append(asm.ld_imm64(reg, rng.getrandbits(64)))
    for slot in STACK_SLOTS:
        body.append(asm.st(8, R10, slot, _imm(rng)))
    ops: list[list] = []
    for _ in range(length):
        ops.append(_random_op(rng, packet))
    # Forward jumps only: a jump at op k skips up to the remaining ops (counted in slots).
    flat: list = []
    sizes = [len(_flatten(op)) for op in ops]  # an LD_IMM64 is a list of its two slots
    for k, op in enumerate(ops):
        if rng.random() < 0.15 and k + 1 < len(ops):
            skip = sum(sizes[k + 1:k + 1 + rng.randint(1, min(5, len(ops) - k - 1))])
            cls = rng.choice([Class.JMP, Class.JMP32])
            jop = rng.choice(JMP_OPS)
            if rng.random() < 0.5:
                flat.append(asm.jmp_imm(jop, rng.choice(SCRATCH), _imm(rng), skip, cls))
            else:
                flat.append(asm.jmp_reg(jop, rng.choice(SCRATCH), rng.choice(SCRATCH), skip, cls))
        flat.extend(_flatten(op))
    tail = []
    for reg in SCRATCH[1:]:
        tail.append(asm.alu64(Alu.XOR, R0, reg, reg=True))
    tail += [asm.mov64_reg(2, R0), asm.alu64(Alu.RSH, 2, imm=32, reg=False),
             asm.alu64(Alu.XOR, R0, 2, reg=True), asm.exit()]
    return asm.program(*body, *flat, *tail)


def _flatten(op):
    return op if isinstance(op, list) else [op]


def _random_op(rng: random.Random, packet: bool):
    kind = rng.random()
    if packet and kind < 0.15:
        size = rng.choice([1, 2, 4])
        if rng.random() < 0.5:
            load_insn = asm.ld_abs(size, rng.randint(0, 80))
        else:
            load_insn = asm.ld_ind(size, rng.choice([7, 8, 9]), rng.randint(0, 40))
        # r1-r5 are scratched by LD_ABS/IND: give them values again.
        return [load_insn] + [asm.mov64_imm(r, _imm(rng)) for r in (1, 2, 3, 4, 5)]
    if kind < 0.25:
        slot = rng.choice(STACK_SLOTS)
        size = rng.choice([1, 2, 4, 8])
        off = slot + rng.randrange(0, 8, size)
        if rng.random() < 0.5:
            return asm.stx(size, R10, rng.choice(SCRATCH), off)
        if rng.random() < 0.3:
            return asm.ldxs(size, rng.choice(SCRATCH), R10, off) if size < 8 else \
                asm.ldx(size, rng.choice(SCRATCH), R10, off)
        return asm.ldx(size, rng.choice(SCRATCH), R10, off)
    if kind < 0.30:
        return asm.Insn(Class.ALU64 | Alu.END, rng.choice(SCRATCH), 0, 0,
                        rng.choice([16, 32, 64])) if rng.random() < 0.5 else \
            asm.Insn(Class.ALU | Alu.END | rng.choice([0, 8]), rng.choice(SCRATCH), 0, 0,
                     rng.choice([16, 32, 64]))
    alu64 = rng.random() < 0.6
    op = rng.choice(ALU_OPS)
    dst = rng.choice(SCRATCH)
    off = 0
    if op in (Alu.DIV, Alu.MOD) and rng.random() < 0.4:
        off = 1
    if op == Alu.MOV and rng.random() < 0.3:
        off = rng.choice([8, 16, 32] if alu64 else [8, 16])
        return (asm.alu64 if alu64 else asm.alu32)(op, dst, rng.choice(SCRATCH), off=off,
                                                   reg=True)
    build = asm.alu64 if alu64 else asm.alu32
    if op == Alu.NEG:
        return build(op, dst, reg=False)
    if op in (Alu.LSH, Alu.RSH, Alu.ARSH) and rng.random() < 0.5:
        return build(op, dst, imm=rng.randrange(64 if alu64 else 32), reg=False)
    if rng.random() < 0.5 and op not in (Alu.LSH, Alu.RSH, Alu.ARSH):
        imm = _imm(rng)
        if op in (Alu.DIV, Alu.MOD) and imm == 0:
            imm = 3  # the kernel's verifier rejects division by a constant zero
        return build(op, dst, imm=imm, off=off, reg=False)
    return build(op, dst, rng.choice(SCRATCH), off=off, reg=True)
