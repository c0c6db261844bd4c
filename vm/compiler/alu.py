"""ALU and ALU64 instructions as one Python statement each, masked to their width: the
operation comes from the vm.ops templates the interpreter evaluates too."""

from __future__ import annotations

from .. import ops
from ..isa import U32, U64, Alu, Class, Insn, Source
from .emit import destination, fault, operand, subst

BYTE_SWAP_WIDTHS = (16, 32, 64)


def alu_source(i: Insn, pc: int) -> str:
    """The statement for an ALU or ALU64 instruction that is not emitted lazily."""
    alu64 = i.cls == Class.ALU64
    if i.op == Alu.END:
        return _byte_swap(i, pc, alu64)
    if alu64 and i.source == Source.K and i.op in (Alu.LSH, Alu.RSH):
        return _constant_shift(i)
    mask = U64 if alu64 else U32
    variant = i.off if i.op in (Alu.DIV, Alu.MOD, Alu.MOV) else 0
    expr = (ops.ALU64 if alu64 else ops.ALU32).get((i.op, variant))
    if expr is None:
        return fault(f"unknown ALU operation {i.opcode:#04x} off={i.off}", pc)
    return f"r{i.dst} = ({subst(expr, destination(i, alu64), operand(i, mask))}) & {mask:#x}"


def _byte_swap(i: Insn, pc: int, alu64: bool) -> str:
    if i.imm not in BYTE_SWAP_WIDTHS:
        return fault(f"invalid byte swap width {i.imm}", pc)
    expr = ops.end_expr(alu64, i.source == Source.X, i.imm)  # on the whole register
    return f"r{i.dst} = ({subst(expr, f'r{i.dst}', '0')}) & {U64:#x}"


def _constant_shift(i: Insn) -> str:
    """A 64-bit shift by a constant: the count folded; a right shift needs no mask."""
    count = i.imm & 63
    if i.op == Alu.RSH:
        return f"r{i.dst} = r{i.dst} >> {count}"
    return f"r{i.dst} = (r{i.dst} << {count}) & {U64:#x}"


def zero_extends(i: Insn, following: Insn) -> bool:
    """`r <<= 32; r >>= 32` (clang's cast of a 64-bit register to u32): one mask."""
    lsh, rsh = Class.ALU64 | Alu.LSH | Source.K, Class.ALU64 | Alu.RSH | Source.K
    return (i.opcode == lsh and following.opcode == rsh and i.dst == following.dst
            and i.imm == following.imm == 32 and not i.off and not following.off)
