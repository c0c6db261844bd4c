"""Reads the BPF conformance suite's `.data` test files (tests/vm/conformance/data, vendored from
github.com/Alan-Jowett/bpf_conformance): a port of its bpf_test_parser.cc and bpf_assembler.cc,
so the suite's programs can be run here without building the C++ runner.

A test file has sections `-- asm` (the suite's assembler syntax), `-- raw` (instructions as
64-bit numbers), `-- mem` (hex bytes), `-- result` (expected r0) and `-- error` (expected
message); `#` starts a comment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bpffs.vm.isa import (
    INSN,
    JA32,
    LD_IMM64,
    U32,
    Alu,
    Atomic,
    Class,
    Jmp,
    Mode,
    Size,
    Source,
)
from bpffs.vm.uapi import BPF_PSEUDO_CALL

DATA = Path(__file__).parent / "conformance" / "data"

ALU_OPS = {"add": Alu.ADD, "sub": Alu.SUB, "mul": Alu.MUL, "div": Alu.DIV, "sdiv": Alu.DIV,
           "or": Alu.OR, "and": Alu.AND, "lsh": Alu.LSH, "rsh": Alu.RSH, "neg": Alu.NEG,
           "mod": Alu.MOD, "smod": Alu.MOD, "xor": Alu.XOR, "mov": Alu.MOV, "movsx": Alu.MOV,
           "arsh": Alu.ARSH}
JMP_OPS = {"jeq": Jmp.JEQ, "jgt": Jmp.JGT, "jge": Jmp.JGE, "jset": Jmp.JSET, "jne": Jmp.JNE,
           "jsgt": Jmp.JSGT, "jsge": Jmp.JSGE, "jlt": Jmp.JLT, "jle": Jmp.JLE,
           "jslt": Jmp.JSLT, "jsle": Jmp.JSLE}
SIZES = {"b": Size.B, "h": Size.H, "w": Size.W, "dw": Size.DW}
ATOMIC_OPS = {"add": Atomic.ADD, "or": Atomic.OR, "and": Atomic.AND, "xor": Atomic.XOR,
              "xchg": Atomic.XCHG, "cmpxchg": Atomic.CMPXCHG}


@dataclass
class ConformanceTest:
    name: str
    program: bytes
    memory: bytes
    result: int | None
    error: str | None


def parse(path: Path) -> ConformanceTest:
    sections: dict[str, list[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].rstrip("\r")
        if "--" in line:
            current = next((name for name in ("asm", "result", "mem", "raw", "error")
                            if name in line), None)
            continue
        if line.strip() and current is not None:
            sections.setdefault(current, []).append(line)
    if "raw" in sections:
        program = b"".join(int(word, 0).to_bytes(8, "little")
                           for line in sections["raw"] for word in line.split())
    else:
        program = assemble(sections.get("asm", []))
    result = sections.get("result", [None])[-1]
    memory = bytes.fromhex("".join("".join(sections.get("mem", [])).split()))
    error = sections["error"][-1].strip() if "error" in sections else None
    return ConformanceTest(path.stem, program, memory,
                           int(result.strip(), 0) if result else None, error)


def _imm(text: str, bits: int = 32) -> int:
    value = int(text, 16) if "0x" in text else int(text)
    if "0x" in text:
        value -= (1 << bits) if value >> (bits - 1) else 0
    return value


def _reg(text: str) -> int:
    if not text.startswith("%r") or not 0 <= int(text[2:]) <= 15:
        raise ValueError(f"invalid register {text}")
    return int(text[2:])


def _mem_operand(text: str) -> tuple[int, int]:
    inner = text.strip("[]")
    for sign in "+-":
        if sign in inner:
            reg, off = inner.split(sign, 1)
            return _reg(reg), _imm(sign + off, 16)
    return _reg(inner), 0


def assemble(lines: list[str]) -> bytes:
    """The suite's assembler: a list of [opcode, dst, src, off, imm] slots, jumps to labels
    resolved at the end (the first `exit` is also the label `exit`)."""
    slots: list[list[int]] = []
    labels: dict[str, int] = {}
    fixups: list[tuple[int, str]] = []

    def target(text: str) -> int:
        if text[0] in "+-":
            return _imm(text, 16)
        fixups.append((len(slots), text))
        return 0

    for line in lines:
        words = [w.rstrip(",") for w in line.split()]
        mnemonic, ops = words[0], words[1:]
        if mnemonic.endswith(":"):
            labels[mnemonic[:-1]] = len(slots)
            continue
        if mnemonic == "exit":
            labels.setdefault("exit", len(slots))
            slots.append([Class.JMP | Jmp.EXIT, 0, 0, 0, 0])
        elif mnemonic == "lddw":
            value = int(ops[1], 0) & ((1 << 64) - 1)
            slots.append([LD_IMM64, _reg(ops[0]), 0, 0, _imm(hex(value & U32))])
            slots.append([0, 0, 0, 0, _imm(hex(value >> 32))])
        elif mnemonic.startswith("ldx"):
            src, off = _mem_operand(ops[1])
            signed = mnemonic[3:4] == "s" and mnemonic != "ldxdw"
            size = SIZES[mnemonic[4:] if signed else mnemonic[3:]]
            mode = Mode.MEMSX if signed else Mode.MEM
            slots.append([Class.LDX | size | mode, _reg(ops[0]), src, off, 0])
        elif mnemonic.startswith("stx"):
            dst, off = _mem_operand(ops[0])
            slots.append([Class.STX | SIZES[mnemonic[3:]] | Mode.MEM, dst, _reg(ops[1]), off, 0])
        elif mnemonic.startswith("st"):
            dst, off = _mem_operand(ops[0])
            slots.append([Class.ST | SIZES[mnemonic[2:]] | Mode.MEM, dst, 0, off, _imm(ops[1])])
        elif mnemonic == "lock":
            fetch = ops[0] == "fetch"
            name, mem, src = ops[1:] if fetch else ops
            size = Size.W if name.endswith("32") else Size.DW
            dst, off = _mem_operand(mem)
            imm = ATOMIC_OPS[name.removesuffix("32")] | (Atomic.FETCH if fetch else 0)
            slots.append([Class.STX | size | Mode.ATOMIC, dst, _reg(src), off, imm])
        elif mnemonic.startswith(("be", "le", "swap", "bswap")):
            width = int(mnemonic.lstrip("abelswp"))
            kind = mnemonic.rstrip("0123456789")
            cls = Class.ALU64 if kind in ("swap", "bswap") else Class.ALU
            source = Source.X if kind == "be" else Source.K
            slots.append([cls | Alu.END | source, _reg(ops[0]), 0, 0, width])
        elif mnemonic == "call":
            mode, text = ops if len(ops) == 2 else ("helper", ops[0])
            if mode == "local":
                slots.append([Class.JMP | Jmp.CALL, 0, BPF_PSEUDO_CALL, 0, target(text)])
            elif text.startswith("%"):  # callx: register in dst
                slots.append([Class.JMP | Jmp.CALL | Source.X, _reg(text), 0, 0, 0])
            else:
                slots.append([Class.JMP | Jmp.CALL, 0, 2 if mode == "runtime" else 0, 0,
                              _imm(text)])
        elif mnemonic == "ja":
            slots.append([Class.JMP | Jmp.JA, 0, 0, target(ops[0]), 0])
        elif mnemonic == "ja32":
            slots.append([JA32, 0, 0, 0, target(ops[0])])
        elif mnemonic.removesuffix("32") in JMP_OPS:
            cls = Class.JMP32 if mnemonic.endswith("32") else Class.JMP
            op = JMP_OPS[mnemonic.removesuffix("32")]
            reg = ops[1].startswith("%")
            slots.append([cls | op | (Source.X if reg else Source.K), _reg(ops[0]),
                          _reg(ops[1]) if reg else 0, target(ops[2]),
                          0 if reg else _imm(ops[1])])
        else:
            cls = Class.ALU if mnemonic.endswith("32") and not mnemonic.startswith("movsx") \
                else Class.ALU64
            name = mnemonic.removesuffix("32").removesuffix("64") \
                if not mnemonic.startswith("movsx") else "movsx"
            off = 1 if name in ("sdiv", "smod") else 0
            if name == "movsx":  # movsx{8,16,32}{32,64}
                off = int(mnemonic[5:-2])
                cls = Class.ALU if mnemonic.endswith("32") else Class.ALU64
            slot = [cls | ALU_OPS[name], _reg(ops[0]), 0, off, 0]
            if len(ops) == 2:
                if ops[1].startswith("%"):
                    slot[0] |= Source.X
                    slot[2] = _reg(ops[1])
                else:
                    slot[4] = _imm(ops[1])
            slots.append(slot)
    for index, label in fixups:
        distance = labels[label] - index - 1
        slot = slots[index]
        if slot[0] in (Class.JMP | Jmp.CALL, JA32):
            slot[4] = distance
        else:
            slot[3] = distance
    return b"".join(INSN.pack(op, dst | (src << 4), off, imm) for op, dst, src, off, imm
                    in slots)
