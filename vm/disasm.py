"""Instructions as text, in the kernel's print_bpf_insn style (the verifier log and
`bpftool prog dump xlated`): `0: (b7) r0 = 0`, `5: (85) call bpf_map_lookup_elem#1`."""

from __future__ import annotations

from collections.abc import Sequence

from .insn import width
from .isa import (
    JA32,
    LD_IMM64,
    U32,
    Alu,
    Atomic,
    Class,
    Insn,
    Jmp,
    Mode,
    Source,
    decode,
)
from .uapi import BPF_PSEUDO_CALL, BPF_PSEUDO_MAP_FD, Helper

ALU_OPS = {Alu.ADD: "+=", Alu.SUB: "-=", Alu.MUL: "*=", Alu.DIV: "/=", Alu.OR: "|=",
           Alu.AND: "&=", Alu.LSH: "<<=", Alu.RSH: ">>=", Alu.MOD: "%=", Alu.XOR: "^=",
           Alu.MOV: "=", Alu.ARSH: "s>>="}
JMP_OPS = {Jmp.JEQ: "==", Jmp.JGT: ">", Jmp.JGE: ">=", Jmp.JSET: "&", Jmp.JNE: "!=",
           Jmp.JSGT: "s>", Jmp.JSGE: "s>=", Jmp.JLT: "<", Jmp.JLE: "<=", Jmp.JSLT: "s<",
           Jmp.JSLE: "s<="}
SIZE_NAMES = {1: "u8", 2: "u16", 4: "u32", 8: "u64"}
ATOMIC_NAMES = {Atomic.ADD: "add", Atomic.OR: "or", Atomic.AND: "and", Atomic.XOR: "xor"}


def format_insn(i: Insn, pc: int, maps: Sequence[int] = ()) -> str:
    return f"({i.opcode:02x}) {_text(i, maps)}"


def disassemble(insns: bytes, maps: Sequence[int] = ()) -> list[str]:
    """One line per instruction ("pc: (op) text"); `maps` are the ids of the program's maps,
    indexed by the map references of the xlated instructions."""
    decoded = decode(insns)
    out = []
    pc = 0
    while pc < len(decoded):
        out.append(f"{pc}: {format_insn(decoded[pc], pc, maps)}")
        pc += width(decoded[pc])
    return out


def _reg(n: int, wide: bool) -> str:
    return f"{'r' if wide else 'w'}{n}"


def _text(i: Insn, maps: Sequence[int]) -> str:
    if i.cls in (Class.ALU, Class.ALU64):
        return _alu(i)
    if i.cls in (Class.JMP, Class.JMP32):
        return _jump(i)
    return _memory(i, maps) or f"invalid opcode {i.opcode:#04x}"


def _alu(i: Insn) -> str:
    wide = i.cls == Class.ALU64
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


def _memory(i: Insn, maps: Sequence[int]) -> str | None:
    """Loads and stores (LD, LDX, ST, STX); None for an opcode of these classes that is none."""
    size = SIZE_NAMES.get(i.size, "?")
    if i.cls == Class.LDX:
        sign = "s" if i.mode == Mode.MEMSX else "u"
        return f"r{i.dst} = *({sign}{size[1:]} *)(r{i.src} {i.off:+d})"
    if i.cls == Class.ST:
        return f"*({size} *)(r{i.dst} {i.off:+d}) = {i.imm}"
    if i.cls == Class.STX:
        return _atomic(i, size) if i.mode == Mode.ATOMIC else \
            f"*({size} *)(r{i.dst} {i.off:+d}) = r{i.src}"
    return _ld(i, maps, size)


def _ld(i: Insn, maps: Sequence[int], size: str) -> str | None:
    """The LD class: a 64-bit constant or map reference, or a packet load."""
    if i.opcode == LD_IMM64:
        if i.src == BPF_PSEUDO_MAP_FD:
            ref = f"map[id:{maps[i.imm]}]" if 0 <= i.imm < len(maps) else f"map[fd:{i.imm}]"
            return f"r{i.dst} = {ref}"
        return f"r{i.dst} = {i.imm64:#x}"
    if i.mode == Mode.ABS:
        return f"r0 = *({size} *)skb[{i.imm}]"
    if i.mode == Mode.IND:
        return f"r0 = *({size} *)skb[r{i.src} + {i.imm}]"
    return None


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
        if i.src == BPF_PSEUDO_CALL:  # print_bpf_insn's test: any class's CALL (not is_local_call)
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
    src = _reg(i.src, wide) if i.source == Source.X else f"{i.imm & U32:#x}"
    return f"if {_reg(i.dst, wide)} {JMP_OPS.get(i.op, '?')} {src} goto pc{i.off:+d}"
