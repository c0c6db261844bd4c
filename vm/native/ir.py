"""eBPF to LLVM IR, one LLVM function per bpf function, following the reference interpreter
instruction by instruction so that the native tier ends where it ends, with the same result.

A native function is everything its frame can execute: the instructions reachable from its
entry by fall-through and jumps (not into callees). It is cut into blocks at jump targets and
at every insn the interpreter charges budget at (Program.block_costs), so a budget runs out at
the same insn on every tier. Registers are stack slots that LLVM promotes to SSA values; the
region table, its length and the budget are kept in slots too and written back to the
context (abi) around every call out. Everything that ends a run early sets a status in the
context and returns, all the way up; Python raises the exception (vm.native.glue).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from llvmlite import ir

from .. import ops
from ..compiler.alu import BYTE_SWAP_WIDTHS
from ..compiler.control import FELL_OFF
from ..compiler.registers import writes
from ..insn import call_target, is_local_call, jump_target, successors, width
from ..isa import (
    ATOMIC_SIZES,
    CALL,
    CLASS_MASK,
    EXIT,
    FRAME_POINTER,
    JA,
    JA32,
    LD_IMM64,
    R0,
    U32,
    U64,
    Alu,
    Atomic,
    Class,
    Insn,
    Jmp,
    Mode,
    Source,
    atomic_alu_op,
)
from ..memory import OFFSET_MASK, REGION_SHIFT, STACK_FRAME_REGIONS, STACK_REGION, map_handle
from ..run import REDIRECT_INGRESS_SHIFT, REDIRECT_SET
from ..runtime import MAX_CALL_FRAMES
from ..uapi import BPF_F_INGRESS, MAX_BPF_STACK, Helper, TcAct
from .abi import ENTRY_SHIFT, READ_WRITE, Entry, Field, Status
from .driver import write_driver, write_repeat
from .maps import NATIVE_HELPERS, MapHelpers, MapInfo

I1, I8, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(32), ir.IntType(64)
PTR = ir.PointerType()
VOID = ir.VoidType()
NUM_REGS = 11
# The Python functions native code calls (vm.native.glue registers them under these names).
HELPER = "bpffs_native_helper"  # (ctx, helper id, r1..r5, pc) -> r0
PACKET = "bpffs_native_packet"  # (ctx, offset, size) -> value (LD_ABS, LD_IND)
FRAME = "bpffs_native_frame"  # (ctx, depth) -> frame pointer of a freshly mapped stack
TAIL = "bpffs_native_tail"  # (ctx, depth) -> r0 of the tail calls a callee made
CALLBACK_TYPES = {
    HELPER: ir.FunctionType(I64, [PTR, I64, I64, I64, I64, I64, I64, I64]),
    PACKET: ir.FunctionType(I64, [PTR, I64, I64]),
    FRAME: ir.FunctionType(I64, [PTR, I64]),
    TAIL: ir.FunctionType(I64, [PTR, I64]),
}
# A bpf function: (ctx, r1, ..., r5, depth) -> r0; on an early end, 0 with a status set.
FUNCTION_TYPE = ir.FunctionType(I64, [PTR, I64, I64, I64, I64, I64, I64])
ENTRY_NAME = "bpf_entry"  # (ctx) -> r0: bpf_0 with its arguments from the context
ENTRY_TYPE = ir.FunctionType(I64, [PTR])
LIKELY = (2000, 1)  # branch weights of a check that passes


def likely(branch: ir.CBranch) -> None:
    """Mark the first target of a conditional branch the likely one (one metadata node per
    module: llvmlite's set_weights makes and looks up a new one each time)."""
    module = branch.module
    node = getattr(module, "_bpffs_likely", None)
    if node is None:
        node = module._bpffs_likely = module.add_metadata(
            [ir.MetaDataString(module, "branch_weights"), *(ir.Constant(I32, w)
                                                            for w in LIKELY)])
    branch.set_metadata("prof", node)
_ATOMIC_RMW = {Alu.ADD: "add", Alu.OR: "or", Alu.AND: "and", Alu.XOR: "xor"}


def function_name(entry: int) -> str:
    return f"bpf_{entry}"


@dataclass
class Translation:
    """The IR of a program and the faults its code may raise (Status.FAULT: INFO indexes
    `faults`)."""

    ir: str
    faults: list[tuple[str, int]] = field(default_factory=list)
    uses_packet: bool = False  # LD_ABS/LD_IND read the packet fields of the context


def translate(insns: list[Insn], costs: dict[int, int], stackless: frozenset[int],
              triple: str = "", layout: str = "", maps: list[MapInfo | None] | None = None
              ) -> Translation:
    """The module of a program: `costs` are Program.block_costs, `stackless` the entries of
    functions that run without a stack (Program.stackless_functions), `maps` the program's
    maps whose helpers run natively (vm.native.maps; None for the others)."""
    module = ir.Module(name="bpf")
    module.triple, module.data_layout = triple, layout
    faults: dict[tuple[str, int], int] = {}
    entries = _functions(insns)
    functions = {}
    for entry in entries:
        fn = ir.Function(module, FUNCTION_TYPE, function_name(entry))
        fn.linkage = "internal"
        functions[entry] = fn
    callbacks = {name: ir.Function(module, ty, name) for name, ty in CALLBACK_TYPES.items()}
    intrinsics = _Intrinsics(module)
    for entry in entries:
        _FunctionWriter(insns, costs, entry, entry not in stackless, functions, callbacks,
                        intrinsics, faults, maps or []).write()
    _entry(module, functions[0])
    write_driver(module, functions[0], intrinsics.memset)
    write_repeat(module, functions[0], intrinsics.memset)
    uses_packet = any(i.cls == Class.LD and i.mode in (Mode.ABS, Mode.IND) for i in insns)
    return Translation(str(module), [key for key, _ in sorted(faults.items(),
                                                              key=lambda kv: kv[1])],
                       uses_packet)


def _entry(module: ir.Module, main: ir.Function) -> None:
    """bpf_entry(ctx): main(ctx, r1, r2, 0, 0, 0, depth) with those read from the context."""
    fn = ir.Function(module, ENTRY_TYPE, ENTRY_NAME)
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    ctx = fn.args[0]

    def arg(f: Field) -> ir.Value:
        return b.load(b.gep(ctx, [ir.Constant(I64, f)], source_etype=I64), typ=I64)

    zero = ir.Constant(I64, 0)
    b.ret(b.call(main, [ctx, arg(Field.ARG_R1), arg(Field.ARG_R2), zero, zero, zero,
                        arg(Field.ARG_DEPTH)]))


def _functions(insns: list[Insn]) -> list[int]:
    """Entry insns of the bpf functions: insn 0 and every call target inside the program."""
    return sorted({0} | {call_target(i, pc) for pc, i in enumerate(insns)
                         if is_local_call(i) and 0 <= call_target(i, pc) < len(insns)})


def reachable(insns: list[Insn], entry: int) -> set[int]:
    """Insns a frame entered at `entry` may execute (out-of-range ones included: they
    fault), following fall-through and jumps as the interpreter does."""
    seen: set[int] = set()
    work = [entry]
    while work:
        pc = work.pop()
        if pc in seen:
            continue
        seen.add(pc)
        if 0 <= pc < len(insns):
            work.extend(successors(insns, pc))
    return seen


class _Intrinsics:
    def __init__(self, module: ir.Module):
        self.memset = ir.Function(module, ir.FunctionType(VOID, [PTR, I8, I64, I1]),
                                  "llvm.memset.p0.i64")
        self.bswap = {bits: ir.Function(module, ir.FunctionType(ir.IntType(bits),
                                                                [ir.IntType(bits)]),
                                        f"llvm.bswap.i{bits}") for bits in BYTE_SWAP_WIDTHS}


# Conditions of JMP/JMP32 by operation: (signed comparison?, icmp predicate); JSET apart.
_COMPARE = {Jmp.JEQ: (False, "=="), Jmp.JNE: (False, "!="), Jmp.JGT: (False, ">"),
            Jmp.JGE: (False, ">="), Jmp.JLT: (False, "<"), Jmp.JLE: (False, "<="),
            Jmp.JSGT: (True, ">"), Jmp.JSGE: (True, ">="), Jmp.JSLT: (True, "<"),
            Jmp.JSLE: (True, "<=")}


class _FunctionWriter:
    """Writes the body of one bpf function."""

    def __init__(self, insns: list[Insn], costs: dict[int, int], entry: int, uses_stack: bool,
                 functions: dict[int, ir.Function], callbacks: dict[str, ir.Function],
                 intrinsics: _Intrinsics, faults: dict[tuple[str, int], int],
                 maps: list[MapInfo | None]):
        self.insns, self.costs, self.entry = insns, costs, entry
        self.maps = maps
        self.functions, self.callbacks, self.intrinsics = functions, callbacks, intrinsics
        self.faults = faults
        self.fn = functions[entry]
        self.ctx = self.fn.args[0]
        self.depth = self.fn.args[6]
        self.code = reachable(insns, entry)
        self.uses_stack = uses_stack
        # r10 is never written: r10 + k is a fixed offset into this frame's stack.
        self.fixed_stack = uses_stack and not any(
            FRAME_POINTER in writes(insns[pc]) for pc in self.code if 0 <= pc < len(insns))
        self.b = ir.IRBuilder(self.fn.append_basic_block("entry"))

    # -- the context and the slots -------------------------------------------------------
    def _field(self, f: Field) -> ir.Value:
        return self.b.gep(self.ctx, [ir.Constant(I64, f)], source_etype=I64)

    def _load_field(self, f: Field) -> ir.Value:
        return self.b.load(self._field(f), typ=I64)

    def _store_field(self, f: Field, value: ir.Value | int) -> None:
        self.b.store(value if isinstance(value, ir.Value) else ir.Constant(I64, value),
                     self._field(f))

    def reg(self, n: int) -> ir.Value:
        """Register n: the value this block last gave it, else a load of its slot. (Less IR
        to build and to parse: LLVM would remove the load anyway.)"""
        value = self.known.get(n)
        return value if value is not None else self.b.load(self.regs[n], typ=I64)

    def set_reg(self, n: int, value: ir.Value) -> None:
        """Always at an insn's top level, never in one arm of a split that merges again,
        so the value dominates the rest of the bpf block (where `known` serves it)."""
        self.b.store(value, self.regs[n])
        self.known[n] = value

    def reload(self) -> None:
        """After a call out: the table may have moved, the budget changed, the stack too."""
        b = self.b
        b.store(b.load(self._field(Field.TABLE), typ=PTR), self.table)
        b.store(self._load_field(Field.TABLE_LEN), self.table_len)
        b.store(self._load_field(Field.BUDGET), self.budget)
        if self.fixed_stack:
            self._find_stack()

    def spill(self) -> None:
        """Before a call out or a return: the budget goes back to the context."""
        self._store_field(Field.BUDGET, self.b.load(self.budget, typ=I64))

    # -- control ---------------------------------------------------------------------------
    def _new_block(self, name: str) -> ir.Block:
        return self.fn.append_basic_block(name)

    def _check(self, ok: ir.Value, name: str) -> ir.Block:
        """Branch on `ok` to a new block (where the builder goes on) or a returned failure
        block, which the caller fills."""
        go_on, fail = self._new_block(name), self._new_block(f"{name}.fail")
        likely(self.b.cbranch(ok, go_on, fail))
        self.b.position_at_end(go_on)
        return fail

    def fault(self, message: str, pc: int) -> None:
        """End the block with VmFault(message, pc)."""
        block, info = self._shared_fault()
        info.add_incoming(ir.Constant(I64, self.faults.setdefault((message, pc),
                                                                  len(self.faults))),
                          self.b.block)
        self.b.branch(block)

    def _ensure(self, ok: ir.Value, name: str, message: str, pc: int) -> None:
        """Go on where `ok`, else VmFault(message, pc): one branch into the function's one
        fault block (a phi picks the fault), so a check costs no block of its own."""
        block, info = self._shared_fault()
        info.add_incoming(ir.Constant(I64, self.faults.setdefault((message, pc),
                                                                  len(self.faults))),
                          self.b.block)
        go_on = self._new_block(name)
        likely(self.b.cbranch(ok, go_on, block))
        self.b.position_at_end(go_on)

    def _shared_fault(self) -> tuple[ir.Block, ir.PhiInstr]:
        """The function's fault block, Status.FAULT with INFO from its phi (made on first
        use)."""
        if self._fault_block is None:
            b, here = self.b, self.b.block
            block = self._new_block("fault")
            b.position_at_end(block)
            info = b.phi(I64, name="fault")
            self._store_field(Field.STATUS, Status.FAULT)
            self._store_field(Field.INFO, info)
            b.branch(self.unwind)
            b.position_at_end(here)
            self._fault_block = (block, info)
        return self._fault_block

    def _shared_memory_fault(self) -> tuple[ir.Block, list[ir.PhiInstr]]:
        """The function's block for a failed access check: Status.MEMORY with the access
        (address, size, write) from its phis."""
        if self._memory_fault_block is None:
            b, here = self.b, self.b.block
            block = self._new_block("memory.fault")
            b.position_at_end(block)
            phis = [b.phi(I64, name=n) for n in ("addr", "size", "write")]
            for f, phi in zip((Field.FAULT_ADDR, Field.FAULT_SIZE, Field.FAULT_WRITE), phis,
                              strict=True):
                self._store_field(f, phi)
            self._store_field(Field.STATUS, Status.MEMORY)
            b.branch(self.unwind)
            b.position_at_end(here)
            self._memory_fault_block = (block, phis)
        return self._memory_fault_block

    def _unwind_unless_ok(self, name: str) -> None:
        """After a call out: take the budget it left, return at once when it set a status."""
        self.b.store(self._load_field(Field.BUDGET), self.budget)
        ok = self.b.icmp_unsigned("==", self._load_field(Field.STATUS), ir.Constant(I64, 0))
        go_on = self._new_block(name)
        likely(self.b.cbranch(ok, go_on, self.unwind))
        self.b.position_at_end(go_on)

    # -- memory ----------------------------------------------------------------------------
    def access(self, addr: ir.Value, size: int, write: int) -> ir.Value:
        """Pointer to `size` bytes at `addr` after the region table's check; a failed check
        returns with Status.MEMORY and the access in the context."""
        b = self.b
        fault, (fault_addr, fault_size, fault_write) = self._shared_memory_fault()

        def check(ok: ir.Value, name: str) -> None:
            for phi, value in ((fault_addr, addr), (fault_size, ir.Constant(I64, size)),
                               (fault_write, ir.Constant(I64, int(write)))):
                phi.add_incoming(value, b.block)
            go_on = self._new_block(name)
            likely(b.cbranch(ok, go_on, fault))
            b.position_at_end(go_on)

        region = b.lshr(addr, ir.Constant(I64, REGION_SHIFT))
        check(b.icmp_unsigned("<", region, b.load(self.table_len, typ=I64)), "mapped")
        entry = b.shl(region, ir.Constant(I64, ENTRY_SHIFT))
        table = b.load(self.table, typ=PTR)
        limit_at = b.add(entry, ir.Constant(I64, Entry.WRITE_LIMIT if write else
                                            Entry.READ_LIMIT))
        limit = b.load(b.gep(table, [limit_at], source_etype=I64), typ=I64)
        offset = b.and_(addr, ir.Constant(I64, OFFSET_MASK))
        check(b.icmp_unsigned("<=", b.add(offset, ir.Constant(I64, size)), limit), "inside")
        base = b.load(b.gep(table, [b.add(entry, ir.Constant(I64, Entry.BASE))],
                            source_etype=I64), typ=PTR)
        return b.gep(base, [offset], source_etype=I8)

    def _pointer(self, base_reg: int, off: int, size: int, write: int) -> ir.Value:
        """Where an access at base_reg + off goes: this frame's stack directly when that is
        provably inside it, else through the region table."""
        at = MAX_BPF_STACK + off
        if self.fixed_stack and base_reg == FRAME_POINTER and 0 <= at <= MAX_BPF_STACK - size:
            return self.b.gep(self.b.load(self.stack, typ=PTR), [ir.Constant(I64, at)],
                              source_etype=I8)
        address = self.b.add(self.reg(base_reg), ir.Constant(I64, off & U64))
        return self.access(address, size, write)

    def _find_stack(self) -> None:
        """The stack pointer of this frame from the table (the glue keeps the stack region
        mapped while the frame lives; checked all the same)."""
        b = self.b
        entry = b.shl(b.load(self.stack_region, typ=I64), ir.Constant(I64, ENTRY_SHIFT))
        table = b.load(self.table, typ=PTR)
        limit = b.load(b.gep(table, [b.add(entry, ir.Constant(I64, Entry.WRITE_LIMIT))],
                             source_etype=I64), typ=I64)
        mapped = b.icmp_unsigned("==", limit, ir.Constant(I64, MAX_BPF_STACK))
        self._ensure(mapped, "stack", "the frame's stack was unmapped", self.entry)
        base = b.load(b.gep(table, [entry], source_etype=I64), typ=PTR)
        b.store(base, self.stack)

    # -- the function ----------------------------------------------------------------------
    def write(self) -> None:
        b = self.b
        self.regs = [b.alloca(I64, name=f"r{n}") for n in range(NUM_REGS)]
        self.budget = b.alloca(I64, name="budget")
        self.table = b.alloca(PTR, name="table")
        self.table_len = b.alloca(I64, name="table_len")
        self.stack = b.alloca(PTR, name="stack")
        self.stack_region = b.alloca(I64, name="stack_region")
        self.unwind = self._new_block("unwind")
        self._fault_block = self._memory_fault_block = None
        self.known: dict[int, ir.Value] = {}
        for n in range(NUM_REGS):
            self.set_reg(n, self.fn.args[n] if 1 <= n <= 5 else ir.Constant(I64, 0))
        b.store(b.load(self._field(Field.TABLE), typ=PTR), self.table)
        b.store(self._load_field(Field.TABLE_LEN), self.table_len)
        b.store(self._load_field(Field.BUDGET), self.budget)
        if self.uses_stack:
            self._enter_frame()
        leaders = self._leaders()
        blocks = {pc: self._new_block(f"L{pc}") for pc in sorted(leaders)}
        b.branch(blocks[self.entry])
        for pc in sorted(leaders):
            b.position_at_end(blocks[pc])
            self.known = {}  # (a block may be entered from anywhere)
            self._block(pc, leaders, blocks)
        b.position_at_end(self.unwind)
        self.spill()
        b.ret(ir.Constant(I64, 0))

    def _enter_frame(self) -> None:
        """r10 = the top of a zeroed 512-byte stack for this depth (runtime.stack_top): the
        region mapped already is zeroed here, a first one is mapped by Python."""
        b = self.b
        top = b.icmp_unsigned("==", self.depth, ir.Constant(I64, 0))
        region = b.select(top, ir.Constant(I64, STACK_REGION),
                          b.add(self.depth, ir.Constant(I64, STACK_FRAME_REGIONS)))
        b.store(region, self.stack_region)
        mapped = b.icmp_unsigned("<", region, b.load(self.table_len, typ=I64))
        check, zero, slow, done = (self._new_block(n) for n in ("frame.check", "frame.zero",
                                                                 "frame.map", "frame.done"))
        b.cbranch(mapped, check, slow)
        b.position_at_end(check)
        entry = b.shl(region, ir.Constant(I64, ENTRY_SHIFT))
        table = b.load(self.table, typ=PTR)
        limit = b.load(b.gep(table, [b.add(entry, ir.Constant(I64, Entry.WRITE_LIMIT))],
                             source_etype=I64), typ=I64)
        b.cbranch(b.icmp_unsigned("==", limit, ir.Constant(I64, MAX_BPF_STACK)), zero, slow)
        b.position_at_end(zero)
        base = b.load(b.gep(table, [entry], source_etype=I64), typ=PTR)
        b.call(self.intrinsics.memset, [base, ir.Constant(I8, 0),
                                        ir.Constant(I64, MAX_BPF_STACK), ir.Constant(I1, 0)])
        b.branch(done)
        b.position_at_end(slow)
        self.spill()
        b.call(self.callbacks[FRAME], [self.ctx, self.depth])
        self._unwind_unless_ok("frame.mapped")
        self.reload()
        b.branch(done)
        b.position_at_end(done)
        frame_pointer = b.add(b.shl(region, ir.Constant(I64, REGION_SHIFT)),
                              ir.Constant(I64, MAX_BPF_STACK))
        self.set_reg(FRAME_POINTER, frame_pointer)
        if self.fixed_stack:
            self._find_stack()

    def _leaders(self) -> set[int]:
        """Block starts: the entry, insns charged budget, jump targets and what follows a
        jump, and every pc outside the program that control may reach (they fault)."""
        insns, n = self.insns, len(self.insns)
        leaders = {self.entry}
        for pc in self.code:
            if not 0 <= pc < n:
                leaders.add(pc)
                continue
            if pc in self.costs:
                leaders.add(pc)
            i = insns[pc]
            if i.cls in (Class.JMP, Class.JMP32) and i.op != Jmp.CALL:
                leaders.update(successors(insns, pc))
        return leaders

    def _block(self, start: int, leaders: set[int], blocks: dict[int, ir.Block]) -> None:
        insns = self.insns
        pc = start
        while True:
            if not 0 <= pc < len(insns):
                if pc == start:
                    self.fault(FELL_OFF, pc)
                else:
                    self.b.branch(blocks[pc])
                return
            if pc != start and pc in leaders:
                self.b.branch(blocks[pc])
                return
            cost = self.costs.get(pc)
            if cost is not None:
                self._charge(cost, pc)
            following = self._instruction(insns[pc], pc, blocks)
            if following is None:
                return
            pc = following

    def _charge(self, cost: int, pc: int) -> None:
        b = self.b
        left = b.sub(b.load(self.budget, typ=I64), ir.Constant(I64, cost))
        b.store(left, self.budget)
        ok = b.icmp_signed(">=", left, ir.Constant(I64, 0))
        self._ensure(ok, "budget", "instruction budget exhausted", pc)

    # -- instructions ----------------------------------------------------------------------
    def _instruction(self, i: Insn, pc: int, blocks: dict[int, ir.Block]) -> int | None:
        """Emit one insn; the pc that follows, or None when the block ended (a jump, an exit
        or a fault). The order of the tests is the interpreter's."""
        op = i.opcode
        cls = op & CLASS_MASK
        if cls in (Class.ALU, Class.ALU64):
            return pc + 1 if self._alu(i, pc) else None
        if cls == Class.LDX and i.mode in (Mode.MEM, Mode.MEMSX):
            self._load(i)
        elif cls == Class.ST and i.mode == Mode.MEM:
            self._store(i, ir.Constant(ir.IntType(i.size * 8), i.imm & _mask(i.size)))
        elif cls == Class.STX and i.mode == Mode.MEM:
            self._store(i, self._trunc(self.reg(i.src), i.size * 8))
        elif cls == Class.STX and i.mode == Mode.ATOMIC and i.size in ATOMIC_SIZES:
            return pc + 1 if self._atomic(i, pc) else None
        elif op == LD_IMM64:
            self.set_reg(i.dst, ir.Constant(I64, i.imm64))
        elif cls == Class.LD and i.mode in (Mode.ABS, Mode.IND):
            self._packet_load(i)
        elif cls in (Class.JMP, Class.JMP32):
            return self._jmp(i, pc, blocks)
        else:
            self.fault(f"unknown opcode {op:#04x}", pc)
            return None
        return pc + width(i)

    def _trunc(self, value: ir.Value, bits: int) -> ir.Value:
        return value if bits == 64 else self.b.trunc(value, ir.IntType(bits))

    def _widen(self, value: ir.Value, signed: bool = False) -> ir.Value:
        if value.type == I64:
            return value
        return self.b.sext(value, I64) if signed else self.b.zext(value, I64)

    def _load(self, i: Insn) -> None:
        pointer = self._pointer(i.src, i.off, i.size, False)
        value = self.b.load(pointer, typ=ir.IntType(i.size * 8), align=1)
        self.set_reg(i.dst, self._widen(value, signed=i.mode == Mode.MEMSX))

    def _store(self, i: Insn, value: ir.Value) -> None:
        self.b.store(value, self._pointer(i.dst, i.off, i.size, True), align=1)

    def _alu(self, i: Insn, pc: int) -> bool:
        alu64 = i.cls == Class.ALU64
        bits = 64 if alu64 else 32
        if i.op == Alu.END:
            if i.imm not in self.intrinsics.bswap:
                self.fault(f"invalid byte swap width {i.imm}", pc)
                return False
            value = self._trunc(self.reg(i.dst), i.imm)
            if alu64 or i.source == Source.X:
                value = self.b.call(self.intrinsics.bswap[i.imm], [value])
            self.set_reg(i.dst, self._widen(value))
            return True
        variant = i.off if i.op in (Alu.DIV, Alu.MOD, Alu.MOV) else 0
        if (i.op, variant) not in (ops.ALU64 if alu64 else ops.ALU32):
            self.fault(f"unknown ALU operation {i.opcode:#04x} off={i.off}", pc)
            return False
        ty = ir.IntType(bits)
        d = self._trunc(self.reg(i.dst), bits)
        s = self._trunc(self.reg(i.src), bits) if i.source == Source.X else \
            ir.Constant(ty, i.imm & (U64 if alu64 else U32))
        self.set_reg(i.dst, self._widen(self._operation(i.op, variant, d, s, bits)))
        return True

    def _operation(self, op: int, variant: int, d: ir.Value, s: ir.Value, bits: int
                   ) -> ir.Value:
        """d op s at `bits`, with the kernel's rules for division by zero, INT_MIN / -1 and
        shift counts (vm.ops), none of which LLVM defines."""
        b, ty = self.b, ir.IntType(bits)
        const = lambda v: ir.Constant(ty, v)  # noqa: E731
        simple: dict[int, Callable[[ir.Value, ir.Value], ir.Value]] = {
            Alu.ADD: b.add, Alu.SUB: b.sub, Alu.MUL: b.mul, Alu.OR: b.or_, Alu.AND: b.and_,
            Alu.XOR: b.xor}
        if op in simple:
            return simple[op](d, s)
        shifts = {Alu.LSH: b.shl, Alu.RSH: b.lshr, Alu.ARSH: b.ashr}
        if op in shifts:
            return shifts[op](d, b.and_(s, const(bits - 1)))
        if op == Alu.NEG:
            return b.sub(const(0), d)
        if op == Alu.MOV:
            return s if not variant else b.sext(b.trunc(s, ir.IntType(variant)), ty)
        zero = b.icmp_unsigned("==", s, const(0))
        if not variant:  # DIV, MOD: by zero, 0 and dst
            safe = b.select(zero, const(1), s)
            if op == Alu.DIV:
                return b.select(zero, const(0), b.udiv(d, safe))
            return b.select(zero, d, b.urem(d, safe))
        minus_one = b.icmp_unsigned("==", s, const((1 << bits) - 1))
        safe = b.select(b.or_(zero, minus_one), const(1), s)
        if op == Alu.DIV:  # SDIV: by zero 0; by -1 a wrapping negation
            return b.select(zero, const(0), b.select(minus_one, b.sub(const(0), d),
                                                     b.sdiv(d, safe)))
        return b.select(zero, d, b.select(minus_one, const(0), b.srem(d, safe)))  # SMOD

    def _atomic(self, i: Insn, pc: int) -> bool:
        """The interpreter's read-modify-write: a load (faulting as a read), then the store
        (faulting as a write), only when the operation stores. Where the memory is aligned
        the store is a real atomic (LLVM atomicrmw): map memory is shared with other
        processes; CMPXCHG stays a plain load and conditional store."""
        b, bits = self.b, i.size * 8
        if i.imm == Atomic.CMPXCHG:
            old = b.load(self._pointer(i.dst, i.off, i.size, False), typ=ir.IntType(bits),
                         align=1)
            src = self._trunc(self.reg(i.src), bits)
            equal = b.icmp_unsigned("==", self._trunc(self.reg(R0), bits), old)
            with b.if_then(equal):
                b.store(src, self._pointer(i.dst, i.off, i.size, True), align=1)
            self.set_reg(R0, self._widen(old))
            return True
        alu_op = None if i.imm == Atomic.XCHG else atomic_alu_op(i.imm)
        if alu_op is None and i.imm != Atomic.XCHG:
            self.fault(f"unknown atomic operation {i.imm:#x}", pc)
            return False
        # One check for both: writable implies readable (the glue reports the read fault
        # first, as the interpreter would, where the access was not readable either).
        pointer = self._pointer(i.dst, i.off, i.size, READ_WRITE)
        old = b.load(pointer, typ=ir.IntType(bits), align=1)
        src = self._trunc(self.reg(i.src), bits)
        new = src if alu_op is None else self._operation(alu_op, 0, old, src, bits)
        rmw = "xchg" if alu_op is None else _ATOMIC_RMW.get(alu_op)
        if rmw is not None:
            aligned = b.icmp_unsigned("==", b.and_(b.ptrtoint(pointer, I64),
                                                   ir.Constant(I64, i.size - 1)),
                                      ir.Constant(I64, 0))
            atomic, plain, done = (self._new_block(n) for n in ("atomic", "atomic.plain",
                                                                 "atomic.done"))
            likely(b.cbranch(aligned, atomic, plain))
            b.position_at_end(atomic)
            atomic_old = b.atomic_rmw(rmw, pointer, src, "seq_cst")
            b.branch(done)
            b.position_at_end(plain)
            b.store(new, pointer, align=1)
            b.branch(done)
            b.position_at_end(done)
            merged = b.phi(old.type)
            merged.add_incoming(atomic_old, atomic)
            merged.add_incoming(old, plain)
            old = merged
        else:
            b.store(new, pointer, align=1)
        if i.imm & Atomic.FETCH:
            self.set_reg(i.src, self._widen(old))
        return True

    def _packet_load(self, i: Insn) -> None:
        """SkBuff.load: at a non-negative offset, big-endian bytes of the frame from the
        context's packet fields, or the end of the program (r0 = 0) beyond it; a negative
        offset (the SKF_*_OFF bases) through Python."""
        b = self.b
        if i.mode == Mode.ABS:
            offset: ir.Value = ir.Constant(I64, i.imm & U64)
        else:  # the kernel's 32-bit offset, sign-extended
            offset = b.sext(b.trunc(b.add(self.reg(i.src), ir.Constant(I64, i.imm & U64)),
                                    I32), I64)
        size = ir.Constant(I64, i.size)
        direct, python, done = (self._new_block(n) for n in ("packet", "packet.py",
                                                              "packet.done"))
        b.cbranch(b.icmp_signed(">=", offset, ir.Constant(I64, 0)), direct, python)
        b.position_at_end(direct)
        start = b.add(self._load_field(Field.PACKET_START), offset)
        inside = b.icmp_unsigned("<=", b.add(start, size), self._load_field(Field.PACKET_END))
        fail = self._check(inside, "packet.inside")
        data = b.inttoptr(self._load_field(Field.PACKET_DATA), PTR)
        value = b.load(b.gep(data, [start], source_etype=I8), typ=ir.IntType(i.size * 8),
                       align=1)
        if i.size > 1:
            value = b.call(self.intrinsics.bswap[i.size * 8], [value])
        direct_value = self._widen(value)
        direct_end = b.block
        b.branch(done)
        b.position_at_end(fail)
        self._store_field(Field.STATUS, Status.PACKET_EXIT)
        b.branch(self.unwind)
        b.position_at_end(python)
        self.spill()
        python_value = b.call(self.callbacks[PACKET], [self.ctx, offset, size])
        self._unwind_unless_ok("packet.loaded")
        python_end = b.block
        b.branch(done)
        b.position_at_end(done)
        result = b.phi(I64)
        result.add_incoming(direct_value, direct_end)
        result.add_incoming(python_value, python_end)
        self.set_reg(R0, result)

    def _jmp(self, i: Insn, pc: int, blocks: dict[int, ir.Block]) -> int | None:
        b = self.b
        if i.opcode == EXIT:
            self.spill()
            b.ret(self.reg(R0))
            return None
        if i.opcode == CALL:
            if is_local_call(i):
                return pc + 1 if self._local_call(i, pc) else None
            self._helper_call(i, pc)
            return pc + 1
        if i.opcode in (JA, JA32):
            b.branch(blocks[jump_target(i, pc)])
            return None
        compare = _COMPARE.get(i.op)
        if i.op not in ops.JMP:
            self.fault(f"unknown opcode {i.opcode:#04x}", pc)
            return None
        bits = 64 if i.cls == Class.JMP else 32
        d = self._trunc(self.reg(i.dst), bits)
        s = self._trunc(self.reg(i.src), bits) if i.source == Source.X else \
            ir.Constant(ir.IntType(bits), i.imm & (U64 if bits == 64 else U32))
        if compare is None:
            taken = b.icmp_unsigned("!=", b.and_(d, s), ir.Constant(ir.IntType(bits), 0))
        else:
            signed, predicate = compare
            taken = (b.icmp_signed if signed else b.icmp_unsigned)(predicate, d, s)
        b.cbranch(taken, blocks[jump_target(i, pc)], blocks[pc + 1])
        return None

    def _helper_call(self, i: Insn, pc: int) -> None:
        """A helper: bpf_redirect inline; any other through its helper function
        (_helper_function), one per helper called from every site, so that a call site is
        a few insns and LLVM's time stays linear in the sites."""
        if i.imm == Helper.redirect:
            self.set_reg(R0, self._redirect())
            return
        b = self.b
        self.spill()
        r0 = b.call(_helper_function(self.fn.module, i.imm & U64, self.maps, self.callbacks),
                    [self.ctx, *(self.reg(n) for n in range(1, 6)), ir.Constant(I64, pc)])
        self._unwind_unless_ok("helper")
        # Python may have grown the table; it never moves this frame's stack (a helper maps
        # only map values and buffers), so the stack pointer stays.
        b.store(b.load(self._field(Field.TABLE), typ=PTR), self.table)
        b.store(self._load_field(Field.TABLE_LEN), self.table_len)
        self.set_reg(R0, r0)

    def _redirect(self) -> ir.Value:
        """bpf_redirect (helpers.skb.redirect): its record goes to the context's REDIRECT
        field, which the glue and the batch driver turn into the "redirect" effect."""
        b = self.b
        flags, ifindex = self.reg(2), self.reg(1)
        bad = b.icmp_unsigned("!=", b.and_(flags, ir.Constant(I64, ~BPF_F_INGRESS & U64)),
                              ir.Constant(I64, 0))
        ingress = b.shl(b.and_(flags, ir.Constant(I64, BPF_F_INGRESS)),
                        ir.Constant(I64, REDIRECT_INGRESS_SHIFT))
        record = b.or_(b.or_(ingress, b.and_(ifindex, ir.Constant(I64, U32))),
                       ir.Constant(I64, REDIRECT_SET))
        self._store_field(Field.REDIRECT,
                          b.select(bad, self._load_field(Field.REDIRECT), record))
        return b.select(bad, ir.Constant(I64, TcAct.SHOT), ir.Constant(I64, TcAct.REDIRECT))

    def _local_call(self, i: Insn, pc: int) -> bool:
        """A bpf-to-bpf call; a tail call the callee made runs here (runtime.run_tail_calls)
        and its r0 is the callee's."""
        b = self.b
        deeper = b.add(self.depth, ir.Constant(I64, 1))
        ok = b.icmp_unsigned("<", deeper, ir.Constant(I64, MAX_CALL_FRAMES))
        self._ensure(ok, "depth", f"call depth above {MAX_CALL_FRAMES} frames", pc)
        target = call_target(i, pc)
        callee = self.functions.get(target)
        if callee is None:
            self.fault(FELL_OFF, target)
            return False
        self.spill()
        r0 = b.call(callee, [self.ctx, *(self.reg(n) for n in range(1, 6)), deeper])
        b.store(self._load_field(Field.BUDGET), self.budget)  # unwinding spills it again
        status = self._load_field(Field.STATUS)
        returned, tail, done = (self._new_block(n) for n in ("returned", "tail", "called"))
        switch = b.switch(status, self.unwind)
        switch.add_case(ir.Constant(I64, Status.OK), returned)
        switch.add_case(ir.Constant(I64, Status.TAIL_CALL), tail)
        b.position_at_end(tail)
        self._store_field(Field.STATUS, Status.OK)
        tail_r0 = b.call(self.callbacks[TAIL], [self.ctx, deeper])
        self._unwind_unless_ok("tail.done")
        tail_end = b.block
        b.branch(done)
        b.position_at_end(returned)
        b.branch(done)
        b.position_at_end(done)
        result = b.phi(I64)
        result.add_incoming(r0, returned)
        result.add_incoming(tail_r0, tail_end)
        self.reload()
        self.set_reg(R0, result)
        return True


MAP_HELPER_TYPE = ir.FunctionType(I64, [PTR, I64, I64, I64])  # (ctx, r2, r3, r4) -> r0
# (ctx, r1, ..., r5, pc) -> r0, or 0 with a status set
HELPER_FUNCTION_TYPE = ir.FunctionType(I64, [PTR, I64, I64, I64, I64, I64, I64])


def _helper_function(module: ir.Module, helper: int, maps: list[MapInfo | None],
                     callbacks: dict[str, ir.Function]) -> ir.Function:
    """bpf_call_<helper>, written on first use: the native map helper of the map r1 names
    (vm.native.maps) where there is one and it does not leave the call to Python, else the
    Python helper (the HELPER callback)."""
    name = f"bpf_call_{helper}"
    fn = module.globals.get(name)
    if fn is not None:
        return fn
    fn = ir.Function(module, HELPER_FUNCTION_TYPE, name)
    fn.linkage = "internal"
    fn.attributes.add("noinline")
    ctx, r1, r2, r3, r4, r5, pc = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    python = fn.append_basic_block("python")
    native = [(index, info) for index, info in enumerate(maps)
              if info is not None and helper in NATIVE_HELPERS]
    if native:
        status = b.gep(ctx, [ir.Constant(I64, Field.STATUS)], source_etype=I64)
        switch = b.switch(r1, python)
        for index, info in native:
            block = fn.append_basic_block(f"map{index}")
            switch.add_case(ir.Constant(I64, map_handle(index)), block)
            b.position_at_end(block)
            r0 = b.call(_map_helper(module, helper, info, index), [ctx, r2, r3, r4])
            to_python = b.icmp_unsigned("==", b.load(status, typ=I64),
                                        ir.Constant(I64, Status.PYTHON))
            returned, handed = fn.append_basic_block(), fn.append_basic_block()
            likely(b.cbranch(b.not_(to_python), returned, handed))
            b.position_at_end(returned)
            b.ret(r0)
            b.position_at_end(handed)
            b.store(ir.Constant(I64, Status.OK), status)
            b.branch(python)
    else:
        b.branch(python)
    b.position_at_end(python)
    b.ret(b.call(callbacks[HELPER], [ctx, ir.Constant(I64, helper), r1, r2, r3, r4, r5, pc]))
    return fn


def _map_helper(module: ir.Module, helper: int, info: MapInfo, index: int) -> ir.Function:
    """The native helper `helper` on map `index` of the program, written on first use: r0,
    or 0 with Status.MEMORY (a fault) or Status.PYTHON (call the Python helper) set."""
    name = f"bpf_helper_{helper}_map_{index}"
    fn = module.globals.get(name)
    if fn is None:
        fn = ir.Function(module, MAP_HELPER_TYPE, name)
        fn.linkage = "internal"
        _LeafWriter(fn).write_map_helper(helper, info, index)
    return fn


class _LeafWriter(_FunctionWriter):
    """Writes a native map helper: a function of its own, with the access checks of a bpf
    function (_FunctionWriter.access) but no budget, stack or calls out."""

    def __init__(self, fn: ir.Function):  # (not the bpf function's state)
        self.fn = fn
        self.ctx = fn.args[0]
        self.args = {2: fn.args[1], 3: fn.args[2], 4: fn.args[3]}
        self.b = b = ir.IRBuilder(fn.append_basic_block("entry"))
        self.table = b.alloca(PTR, name="table")
        self.table_len = b.alloca(I64, name="table_len")
        b.store(b.load(self._field(Field.TABLE), typ=PTR), self.table)
        b.store(self._load_field(Field.TABLE_LEN), self.table_len)
        self.unwind = self._new_block("unwind")  # a fault: its status is set
        self._fault_block = self._memory_fault_block = None
        b.position_at_end(self.unwind)
        b.ret(ir.Constant(I64, 0))
        b.position_at_end(fn.entry_basic_block)

    def reg(self, n: int) -> ir.Value:
        return self.args[n]

    def write_map_helper(self, helper: int, info: MapInfo, index: int) -> None:
        b = self.b
        slow = self._new_block("python")
        b.position_at_end(slow)
        self._store_field(Field.STATUS, Status.PYTHON)
        b.ret(ir.Constant(I64, 0))
        b.position_at_end(self.fn.entry_basic_block)
        ends = MapHelpers(self).emit(helper, info, index, slow)
        done = self._new_block("done")
        for _, block in ends:
            b.position_at_end(block)
            b.branch(done)
        b.position_at_end(done)
        r0 = b.phi(I64)
        for value, block in ends:
            r0.add_incoming(value, block)
        b.ret(r0)


def _mask(size: int) -> int:
    return (1 << (size * 8)) - 1
