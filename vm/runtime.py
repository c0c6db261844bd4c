"""What both tiers share while a program runs: its basic blocks and their budget, the stack of
each call frame, helper calls and tail calls, and the two ways a program ends early.

The interpreter calls these directly; the compiled tier puts them in the namespace of the code
it generates. Keeping them here, not in either tier, is what lets the two agree on where a
budget runs out, how deep calls go and what a tail call from a callee returns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import VmFault
from .insn import ends_block, is_second_half, subprograms, successors, width
from .isa import FRAME_POINTER, U64, Insn
from .memory import STACK_FRAME_REGIONS, STACK_REGION, Memory, region_base
from .uapi import MAX_BPF_STACK, Helper

if TYPE_CHECKING:
    from .program import Program
    from .run import Run

MAX_CALL_FRAMES = 8


class PacketExit(Exception):
    """LD_ABS/LD_IND beyond the packet: the program ends with r0 = 0 (the kernel's rule)."""


class TailCall(Exception):
    """bpf_tail_call succeeded: the current program is replaced by run.tail_target."""


def block_leaders(insns: list[Insn], start: int, end: int) -> list[int]:
    """First insns of the basic blocks of the function [start, end): its start, jump
    targets inside it, and the insns after jumps and exits. Calls do not end a block."""
    leaders = {start}
    pc = start
    while pc < end:
        i = insns[pc]
        if ends_block(i):
            leaders.update((pc + 1, *successors(insns, pc)))
        pc += width(i)
    return sorted(t for t in leaders if start <= t < end)


def block_cost(insns: list[Insn], start: int, stop: int) -> int:
    """Budget charged on entering the block [start, stop): its insns, LD_IMM64 counting
    once. Both tiers charge a whole block at its start, so they run out at the same place."""
    return sum(1 for pc in range(start, stop) if pc == start or not is_second_half(insns, pc))


def block_costs(insns: list[Insn]) -> dict[int, int]:
    """block_cost of every block of every function, by its first insn."""
    costs = {}
    for start, end in subprograms(insns):
        leaders = block_leaders(insns, start, end)
        for first, stop in zip(leaders, [*leaders[1:], end], strict=True):
            costs[first] = block_cost(insns, first, stop)
    return costs


def uses_frame_pointer(insns: list[Insn], start: int, end: int) -> bool:
    """Whether a function mentions r10 at all. One that does not runs without a stack:
    mapping and zeroing 512 bytes is a large part of a short program's run."""
    return any(FRAME_POINTER in (i.dst, i.src) for i in insns[start:end])


def stack_top(mem: Memory, depth: int) -> int:
    """Map a fresh, zeroed 512-byte stack for call depth `depth`; return the frame pointer."""
    region = STACK_REGION if depth == 0 else STACK_FRAME_REGIONS + depth
    mem.map_zeroed(region, MAX_BPF_STACK, f"stack of frame {depth}")
    return region_base(region) + MAX_BPF_STACK


def call_helper(run: Run, helper_id: int, r1: int, r2: int, r3: int, r4: int, r5: int,
                pc: int | None = None) -> int:
    """Call a helper by id; raise TailCall when a tail call succeeded."""
    spec = run.helpers.get(helper_id)
    if spec is None:
        raise VmFault(f"call to unknown helper {helper_id}", pc)
    result = spec.fn(run, r1, r2, r3, r4, r5) & U64
    if helper_id == Helper.tail_call and run.tail_target is not None:
        raise TailCall
    return result


def run_tail_calls(run: Run, tier: str, depth: int, caller: Program) -> int:
    """A bpf_tail_call made in a bpf-to-bpf callee: as in the kernel (x86-64 JIT), the
    target replaces the callee's frame, and its r0 goes back to the callee's caller, which
    then goes on with its own program (and maps)."""
    try:
        while True:
            target, run.tail_target = run.tail_target, None
            try:
                return target.entry(tier)(run, run.ctx_addr, depth=depth)
            except TailCall:
                continue
    finally:
        run.prog = caller
