"""Lazy masking: which results may stay unmasked, and for how long.

Masking is the largest cost of straight-line code, so blocks mask lazily. Python ints are
unbounded two's complement, and ADD, SUB, MUL, LSH, AND, OR, XOR commute with reduction
modulo 2**64: their results may stay unmasked (congruent to the exact value) until an
instruction needs the exact value (a comparison, a right shift, a division, a helper
argument, the end of the block). The compiler tracks a bound on each unmasked register's
size and whether it may be negative, and masks once a value would outgrow LAZY_BITS (big
ints get slower with size) -- negative values are avoided where it costs nothing, because
CPython's bitwise operations on negative ints take a slow path.

The invariant every block keeps: a register absent from its `Widths` holds its exact value
(0 <= value < 2**64); one present holds a value congruent to it, within the recorded bound.
"""

from __future__ import annotations

from collections.abc import Callable

from ..isa import U64, Alu, Class, Insn, Source
from ..memory import SIZE_MASK

Width = tuple[int, bool]  # (bound on the bit length of |value|, may be negative)
Widths = dict[int, Width]  # registers known narrower than EXACT, or unmasked
EXACT: Width = (64, False)
LAZY_BITS = 128


def _sum(d: Width, s: Width, op: int) -> Width:
    return max(d[0], s[0]) + 1, d[1] or s[1] or op == Alu.SUB


def _bitwise(d: Width, s: Width, op: int) -> Width:
    return max(d[0], s[0]), d[1] or s[1]


def _and(d: Width, s: Width, op: int) -> Width:
    """A non-negative operand bounds the result."""
    bounds = [bits for bits, negative in (d, s) if not negative]
    return (min(bounds), False) if bounds else (max(d[0], s[0]), True)


def _product(d: Width, s: Width, op: int) -> Width:
    return d[0] + s[0], d[1] or s[1]


# ALU64 operations that may leave their result unmasked: the width of the result, the symbol.
_RESULT: dict[int, tuple[Callable[[Width, Width, int], Width], str]] = {
    Alu.ADD: (_sum, "+"), Alu.SUB: (_sum, "-"), Alu.XOR: (_bitwise, "^"),
    Alu.OR: (_bitwise, "|"), Alu.AND: (_and, "&"), Alu.MUL: (_product, "*"),
}


def lazy_alu64(i: Insn, widths: Widths) -> tuple[str, Width] | None:
    """An ALU64 op emitted without a mask: its source line and the width of the result."""
    if i.cls != Class.ALU64 or i.off:
        return None
    dst, op = f"r{i.dst}", i.op
    d = widths.get(i.dst, EXACT)
    if i.source == Source.K and op == Alu.SUB:
        value = -i.imm & U64  # d - k == d + (2**64 - k) mod 2**64, and stays non-negative
        return f"{dst} += {value}", (max(d[0], value.bit_length()) + 1, d[1])
    s, s_width = _source(i, widths)
    if op == Alu.MOV:
        return f"{dst} = {s}", s_width
    if op == Alu.LSH and i.source == Source.K:
        count = i.imm & 63
        result, s, symbol = (d[0] + count, d[1]), str(count), "<<"
    elif op in _RESULT:
        rule, symbol = _RESULT[op]
        result = rule(d, s_width, op)
    else:
        return None
    if result[0] > LAZY_BITS:
        return None
    return f"{dst} {symbol}= {s}", result


def _source(i: Insn, widths: Widths) -> tuple[str, Width]:
    if i.source == Source.X:
        return f"r{i.src}", widths.get(i.src, EXACT)
    value = i.imm & U64
    return str(value), (value.bit_length(), False)


def stored_value(i: Insn, widths: Widths) -> str:
    """What a store of size i.size writes: imm (ST) or src_reg (STX), masked to the size
    unless the register is known to fit."""
    mask = SIZE_MASK[i.size]
    if i.cls == Class.ST:
        return str(i.imm & mask)
    bits, negative = widths.get(i.src, EXACT)
    return f"r{i.src}" if bits <= i.size * 8 and not negative else f"r{i.src} & {mask:#x}"
