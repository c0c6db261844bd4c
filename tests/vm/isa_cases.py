"""Edge cases of the instruction set, each a short program and the u32 it must return: the
table both tiers run (test_tiers) and the running kernel checks (test_kernel_differential)."""

from __future__ import annotations

from bpffs.vm import asm
from bpffs.vm.isa import R0, R1, R2, R10, U64, Alu, Atomic, Class, Insn, Jmp, Source

MIN64 = 1 << 63


def returns64(*body) -> bytes:
    """A program that leaves its r0 in r0 and returns the low 32 bits."""
    return asm.program(*body, asm.exit())


def alu(op, a, b, *, wide=True, off=0):
    """r0 = a; r1 = b; r0 op= r1 (64- or 32-bit); return low 32 bits (and high via a shift)."""
    build = asm.alu64 if wide else asm.alu32
    return [asm.ld_imm64(R0, a), asm.ld_imm64(R1, b), build(op, R0, R1, off=off, reg=True)]


def high(body):
    return [*body, asm.alu64(Alu.RSH, R0, imm=32, reg=False)]


CASES = {
    # name: (instructions, expected u32 retval)
    "add wraps": (alu(Alu.ADD, U64, 2), 1),
    "sub wraps": (alu(Alu.SUB, 0, 1), 0xFFFFFFFF),
    "mul high": (high(alu(Alu.MUL, 1 << 32, 3)), 3),
    "div by zero is 0": (alu(Alu.DIV, 7, 0), 0),
    "mod by zero keeps dst": (alu(Alu.MOD, 7, 0), 7),
    "mod32 by zero zero-extends": (high(alu(Alu.MOD, U64, 0, wide=False)), 0),
    "div32 truncates operands": (alu(Alu.DIV, (5 << 32) | 10, (1 << 32) | 2, wide=False), 5),
    "sdiv rounds toward zero": (alu(Alu.DIV, -7 & U64, 2, off=1), -3 & 0xFFFFFFFF),
    "sdiv INT_MIN / -1 wraps": (high(alu(Alu.DIV, MIN64, U64, off=1)), 0x80000000),
    "smod sign of dividend": (alu(Alu.MOD, -7 & U64, 2, off=1), -1 & 0xFFFFFFFF),
    "smod by zero keeps dst": (alu(Alu.MOD, 9, 0, off=1), 9),
    "lsh masks count to 63": (alu(Alu.LSH, 1, 65), 2),
    "rsh32 masks count to 31": (alu(Alu.RSH, 0x80000000, 63, wide=False), 1),
    "arsh sign extends": (alu(Alu.ARSH, MIN64, 63), 0xFFFFFFFF),
    "arsh32 sign extends": (alu(Alu.ARSH, 0x80000000, 31, wide=False), 0xFFFFFFFF),
    "alu32 zero-extends": (high(alu(Alu.ADD, U64, 1, wide=False)), 0),
    "neg": ([asm.mov64_imm(R0, 5), asm.alu64(Alu.NEG, R0, reg=False)], -5 & 0xFFFFFFFF),
    "movsx8": ([asm.mov64_imm(R1, 0x80), asm.alu64(Alu.MOV, R0, R1, off=8, reg=True)],
               0xFFFFFF80),
    "movsx32 high": (high([asm.ld_imm64(R1, 0x80000000),
                           asm.alu64(Alu.MOV, R0, R1, off=32, reg=True)]), 0xFFFFFFFF),
    "mov32 sx16 zero-extends": (high([asm.mov64_imm(R1, 0x8000),
                                      asm.alu32(Alu.MOV, R0, R1, off=16, reg=True)]), 0),
    "be16": ([asm.mov64_imm(R0, 0x1234), Insn(Class.ALU | Alu.END | Source.X, R0, 0, 0, 16)],
             0x3412),
    "le32 truncates": ([asm.ld_imm64(R0, 0x1_2345_6789),
                        Insn(Class.ALU | Alu.END, R0, 0, 0, 32)], 0x23456789),
    "bswap64": (high([asm.ld_imm64(R0, 0x0102030405060708),
                      Insn(Class.ALU64 | Alu.END, R0, 0, 0, 64)]), 0x08070605),
    "jset": ([asm.mov64_imm(R0, 0), asm.mov64_imm(R1, 6), asm.jmp_imm(Jmp.JSET, R1, 2, 1),
              asm.exit(), asm.mov64_imm(R0, 1)], 1),
    "jsgt signed": ([asm.mov64_imm(R0, 0), asm.mov64_imm(R1, -1),
                     asm.jmp_imm(Jmp.JSGT, R1, 0, 1), asm.mov64_imm(R0, 1)], 1),
    "jmp32 compares low half": ([asm.mov64_imm(R0, 0), asm.ld_imm64(R1, (7 << 32) | 5),
                                 asm.jmp_imm(Jmp.JEQ, R1, 5, 1, Class.JMP32),
                                 asm.exit(), asm.mov64_imm(R0, 1)], 1),
    "stack u16 store/load": ([asm.mov64_imm(R1, 0x12345), asm.stx(2, R10, R1, -2),
                              asm.ldx(2, R0, R10, -2)], 0x2345),
    "memsx load": ([asm.st(1, R10, -1, 0xF0), asm.ldxs(1, R0, R10, -1)], 0xFFFFFFF0),
    "atomic fetch add": ([asm.st(8, R10, -8, 40), asm.mov64_imm(R1, 2),
                          asm.atomic(8, Atomic.ADD | Atomic.FETCH, R10, R1, -8),
                          asm.ldx(8, R0, R10, -8), asm.alu64(Alu.ADD, R0, R1, reg=True)], 82),
    "atomic xchg": ([asm.st(4, R10, -4, 9), asm.mov64_imm(R1, 3),
                     asm.atomic(4, Atomic.XCHG, R10, R1, -4), asm.ldx(4, R0, R10, -4),
                     asm.alu64(Alu.MUL, R0, R1, reg=True)], 27),
    "atomic cmpxchg": ([asm.st(8, R10, -8, 5), asm.mov64_imm(R0, 5), asm.mov64_imm(R1, 6),
                        asm.atomic(8, Atomic.CMPXCHG, R10, R1, -8), asm.ldx(8, R2, R10, -8),
                        asm.alu64(Alu.MUL, R0, R2, reg=True)], 30),
    # A socket filter's data starts at the network header: offset 12 is frame byte 26.
    "ld_abs is big endian": ([asm.mov64_reg(6, R1), asm.ld_abs(2, 12)], 0x0C0D),
    "ld_abs out of bounds returns 0": ([asm.mov64_reg(6, R1), asm.mov64_imm(R0, 9),
                                        asm.ld_abs(4, 10_000), asm.mov64_imm(R0, 7)], 0),
    "ld_ind adds the register": ([asm.mov64_reg(6, R1), asm.mov64_imm(R2, 10),
                                  asm.ld_ind(1, R2, 4)], 14 + 0),
    "bpf-to-bpf call keeps callee-saved": ([asm.mov64_imm(7, 40), asm.mov64_imm(R1, 2),
                                            asm.call_local(2), asm.alu64(Alu.ADD, R0, 7,
                                                                         reg=True),
                                            asm.exit(),
                                            asm.mov64_imm(7, 1000), asm.mov64_reg(R0, R1),
                                            asm.alu64(Alu.MUL, R0, imm=3, reg=False)], 46),
}
