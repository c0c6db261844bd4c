"""A small assembler for writing programs in Python (tests, benchmarks, examples):
`asm.program(asm.mov64_imm(R0, 1), asm.exit())` -> bytecode."""

from __future__ import annotations

from .isa import (
    CALL,
    EXIT,
    LD_IMM64,
    U32,
    Alu,
    Atomic,
    Class,
    Insn,
    Jmp,
    Mode,
    Size,
    Source,
)
from .uapi import BPF_PSEUDO_CALL, BPF_PSEUDO_MAP_FD

_SIZES = {1: Size.B, 2: Size.H, 4: Size.W, 8: Size.DW}


def program(*parts: Insn | list[Insn] | bytes) -> bytes:
    """Instructions, lists of them (LD_IMM64) and already assembled bytecode, in order."""
    out = bytearray()
    for part in parts:
        if isinstance(part, (bytes, bytearray)):
            out += part
        else:
            for insn in part if isinstance(part, list) else [part]:
                out += insn.encode()
    return bytes(out)


def alu64(op: Alu, dst: int, src: int = 0, imm: int = 0, off: int = 0, *, reg: bool) -> Insn:
    return Insn(Class.ALU64 | op | (Source.X if reg else Source.K), dst, src, off, imm)


def alu32(op: Alu, dst: int, src: int = 0, imm: int = 0, off: int = 0, *, reg: bool) -> Insn:
    return Insn(Class.ALU | op | (Source.X if reg else Source.K), dst, src, off, imm)


def mov64_imm(dst: int, imm: int) -> Insn:
    return alu64(Alu.MOV, dst, imm=imm, reg=False)


def mov64_reg(dst: int, src: int) -> Insn:
    return alu64(Alu.MOV, dst, src, reg=True)


def add64_imm(dst: int, imm: int) -> Insn:
    return alu64(Alu.ADD, dst, imm=imm, reg=False)


def ld_imm64(dst: int, value: int) -> list[Insn]:
    return [Insn(LD_IMM64, dst, 0, 0, _s32(value & U32)), Insn(0, 0, 0, 0, _s32(value >> 32 & U32))]


def ld_map_fd(dst: int, fd: int) -> list[Insn]:
    return [Insn(LD_IMM64, dst, BPF_PSEUDO_MAP_FD, 0, fd), Insn(0, 0, 0, 0, 0)]


def ldx(size: int, dst: int, src: int, off: int) -> Insn:
    return Insn(Class.LDX | Mode.MEM | _SIZES[size], dst, src, off, 0)


def ldxs(size: int, dst: int, src: int, off: int) -> Insn:
    return Insn(Class.LDX | Mode.MEMSX | _SIZES[size], dst, src, off, 0)


def stx(size: int, dst: int, src: int, off: int) -> Insn:
    return Insn(Class.STX | Mode.MEM | _SIZES[size], dst, src, off, 0)


def st(size: int, dst: int, off: int, imm: int) -> Insn:
    return Insn(Class.ST | Mode.MEM | _SIZES[size], dst, 0, off, imm)


def atomic(size: int, op: Atomic, dst: int, src: int, off: int) -> Insn:
    return Insn(Class.STX | Mode.ATOMIC | _SIZES[size], dst, src, off, op)


def ld_abs(size: int, imm: int) -> Insn:
    return Insn(Class.LD | Mode.ABS | _SIZES[size], 0, 0, 0, imm)


def ld_ind(size: int, src: int, imm: int) -> Insn:
    return Insn(Class.LD | Mode.IND | _SIZES[size], 0, src, 0, imm)


def jmp_imm(op: Jmp, dst: int, imm: int, off: int, cls: Class = Class.JMP) -> Insn:
    return Insn(cls | op | Source.K, dst, 0, off, imm)


def jmp_reg(op: Jmp, dst: int, src: int, off: int, cls: Class = Class.JMP) -> Insn:
    return Insn(cls | op | Source.X, dst, src, off, 0)


def ja(off: int) -> Insn:
    return Insn(Class.JMP | Jmp.JA, 0, 0, off, 0)


def call(helper_id: int) -> Insn:
    return Insn(CALL, 0, 0, 0, int(helper_id))


def call_local(offset: int) -> Insn:
    return Insn(CALL, 0, BPF_PSEUDO_CALL, 0, offset)


def exit() -> Insn:
    return Insn(EXIT, 0, 0, 0, 0)


def _s32(value: int) -> int:
    return value - (1 << 32) if value >> 31 else value
