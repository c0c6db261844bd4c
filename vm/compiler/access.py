"""Loads, stores, atomics and packet loads. Accesses at r10 + constant (when r10 is never
written) and at the context pointer + constant go straight to the frame's stack or the
context buffer with struct; everything else goes through the run's Memory, which checks
every address and faults."""

from __future__ import annotations

from .. import ops
from ..isa import (
    ATOMIC_SIZES,
    FRAME_POINTER,
    U32,
    U64,
    Atomic,
    Class,
    Insn,
    Mode,
    atomic_alu_op,
)
from ..uapi import MAX_BPF_STACK
from .emit import BE_UNPACK, fault, subst
from .masking import Widths, stored_value


def _base(i: Insn) -> int:
    """The register holding the address: src for a load, dst for a store."""
    return i.src if i.cls == Class.LDX else i.dst


def _load_from(buffer: str, off: int, i: Insn) -> str | None:
    if i.mode == Mode.MEM:
        return f"r{i.dst} = unpack{i.size}({buffer}, {off})[0]"
    if i.mode == Mode.MEMSX:
        return f"r{i.dst} = sx(unpack{i.size}({buffer}, {off})[0], {i.size * 8}) & {U64:#x}"
    return None


def stack_access(i: Insn, widths: Widths) -> str | None:
    """A load or store at r10 + constant as direct struct access to the frame's stack, or
    None (other instructions, and accesses outside the stack, which fault through Memory)."""
    if _base(i) != FRAME_POINTER or i.cls not in (Class.LDX, Class.ST, Class.STX):
        return None
    off = MAX_BPF_STACK + i.off
    if off < 0 or off + i.size > MAX_BPF_STACK:
        return None
    if i.cls == Class.LDX:
        return _load_from("stack", off, i)
    if i.mode == Mode.MEM:
        return f"pack{i.size}(stack, {off}, {stored_value(i, widths)})"
    return None


def context_access(i: Insn, ctx_regs: set[int], widths: Widths) -> str | None:
    """A load or store at (a copy of) the context pointer + constant, straight to the
    context buffer when it is in bounds; otherwise Memory's load or store, which faults."""
    if i.cls not in (Class.LDX, Class.ST, Class.STX) or i.mode != Mode.MEM or i.off < 0:
        return None
    base = _base(i)
    if base not in ctx_regs:
        return None
    inside = f"ctx_size >= {i.off + i.size}"
    addr = f"r{base} + {i.off}"  # exact: the context's address plus a small offset
    if i.cls == Class.LDX:
        return f"{_load_from('ctx', i.off, i)} if {inside} else mem.load({addr}, {i.size})"
    value = stored_value(i, widths)
    return f"pack{i.size}(ctx, {i.off}, {value}) if {inside} else" \
           f" mem.store({addr}, {i.size}, {value})"


def load_source(i: Insn, pc: int) -> list[str] | None:
    """LDX through Memory (None: not a load the VM knows)."""
    if i.mode not in (Mode.MEM, Mode.MEMSX):
        return None
    value = f"load((r{i.src} + {i.off}) & {U64:#x}, {i.size})"
    if i.mode == Mode.MEMSX:
        value = f"sx({value}, {i.size * 8}) & {U64:#x}"
    return [f"r{i.dst} = {value}"]


def store_source(i: Insn, pc: int) -> list[str] | None:
    """ST, STX and atomics through Memory (None: not a store the VM knows)."""
    addr = f"(r{i.dst} + {i.off}) & {U64:#x}"
    if i.mode == Mode.MEM:
        value = i.imm if i.cls == Class.ST else f"r{i.src}"
        return [f"store({addr}, {i.size}, {value})"]
    if i.cls == Class.STX and i.mode == Mode.ATOMIC and i.size in ATOMIC_SIZES:
        return _atomic(i, pc, addr)
    return None


def _atomic(i: Insn, pc: int, addr: str) -> list[str]:
    mask = U64 if i.size == 8 else U32
    src = f"(r{i.src} & {mask:#x})"
    lines = [f"a = {addr}", f"old = load(a, {i.size})"]
    op = i.imm
    if op == Atomic.CMPXCHG:
        return [*lines, f"if (r0 & {mask:#x}) == old: store(a, {i.size}, {src})", "r0 = old"]
    if op == Atomic.XCHG:
        return [*lines, f"store(a, {i.size}, {src})", f"r{i.src} = old"]
    alu_op = atomic_alu_op(op)
    if alu_op is None:
        return [fault(f"unknown atomic operation {op:#x}", pc)]
    lines.append(f"store(a, {i.size}, ({subst(ops.ALU64[alu_op, 0], 'old', src)}) & {mask:#x})")
    if op & Atomic.FETCH:
        lines.append(f"r{i.src} = old")
    return lines


def packet_load(i: Insn) -> list[str]:
    """LD_ABS and LD_IND: r0 = big-endian data of the packet; beyond it the program ends."""
    if i.mode == Mode.ABS and i.imm >= 0 and i.size in BE_UNPACK:
        # SkBuff.load for an offset into the data, inline: the packet from the skb each time
        # (a helper may have changed it); no skb or beyond the packet ends the program.
        return ["skb = run.skb",
                f"if skb is None or skb.data_start + {i.imm + i.size} > len(skb.current):"
                " raise PacketExit",
                f"r0 = unpack_be{i.size}(skb.current, skb.data_start + {i.imm})[0]"]
    off = str(i.imm) if i.mode == Mode.ABS else f"sx((r{i.src} + {i.imm}) & {U32:#x}, 32)"
    return [f"r0 = run.load_packet({off}, {i.size})",
            "if r0 is None: raise PacketExit"]
