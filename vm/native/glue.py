"""The Python side of a native run: entering native code, the callbacks it makes (helpers,
packet loads, a frame's first stack, tail calls from callees) and turning the status it
returns with into the exception the other tiers raise.

Callbacks cannot raise through native code, so each catches everything, leaves it with the
invocation and sets a status; native code returns up to the entry, which raises it again.
"""

from __future__ import annotations

import ctypes
import weakref
from array import array
from collections.abc import Callable
from typing import TYPE_CHECKING

import llvmlite.binding as llvm

from ..errors import VmFault
from ..maps import BpfMap
from ..memory import FIRST_DYNAMIC_REGION
from ..run import redirect_effect
from ..runtime import PacketExit, TailCall, call_helper, run_tail_calls, stack_top
from .abi import ENTRY_WORDS, READ_WRITE, Context, Status
from .abi import Entry as Word
from .batch import DRIVER, run_batch
from .driver import DRIVER_NAME, REPEAT_NAME
from .engine import DEFAULT_OPT, Jitted, jit, release, triple_and_layout
from .ir import ENTRY_NAME, FRAME, HELPER, PACKET, TAIL, translate
from .maps import describe
from .regions import RegionTable, buffer_address, table_of

if TYPE_CHECKING:
    from ..program import Program
    from ..run import Buffer, PacketBatch, Run
    from .batch import Packets

TIER = "native"
_MapMemory = tuple[BpfMap, memoryview, int]  # a map native code reads, a view, its address
_U64 = ctypes.c_uint64
_NATIVE_ENTRY = ctypes.PYFUNCTYPE(_U64, _U64)  # bpf_entry(ctx)
_REPEAT = ctypes.PYFUNCTYPE(_U64, _U64, _U64, ctypes.c_int64)  # bpf_repeat(ctx, times, budget)


class _Invocation:
    """One entry into native code: its context, and what its callbacks need to reach the
    run. A run keeps one and reuses it for its next entry (making a context and registering
    it cost more than a program of a few insns takes to run); it holds the run only while
    native code runs, so the registry of invocations does not keep runs alive."""

    __slots__ = ("address", "batch", "context", "maps", "packet", "pending", "prog",
                 "repeating", "run", "table")

    def __init__(self, table: RegionTable):
        self.table = table
        self.context = Context()
        self.address = ctypes.addressof(self.context)
        self.run: Run | None = None  # while native code runs
        self.prog: Program | None = None
        self.maps: list[_MapMemory | None] = []  # the running program's, by map index
        self.packet = False  # the program reads the packet (LD_ABS, LD_IND)
        self.pending: BaseException | None = None
        self.batch: Packets | None = None  # the packets of the batch driver's run
        self.repeating = False  # in the repeat loop (driver.write_repeat)

    def enter(self) -> None:
        """Python is about to run (a callback, or the end of a native run): the packet the
        batch driver runs becomes the run's skb, and bpf_redirect's record its effect, in
        the order of the run's calls, so that Python sees the run as the other tiers have
        it. (In a batch, the effect then makes the driver hand the packet to Python.)"""
        context = self.context
        if context.batch_packet:
            self.enter_packet(context.batch_packet - 1)
        if context.redirect:
            record, context.redirect = context.redirect, 0
            self.running.record("redirect", redirect_effect(record))

    def enter_packet(self, index: int) -> None:
        """The rest of Run.next_packet for the driver's packet `index` (it reloaded the skb's
        fields and reset the budget and the map values itself)."""
        context, run, batch = self.context, self.running, self.batch
        assert batch is not None and run.skb is not None
        context.batch_packet = 0
        run.skb.adopt(batch.packet(index))
        if run.effects:
            run.effects = {}
        run.tail_target, run.tail_calls = None, 0

    def leave(self) -> None:
        """After a callback in a batch: the driver goes on to the next packet unless Python
        now holds some of this packet's outcome (an effect, a written frame or tunnel key,
        a map value mapped in Memory), then it returns after it for Python to finish it."""
        run = self.running
        if self.repeating:  # (the repetitions share one skb and its effects, as in Python)
            if run.mem._next_id != FIRST_DYNAMIC_REGION or run.tail_calls:
                self.context.batch_stop = 1  # (Run.reset's to undo: values, tail calls)
            return
        if self.batch is None:
            return
        skb = run.skb
        if run.effects or run.mem._next_id != FIRST_DYNAMIC_REGION or (
                skb is not None and (skb.written or skb.tunnel_key is not None)):
            self.context.batch_stop = 1

    @property
    def running(self) -> Run:
        """The run (callbacks come only while native code runs)."""
        run = self.run
        assert run is not None
        return run

    def refresh(self) -> None:
        """After Python ran: the table (which may have grown), the budget and the packet
        (a helper may have replaced the frame) back to native code."""
        context = self.context
        context.table, context.table_len = self.table.address, self.table.length
        context.budget = self.running.budget
        context.next_id = self.running.mem._next_id
        if self.packet:
            self.find_packet()

    def adopt(self) -> None:
        """Map in Memory the map values native code mapped since Python last looked, at
        the same ids, as the Python helper maps them: before Python reads Memory again (a
        callback, a fault's message, a tail call's next program)."""
        mem = self.running.mem
        first, end = mem._next_id, self.context.next_id
        words = self.table.words
        for region_id in range(first, end):
            at = region_id * ENTRY_WORDS
            memory = self.maps[words[at + Word.MAP] - 1]
            assert memory is not None and mem._next_id == region_id
            m, view, address = memory
            offset = words[at + Word.BASE] - address
            mem.add(view[offset:offset + m.value_size], True, f"value of {m.describe()}")
            # The table's entry is Memory's region now: a sync after Run.reset clears it.
            self.table.synced[region_id] = mem.regions[region_id]

    def find_packet(self) -> None:
        skb, context = self.running.skb, self.context
        if skb is None:
            context.packet_data = context.packet_start = context.packet_end = 0
            return
        frame = skb.current
        context.packet_data = buffer_address(frame)
        context.packet_start, context.packet_end = skb.data_start, len(frame)

    def failed(self, error: BaseException) -> None:
        self.context.status = Status.TAIL_CALL if isinstance(error, TailCall) else \
            Status.PY_EXCEPTION
        if not isinstance(error, TailCall):
            self.pending = error


def _invocation(run: Run) -> tuple[_Invocation, bool]:
    """An invocation for an entry into native code on `run`: the run's own, registered for
    the run's lifetime; or, for an entry nested in a running one (a tail call made in a
    callee), a new one to register for this entry only (True)."""
    call: _Invocation | None = run.__dict__.get("_native_invocation")
    if call is None:
        call = run.__dict__["_native_invocation"] = _Invocation(table_of(run))
        _active[call.address] = call
        weakref.finalize(run, _active.pop, call.address, None)
    elif call.run is not None:
        return _Invocation(call.table), True
    return call, False


_active: dict[int, _Invocation] = {}  # by the address of the invocation's context


def _in_python(context: int, work: Callable[..., int], *args: int, new_only: bool) -> int:
    """A callback that runs Python on the run: the run's state brought up to date (the batch's
    packet, the redirect record, the map values native code mapped, the budget), work(call,
    *args), then the table (`new_only`: only new dynamic regions can have appeared),
    budget and packet back to native code. An exception waits for the entry (`failed`)."""
    call = _active[context]
    run = call.running
    try:
        call.enter()
        call.adopt()
        run.budget = call.context.budget
        result = work(call, *args)
    except BaseException as error:  # re-raised by the entry
        call.failed(error)
        result = 0
    if new_only:
        call.table.sync_new(run.mem)
    else:
        call.table.sync(run.mem)
    call.refresh()
    call.leave()
    return result


def _helper(context: int, helper_id: int, r1: int, r2: int, r3: int, r4: int, r5: int,
            pc: int) -> int:
    return _in_python(context, _call_helper, helper_id, r1, r2, r3, r4, r5, pc, new_only=True)


def _call_helper(call: _Invocation, *args: int) -> int:
    return call_helper(call.running, *args)


def _packet(context: int, offset: int, size: int) -> int:
    call = _active[context]
    try:
        call.enter()
        value = call.running.load_packet(offset, size)
    except BaseException as error:
        call.failed(error)
        return 0
    if value is None:
        call.context.status = Status.PACKET_EXIT
        return 0
    return value


def _frame(context: int, depth: int) -> int:
    return _in_python(context, _map_stack, depth, new_only=False)


def _map_stack(call: _Invocation, depth: int) -> int:
    return stack_top(call.running.mem, depth)


def _tail(context: int, depth: int) -> int:
    return _in_python(context, _tail_calls, depth, new_only=False)


def _tail_calls(call: _Invocation, depth: int) -> int:
    return run_tail_calls(call.running, TIER, depth, call.prog)


# The callbacks as C functions, made once and kept for the life of the process: native code
# calls them by these symbols (vm.native.ir).
_CALLBACKS = {
    HELPER: ctypes.CFUNCTYPE(_U64, _U64, ctypes.c_int64, _U64, _U64, _U64, _U64, _U64,
                             _U64)(_helper),
    PACKET: ctypes.CFUNCTYPE(_U64, _U64, ctypes.c_int64, _U64)(_packet),
    FRAME: ctypes.CFUNCTYPE(_U64, _U64, _U64)(_frame),
    TAIL: ctypes.CFUNCTYPE(_U64, _U64, _U64)(_tail),
}
for _name, _callback in _CALLBACKS.items():
    llvm.add_symbol(_name, ctypes.cast(_callback, ctypes.c_void_p).value)


class NativeProgram:
    """A program's machine code and what its entry needs to run it."""

    def __init__(self, prog: Program, opt: int = DEFAULT_OPT,
                 translated: NativeProgram | None = None):
        """Compile `prog` at `opt`; from the IR of `translated` (the same program compiled
        at another level) where given, which saves translating it again."""
        if translated is None:
            triple, layout = triple_and_layout()
            described = [describe(m) for m in prog.maps]
            # The views keep each map's memory mapped (its address, in the IR, valid) while
            # the code lives.
            maps: list[_MapMemory | None] = [
                (m, view, info.address) if info is not None and view is not None else None
                for m, (info, view) in zip(prog.maps, described, strict=True)]
            translation = translate(prog.decoded, prog.block_costs, prog.stackless_functions,
                                    triple, layout, [info for info, _ in described])
        else:
            translation, maps = translated.translation, translated.maps
        self.prog, self.opt = prog, opt
        self.translation = translation
        self.faults = translation.faults
        self.uses_packet = translation.uses_packet
        self.maps = maps
        self.jitted: Jitted = jit(translation.ir, opt)
        weakref.finalize(self, release, self.jitted)
        self.function = _NATIVE_ENTRY(self.jitted.address(ENTRY_NAME))
        self.driver = DRIVER(self.jitted.address(DRIVER_NAME))
        self.repeater = _REPEAT(self.jitted.address(REPEAT_NAME))

    def run_batch(self, batch: PacketBatch, buffer: Buffer, offsets: array, lengths: array,
                  first: int) -> None:
        """PacketBatch.feed_buffer's packets, natively (vm.native.batch)."""
        run_batch(self, batch, buffer, offsets, lengths, first)

    def __call__(self, run: Run, r1: int, r2: int = 0, depth: int = 0) -> int:
        """Run from insn 0 with r1, r2 as arguments at call depth `depth` (the signature
        of the other tiers' entries); raises as they do."""
        call, nested = self._enter(run, r1, r2, depth)
        try:
            r0 = self.function(call.address)
        finally:
            self._leave(call, run, nested, nested or depth > 0)
        if call.context.status:
            self._raise(call, run)
        return r0

    def repeat(self, run: Run, times: int, tier: str) -> tuple[int, int]:
        """BPF_PROG_TEST_RUN's repeat loop in native code (driver.write_repeat): up to
        `times` repetitions on the run as it is (the caller resets it before the first),
        each with Run.reset's budget and map values; returns the last r0 and how many ran.
        One that ended early is handled as Program.execute does (a tail call's target runs,
        LD_ABS past the end is r0 = 0); a fault raises, its `repeated` the ones before."""
        call, nested = self._enter(run, run.ctx_addr, 0, 0)
        call.repeating, call.context.batch_stop = True, 0
        try:
            r0 = self.repeater(call.address, times, run.env.budget)
        finally:
            call.repeating = False
            self._leave(call, run, nested, False)
        ran = call.context.repeated
        if call.context.status:
            try:
                try:
                    self._raise(call, run)
                except PacketExit:
                    r0 = 0
                except TailCall:
                    target, run.tail_target = run.tail_target, None
                    r0 = target.execute(run, tier)
            except VmFault as fault:  # (the program's, or its tail call target's)
                fault.repeated = ran - 1  # type: ignore[attr-defined]
                raise
        return r0, ran

    def _enter(self, run: Run, r1: int, r2: int, depth: int) -> tuple[_Invocation, bool]:
        """The invocation for an entry, its context and region table made current."""
        call, nested = _invocation(run)
        call.run, call.prog, call.packet, call.maps = run, self.prog, self.uses_packet, \
            self.maps
        if nested:
            _active[call.address] = call
        if call.packet:
            call.find_packet()
        table = call.table
        table.sync(run.mem)
        context = call.context
        context.table, context.table_len, context.budget = table.address, table.length, \
            run.budget
        context.arg_r1, context.arg_r2, context.arg_depth = r1, r2, depth
        context.redirect = 0  # (any earlier record is an effect already)
        context.next_id = run.mem._next_id
        return call, nested

    def _leave(self, call: _Invocation, run: Run, nested: bool, keep_values: bool) -> None:
        """After native code returned: its redirect record an effect, the map values it
        mapped adopted by Memory (`keep_values`: Python may still reach them) or unmapped,
        the invocation let go, the budget back to the run."""
        context, mem = call.context, run.mem
        if context.redirect:
            call.enter()
        if context.next_id != mem._next_id:
            # Map values native code mapped: Memory learns of them where Python may still
            # reach them (a fault's message, a tail call's next program, a caller that goes
            # on); at the end of a run they are only unmapped, which is cheaper.
            if context.status or keep_values:
                call.adopt()
            else:
                call.table.clear(mem._next_id, context.next_id)
        call.run = None
        if nested:
            del _active[call.address]
        run.budget = context.budget

    def _raise(self, call: _Invocation, run: Run) -> None:
        context = call.context
        status, context.status = context.status, Status.OK
        if status == Status.FAULT:
            message, pc = self.faults[context.info]
            raise VmFault(message, pc)
        if status == Status.MEMORY:
            addr, size, write = context.fault_addr, context.fault_size, context.fault_write
            if write == READ_WRITE:  # the interpreter reads before it writes
                run.mem.view(addr, size, False)
            run.mem.view(addr, size, bool(write))  # raises the MemoryFault
            raise VmFault(f"native code faulted on an access Memory allows"
                          f" ({size} bytes at {addr:#x})")
        if status == Status.TAIL_CALL:
            raise TailCall
        if status == Status.PACKET_EXIT:
            raise PacketExit
        pending, call.pending = call.pending, None
        if pending is None:
            raise VmFault(f"native code returned with unknown status {status}")
        raise pending
