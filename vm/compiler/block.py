"""One basic block as straight-line Python: its budget charge, each instruction, and the
jump, exit or fall-through that ends it. The block keeps the lazy-masking invariant
(vm.compiler.masking) and the set of registers holding the context's address."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..insn import ends_block, width
from ..isa import CALL, EXIT, LD_IMM64, U32, U64, Class, Insn, Mode
from ..runtime import block_cost
from .access import context_access, load_source, packet_load, stack_access, store_source
from .alu import alu_source, zero_extends
from .control import FELL_OFF, call_source, jump_source
from .emit import fault, unknown_opcode
from .masking import EXACT, Widths, lazy_alu64
from .registers import copied_register, exact_reads, writes


@dataclass(frozen=True)
class Function:
    """The bpf function a block belongs to."""

    insns: list[Insn]
    code: range  # its insns [start, end)
    fixed_stack: bool  # r10 is never written: r10 + k is a fixed offset into `stack`


@dataclass
class Block:
    """The source of one block, and whether it reads the context buffer directly."""

    lines: list[str] = field(default_factory=list)
    uses_ctx: bool = False


def block_source(function: Function, start: int, stop: int, ctx_regs: frozenset[int]
                 ) -> Block:
    """Source of the block [start, stop); ctx_regs hold the context's address on entry."""
    return _BlockWriter(function, start, ctx_regs).write(stop)


def _ld(i: Insn, pc: int) -> list[str] | None:
    """The LD class: a 64-bit constant (LD_IMM64) or a packet load (LD_ABS, LD_IND)."""
    if i.opcode == LD_IMM64:
        return [f"r{i.dst} = {i.imm64}"]
    return packet_load(i) if i.mode in (Mode.ABS, Mode.IND) else None


# Every instruction that neither ends a block nor has a faster form, by class; None where the
# VM knows no such instruction.
_BY_CLASS: dict[int, Callable[[Insn, int], list[str] | None]] = {
    Class.ALU: lambda i, pc: [alu_source(i, pc)],
    Class.ALU64: lambda i, pc: [alu_source(i, pc)],
    Class.LDX: load_source,
    Class.ST: store_source,
    Class.STX: store_source,
    Class.LD: _ld,
    Class.JMP: lambda i, pc: call_source(i, pc) if i.opcode == CALL else None,
}


def instruction_source(i: Insn, pc: int) -> list[str]:
    """The statements of one instruction through Memory and the helper table."""
    emit = _BY_CLASS.get(i.cls)
    lines = emit(i, pc) if emit else None
    return lines if lines is not None else [unknown_opcode(i, pc)]


class _BlockWriter:
    """Emits a block instruction by instruction, tracking the registers left unmasked
    (`widths`) and those holding the context's address (`ctx_regs`)."""

    def __init__(self, function: Function, start: int, ctx_regs: frozenset[int]):
        self.function = function
        self.start = start
        self.widths: Widths = {}
        self.ctx_regs = set(ctx_regs)
        self.block = Block()

    def write(self, stop: int) -> Block:
        insns, lines = self.function.insns, self.block.lines
        exhausted = fault("instruction budget exhausted", self.start)
        lines += [f"budget -= {block_cost(insns, self.start, stop)}",
                  f"if budget < 0: run.budget = budget; {exhausted}"]
        pc = self.start
        while pc < stop:
            i = insns[pc]
            if pc + 1 < stop and zero_extends(i, insns[pc + 1]):
                self._zero_extend(i.dst)
                pc += 2
                continue
            if ends_block(i):
                self._mask([0] if i.opcode == EXIT else list(self.widths))  # exit reads r0
                lines += jump_source(insns, self.function.code, i, pc, self.start)
                return self.block
            self._instruction(i, pc)
            pc += width(i)
        self._mask(list(self.widths))
        lines.append(fault(FELL_OFF, stop - 1) if stop >= self.function.code.stop else
                     f"L = {stop}")
        return self.block

    def _instruction(self, i: Insn, pc: int) -> None:
        copies_ctx = copied_register(i) in self.ctx_regs
        lazy = lazy_alu64(i, self.widths)
        if lazy is not None:
            line, self.widths[i.dst] = lazy
            self.block.lines.append(line)
        else:
            self._mask(exact_reads(i))
            self.block.lines += self._direct_access(i) or instruction_source(i, pc)
            for reg in writes(i):
                self.widths.pop(reg, None)
        self.ctx_regs.difference_update(writes(i))
        if copies_ctx:
            self.ctx_regs.add(i.dst)

    def _direct_access(self, i: Insn) -> list[str]:
        """The access as struct on the stack or context buffer, or [] (through Memory)."""
        direct = stack_access(i, self.widths) if self.function.fixed_stack else None
        if direct is None:
            direct = context_access(i, self.ctx_regs, self.widths)
            self.block.uses_ctx |= direct is not None
        return [direct] if direct else []

    def _zero_extend(self, reg: int) -> None:
        self.block.lines.append(f"r{reg} &= {U32:#x}")
        self.widths[reg] = (32, False)
        self.ctx_regs.discard(reg)

    def _mask(self, regs: Iterable[int]) -> None:
        """Make these registers exact again where they may not be."""
        for reg in sorted(regs):
            bits, negative = self.widths.get(reg, EXACT)
            if bits > 64 or negative:
                self.block.lines.append(f"r{reg} &= {U64:#x}")
                self.widths.pop(reg)
