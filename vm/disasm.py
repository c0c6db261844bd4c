"""Instructions as text, in the kernel's print_bpf_insn style (the verifier log and
`bpftool prog dump xlated`): `0: (b7) r0 = 0`, `5: (85) call bpf_map_lookup_elem#1`."""

from __future__ import annotations

from collections.abc import Sequence

from .isa import (
    JA32,
    LD_IMM64,
    PSEUDO_CALL,
    PSEUDO_MAP_FD,
    Alu,
    Atomic,
    Class,
    Insn,
    Jmp,
    Mode,
    Source,
    decode,
)
from .uapi import Helper

ALU_OPS = {Alu.ADD: "+=", Alu.SUB: "-=", Alu.MUL: "*=", Alu.DIV: "/=", Alu.OR: "|=",
           Alu.AND: "&=", Alu.LSH: "<<=", Alu.RSH: ">>=", Alu.MOD: "%=", Alu.XOR: "^=",
           Alu.MOV: "=", Alu.ARSH: "s>>="}
JMP_OPS = {Jmp.JEQ: "==", Jmp.JGT: ">", Jmp.JGE: ">=", Jmp.JSET: "&", Jmp.JNE: "!=",
           Jmp.JSGT: "s>", Jmp.JSGE: "s>=", Jmp.JLT: "<", Jmp.JLE: "<=", Jmp.JSLT: "s<",
           Jmp.JSLE: "s<="}
SIZE_NAMES = {1: "u8", 2: "u16", 4: "u32", 8: "u64"}
ATOMIC_NAMES = {Atomic.ADD: "add", Atomic.OR: "or", Atomic.AND: "and", Atomic.XOR: "xor"}


def format_insn(i: Insn, pc: int, maps: Sequence[int] = ()) -> str:
    return f"({i.opcode:02x}) {_text(i, pc, maps)}"


def disassemble(insns: bytes, maps: Sequence[int] = ()) -> list[str]:
    """One line per instruction ("pc: (op) text"); `maps` are the ids of the program's maps,
    indexed by the map references of the xlated instructions."""
    decoded = decode(insns)
    out = []
    pc = 0
    while pc < len(decoded):
        out.append(f"{pc}: {format_insn(decoded[pc], pc, maps)}")
        pc += 2 if decoded[pc].opcode == LD_IMM64 else 1
    return out


def _reg(n: int, wide: bool) -> str:
    return f"{'r' if wide else 'w'}{n}"


def _text(i: Insn, pc: int, maps: Sequence[int]) -> str:
    cls = i.cls
    if cls in (Class.ALU, Class.ALU64):
        wide = cls == Class.ALU64
        d = _reg(i.dst, wide)
        src = _reg(i.src, wide) if i.source == Source.X else str(i.imm)
        if i.op == Alu.NEG:
            return f"{d} = -{d}"
        if i.op == Alu.END:
            kind = "bswap" if wide else ("be" if i.source == Source.X else "le")
            return f"r{i.dst} = {kind}{i.imm} r{i.dst}"
        if i.op == Alu.MOV and i.off:
            return f"{d} = (s{i.off}){_reg(i.src, wide)}"
        op = ALU_OPS.get(i.op, "?=")
        if i.op in (Alu.DIV, Alu.MOD) and i.off == 1:
            op = "s" + op
        return f"{d} {op} {src}"
    size = SIZE_NAMES.get(i.size, "?") if cls in (Class.LD, Class.LDX, Class.ST,
                                                  Class.STX) else ""
    if cls == Class.LDX:
        sign = "s" if i.mode == Mode.MEMSX else "u"
        return f"r{i.dst} = *({sign}{size[1:]} *)(r{i.src} {i.off:+d})"
    if cls == Class.ST:
        return f"*({size} *)(r{i.dst} {i.off:+d}) = {i.imm}"
    if cls == Class.STX and i.mode == Mode.ATOMIC:
        return _atomic(i, size)
    if cls == Class.STX:
        return f"*({size} *)(r{i.dst} {i.off:+d}) = r{i.src}"
    if i.opcode == LD_IMM64:
        if i.src == PSEUDO_MAP_FD:
            ref = f"map[id:{maps[i.imm]}]" if 0 <= i.imm < len(maps) else f"map[fd:{i.imm}]"
            return f"r{i.dst} = {ref}"
        return f"r{i.dst} = {i.imm64:#x}"
    if cls == Class.LD and i.mode == Mode.ABS:
        return f"r0 = *({size} *)skb[{i.imm}]"
    if cls == Class.LD and i.mode == Mode.IND:
        return f"r0 = *({size} *)skb[r{i.src} + {i.imm}]"
    if cls in (Class.JMP, Class.JMP32):
        return _jump(i)
    return f"invalid opcode {i.opcode:#04x}"


def _atomic(i: Insn, size: str) -> str:
    """The kernel names registers r<n> here whatever the operand size."""
    width = "64" if i.size == 8 else ""
    where = f"({size} *)(r{i.dst} {i.off:+d})"
    if i.imm == Atomic.CMPXCHG:
        return f"r0 = atomic{width}_cmpxchg({where}, r0, r{i.src})"
    if i.imm == Atomic.XCHG:
        return f"r{i.src} = atomic{width}_xchg({where}, r{i.src})"
    name = ATOMIC_NAMES.get(i.imm & ~Atomic.FETCH, "?")
    if i.imm & Atomic.FETCH:
        return f"r{i.src} = atomic{width}_fetch_{name}({where}, r{i.src})"
    return f"lock *{where} {ALU_OPS.get(i.imm, '?=')} r{i.src}"


def _jump(i: Insn) -> str:
    if i.op == Jmp.EXIT:
        return "exit"
    if i.op == Jmp.CALL:
        if i.src == PSEUDO_CALL:
            return f"call pc{i.imm:+d}"
        try:
            return f"call bpf_{Helper(i.imm).name}#{i.imm}"
        except ValueError:
            return f"call unknown#{i.imm}"
    if i.opcode == JA32:
        return f"gotol pc{i.imm:+d}"
    if i.op == Jmp.JA:
        return f"goto pc{i.off:+d}"
    wide = i.cls == Class.JMP
    src = _reg(i.src, wide) if i.source == Source.X else f"{i.imm & 0xFFFFFFFF:#x}"
    return f"if {_reg(i.dst, wide)} {JMP_OPS.get(i.op, '?')} {src} goto pc{i.off:+d}"
