"""The eBPF instruction set: opcode fields, one table of every operation, and the decoder.

Numbers are those of include/uapi/linux/bpf.h, bpf_common.h and RFC 9669. An instruction is
8 bytes: opcode, dst_reg:4 | src_reg:4 (little endian: dst in the low nibble), off (s16),
imm (s32). LD_IMM64 takes two slots. The interpreter, compiler, verifier, disassembler and ELF
loader all import from here; nothing else spells an opcode number (tests/vm/test_opcode_numbers
checks it). What follows from an instruction's shape (its width, successors, jump target) is
in vm.insn.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

INSN_SIZE = 8
INSN = struct.Struct("<BBhi")
DST_MASK, SRC_SHIFT = 0x0F, 4  # the register byte: dst_reg in the low nibble, src_reg high

# Registers.
R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)
FRAME_POINTER = R10

# The fields of an opcode (masks over the whole byte).
CLASS_MASK = 0x07
SIZE_FIELD = 0x18
MODE_FIELD = 0xE0
OP_FIELD = 0xF0
SOURCE_FIELD = 0x08


class Class(IntEnum):
    """Low 3 bits of the opcode."""

    LD = 0x00
    LDX = 0x01
    ST = 0x02
    STX = 0x03
    ALU = 0x04
    JMP = 0x05
    JMP32 = 0x06
    ALU64 = 0x07


class Size(IntEnum):
    """Bits 3-4 of load/store opcodes."""

    W = 0x00
    H = 0x08
    B = 0x10
    DW = 0x18


SIZE_BYTES = {Size.B: 1, Size.H: 2, Size.W: 4, Size.DW: 8}


class Mode(IntEnum):
    """Bits 5-7 of load/store opcodes."""

    IMM = 0x00
    ABS = 0x20
    IND = 0x40
    MEM = 0x60
    MEMSX = 0x80  # sign-extending load (RFC 9669)
    ATOMIC = 0xC0  # XADD in 4.4


class Source(IntEnum):
    """Bit 3 of ALU/JMP opcodes: the operand is imm (K) or src_reg (X)."""

    K = 0x00
    X = 0x08


class Alu(IntEnum):
    """Bits 4-7 of ALU/ALU64 opcodes."""

    ADD = 0x00
    SUB = 0x10
    MUL = 0x20
    DIV = 0x30  # off=1: signed (SDIV)
    OR = 0x40
    AND = 0x50
    LSH = 0x60
    RSH = 0x70
    NEG = 0x80
    MOD = 0x90  # off=1: signed (SMOD)
    XOR = 0xA0
    MOV = 0xB0  # off=8/16/32: sign-extending move (MOVSX)
    ARSH = 0xC0
    END = 0xD0  # byte swap; in ALU: source bit selects to-le (K) / to-be (X); ALU64: bswap


class Jmp(IntEnum):
    """Bits 4-7 of JMP/JMP32 opcodes."""

    JA = 0x00
    JEQ = 0x10
    JGT = 0x20
    JGE = 0x30
    JSET = 0x40
    JNE = 0x50
    JSGT = 0x60
    JSGE = 0x70
    CALL = 0x80
    EXIT = 0x90
    JLT = 0xA0
    JLE = 0xB0
    JSLT = 0xC0
    JSLE = 0xD0


class Atomic(IntEnum):
    """imm of an ATOMIC store: the operation, optionally with FETCH."""

    ADD = 0x00
    OR = 0x40
    AND = 0x50
    XOR = 0xA0
    FETCH = 0x01
    XCHG = 0xE0 | 0x01
    CMPXCHG = 0xF0 | 0x01


ATOMIC_SIZES = (4, 8)  # BPF_W and BPF_DW: the only sizes of an atomic operation
ATOMIC_ALU_OPS = frozenset({Atomic.ADD, Atomic.OR, Atomic.AND, Atomic.XOR,
                            Atomic.ADD | Atomic.FETCH, Atomic.OR | Atomic.FETCH,
                            Atomic.AND | Atomic.FETCH, Atomic.XOR | Atomic.FETCH})


def atomic_alu_op(imm: int) -> int | None:
    """The ALU operation (Atomic.ADD, OR, AND or XOR) that an atomic store with this imm
    applies, with or without FETCH; None for XCHG, CMPXCHG and anything unknown."""
    return imm & ~Atomic.FETCH if imm in ATOMIC_ALU_OPS else None


# The opcodes of the 4.4 ISA (everything else is "newer than 4.4", verified with the same rules).
ISA_4_4_JMPS = frozenset({Jmp.JA, Jmp.JEQ, Jmp.JGT, Jmp.JGE, Jmp.JSET, Jmp.JNE, Jmp.JSGT,
                          Jmp.JSGE, Jmp.CALL, Jmp.EXIT})

# Well-known whole opcodes.
LD_IMM64 = Class.LD | Size.DW | Mode.IMM  # 0x18
CALL = Class.JMP | Jmp.CALL  # 0x85
EXIT = Class.JMP | Jmp.EXIT  # 0x95
JA = Class.JMP | Jmp.JA  # 0x05
JA32 = Class.JMP32 | Jmp.JA  # 0x06: gotol, 32-bit offset in imm
MOV64_X = Class.ALU64 | Alu.MOV | Source.X  # 0xbf: a 64-bit register copy (off=0)
# The pseudo source registers of LD_IMM64 and CALL are uapi numbers: vm.uapi.BPF_PSEUDO_*.

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1


@dataclass(frozen=True, slots=True)
class Insn:
    """One decoded instruction slot. For LD_IMM64, `imm64` holds the full 64-bit constant and
    the next slot (`opcode` 0) is its second half."""

    opcode: int
    dst: int
    src: int
    off: int
    imm: int
    imm64: int = 0

    @property
    def cls(self) -> int:
        return self.opcode & CLASS_MASK

    @property
    def size(self) -> int:
        """Bytes moved by a load/store."""
        return SIZE_BYTES[Size(self.opcode & SIZE_FIELD)]

    @property
    def mode(self) -> int:
        return self.opcode & MODE_FIELD

    @property
    def op(self) -> int:
        """ALU or JMP operation (bits 4-7)."""
        return self.opcode & OP_FIELD

    @property
    def source(self) -> int:
        return self.opcode & SOURCE_FIELD

    def encode(self) -> bytes:
        return INSN.pack(self.opcode, (self.src << SRC_SHIFT) | self.dst, self.off, self.imm)


def decode(code: bytes) -> list[Insn]:
    """Split bytecode into slots. LD_IMM64 fills imm64 from its two halves; its second slot is
    kept (as in the kernel, jump offsets count slots). Raises ValueError on a ragged length."""
    if len(code) % INSN_SIZE:
        raise ValueError(f"program length {len(code)} is not a multiple of {INSN_SIZE}")
    raw = [INSN.unpack_from(code, i) for i in range(0, len(code), INSN_SIZE)]
    out = []
    for i, (opcode, regs, off, imm) in enumerate(raw):
        imm64 = 0
        if opcode == LD_IMM64 and i + 1 < len(raw):
            imm64 = (imm & U32) | ((raw[i + 1][3] & U32) << 32)
        out.append(Insn(opcode, regs & DST_MASK, regs >> SRC_SHIFT, off, imm, imm64))
    return out


def encode(insns: list[Insn]) -> bytes:
    return b"".join(i.encode() for i in insns)
