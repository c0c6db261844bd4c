"""The vocabulary of generated code: how it spells a register at a width, an operand, a fault
and an ops template, and the globals it runs with. Code generation says what to compute; this
module is the one place that agrees with the namespace the generated code sees."""

from __future__ import annotations

import re
import struct
from typing import TYPE_CHECKING

from .. import ops
from ..errors import VmFault
from ..isa import U32, U64, Insn, Source
from ..memory import PACK, UNPACK
from ..runtime import (
    MAX_CALL_FRAMES,
    PacketExit,
    TailCall,
    call_helper,
    run_tail_calls,
    stack_top,
)

if TYPE_CHECKING:
    from ..program import Program

# LD_ABS reads network byte order (sizes 1, 2, 4: BPF_B, BPF_H, BPF_W).
BE_UNPACK = {size: struct.Struct(fmt).unpack_from for size, fmt in ((1, ">B"), (2, ">H"),
                                                                     (4, ">I"))}


def fault(message: str, pc: int) -> str:
    """A statement that stops the program with VmFault(message, pc)."""
    return f"raise VmFault({message!r}, {pc})"


def unknown_opcode(i: Insn, pc: int) -> str:
    return fault(f"unknown opcode {i.opcode:#04x}", pc)


def destination(i: Insn, wide: bool) -> str:
    """dst as an operation of this width reads it (ALU32 and JMP32 see the low 32 bits)."""
    return f"r{i.dst}" if wide else f"(r{i.dst} & {U32:#x})"


def operand(i: Insn, mask: int) -> str:
    """The source operand: src_reg truncated to the width, or imm as an unsigned constant."""
    if i.source == Source.X:
        return f"r{i.src}" if mask == U64 else f"(r{i.src} & {U32:#x})"
    return str(i.imm & mask)


def subst(expr: str, d: str, s: str) -> str:
    """Put operand source into an ops template (its variables are the single letters d, s)."""
    return re.sub(r"\b[ds]\b", lambda m: f"({d})" if m.group() == "d" else f"({s})", expr)


def namespace(prog: Program) -> dict[str, object]:
    """The globals of a program's generated module: every name the code above spells."""
    return dict(ops.NAMESPACE, VmFault=VmFault, PacketExit=PacketExit, TailCall=TailCall,
                call_helper=call_helper, stack_top=stack_top, MAX_FRAMES=MAX_CALL_FRAMES,
                run_tail_calls=run_tail_calls, prog=prog,
                **{f"unpack{size}": fn for size, fn in UNPACK.items()},
                **{f"pack{size}": fn for size, fn in PACK.items()},
                **{f"unpack_be{size}": fn for size, fn in BE_UNPACK.items()})
