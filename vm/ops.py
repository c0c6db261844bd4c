"""The meaning of every ALU and JMP operation, written once as Python expressions.

Both tiers are built from these templates: the compiler pastes them into generated source, the
interpreter evaluates them as small functions. So the two tiers cannot disagree on an
operation. In an expression `d` is the destination and `s` the source operand, both already
truncated to the operation's width (u64, or u32 for ALU/JMP32); the result is masked by the
caller. Division and modulo by zero follow the kernel (div -> 0, mod -> dst unchanged);
shift counts are masked to the width as the kernel's interpreter and JITs do.
"""

from __future__ import annotations

from collections.abc import Callable

from .isa import U32, U64, Alu, Jmp


def sdiv(d: int, s: int, bits: int) -> int:
    """Signed division truncating toward zero (C); by zero gives 0; INT_MIN / -1 wraps."""
    a, b = _signed(d, bits), _signed(s, bits)
    if b == 0:
        return 0
    q = abs(a) // abs(b)
    return -q if (a < 0) != (b < 0) else q


def smod(d: int, s: int, bits: int) -> int:
    """Signed modulo with the sign of the dividend (C); by zero leaves the dividend."""
    a, b = _signed(d, bits), _signed(s, bits)
    if b == 0:
        return d
    r = abs(a) % abs(b)
    return -r if a < 0 else r


def sx(value: int, bits: int) -> int:
    """Sign-extend the low `bits` of value (result may be negative; callers mask)."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _signed(value: int, bits: int) -> int:
    return sx(value, bits)


def bswap(value: int, bits: int) -> int:
    return int.from_bytes((value & ((1 << bits) - 1)).to_bytes(bits // 8, "little"), "big")


# (operation, signed variant?) -> expression at 64 bits and at 32 bits.
ALU64: dict[tuple[int, int], str] = {
    (Alu.ADD, 0): "d + s",
    (Alu.SUB, 0): "d - s",
    (Alu.MUL, 0): "d * s",
    (Alu.DIV, 0): "(d // s if s else 0)",
    (Alu.DIV, 1): "sdiv(d, s, 64)",
    (Alu.OR, 0): "d | s",
    (Alu.AND, 0): "d & s",
    (Alu.LSH, 0): "d << (s & 63)",
    (Alu.RSH, 0): "d >> (s & 63)",
    (Alu.NEG, 0): "-d",
    (Alu.MOD, 0): "(d % s if s else d)",
    (Alu.MOD, 1): "smod(d, s, 64)",
    (Alu.XOR, 0): "d ^ s",
    (Alu.MOV, 0): "s",
    (Alu.MOV, 8): "sx(s, 8)",
    (Alu.MOV, 16): "sx(s, 16)",
    (Alu.MOV, 32): "sx(s, 32)",
    (Alu.ARSH, 0): "sx(d, 64) >> (s & 63)",
}
ALU32: dict[tuple[int, int], str] = {
    (Alu.ADD, 0): "d + s",
    (Alu.SUB, 0): "d - s",
    (Alu.MUL, 0): "d * s",
    (Alu.DIV, 0): "(d // s if s else 0)",
    (Alu.DIV, 1): "sdiv(d, s, 32)",
    (Alu.OR, 0): "d | s",
    (Alu.AND, 0): "d & s",
    (Alu.LSH, 0): "d << (s & 31)",
    (Alu.RSH, 0): "d >> (s & 31)",
    (Alu.NEG, 0): "-d",
    (Alu.MOD, 0): "(d % s if s else d)",
    (Alu.MOD, 1): "smod(d, s, 32)",
    (Alu.XOR, 0): "d ^ s",
    (Alu.MOV, 0): "s",
    (Alu.MOV, 8): "sx(s, 8)",
    (Alu.MOV, 16): "sx(s, 16)",
    (Alu.ARSH, 0): "sx(d, 32) >> (s & 31)",
}

def end_expr(alu64: bool, to_be: bool, bits: int) -> str:
    """Byte-order conversion of d to `bits`: BPF is little endian, so "to little endian"
    truncates, "to big endian" (and ALU64's unconditional bswap) swaps."""
    if alu64 or to_be:
        return f"bswap(d, {bits})"
    return f"d & {(1 << bits) - 1:#x}"


# Jump conditions: operation -> expression over d, s (unsigned, truncated to the width), with
# `bits` for the signed comparisons.
JMP: dict[int, str] = {
    Jmp.JEQ: "d == s",
    Jmp.JNE: "d != s",
    Jmp.JGT: "d > s",
    Jmp.JGE: "d >= s",
    Jmp.JLT: "d < s",
    Jmp.JLE: "d <= s",
    Jmp.JSET: "d & s",
    Jmp.JSGT: "sx(d, {bits}) > sx(s, {bits})",
    Jmp.JSGE: "sx(d, {bits}) >= sx(s, {bits})",
    Jmp.JSLT: "sx(d, {bits}) < sx(s, {bits})",
    Jmp.JSLE: "sx(d, {bits}) <= sx(s, {bits})",
}

# Names the expressions use; the compiler puts them in the generated module's globals.
NAMESPACE: dict[str, object] = {"sdiv": sdiv, "smod": smod, "sx": sx, "bswap": bswap,
                                "U64": U64, "U32": U32}


def as_function(expr: str) -> Callable[[int, int], int]:
    """An expression as a two-argument function (the interpreter's form of the table)."""
    return eval(f"lambda d, s: {expr}", dict(NAMESPACE))


ALU64_FN = {key: as_function(e) for key, e in ALU64.items()}
ALU32_FN = {key: as_function(e) for key, e in ALU32.items()}
JMP64_FN = {op: as_function(e.format(bits=64)) for op, e in JMP.items()}
JMP32_FN = {op: as_function(e.format(bits=32)) for op, e in JMP.items()}
END_FN = {(alu64, to_be, bits): as_function(end_expr(alu64, to_be, bits))
          for alu64 in (False, True) for to_be in (False, True) for bits in (16, 32, 64)}
