"""One bpf function (the main program or a bpf-to-bpf callee) as one Python function.

Registers are local variables; each basic block is straight-line code guarded by one
`if L == <block>:` test. Blocks are emitted in program order inside `while True:`, so a forward
jump just sets L and falls through the tests of the blocks it skips; a backward jump (only in
programs verified with loops allowed) sets L and restarts the loop. The first block runs once,
before the loop, unless a jump leads back to it.
"""

from __future__ import annotations

import re

from ..insn import is_jump, jump_target
from ..isa import FRAME_POINTER, Insn
from ..memory import CTX_REGION, region_base
from ..runtime import block_leaders
from ..uapi import MAX_BPF_STACK
from .block import Function, block_source
from .registers import context_registers, writes

_MEMORY_CALL = re.compile(r"(?<![\w.])(load|store)\(")  # a call of the bound mem.load/store
CTX_BASE = region_base(CTX_REGION)


def function_source(insns: list[Insn], start: int, end: int, uses_stack: bool) -> list[str]:
    """def f<start>(run, r1, ..., depth): the function [start, end) of the program."""
    # r10 is read-only in verified programs; where no instruction writes it, every access at
    # r10 + constant is a fixed offset into this frame's stack, checked here at compile time.
    fixed_stack = uses_stack and not any(FRAME_POINTER in writes(i) for i in insns[start:end])
    function = Function(insns, range(start, end), fixed_stack)
    head, body, uses_ctx = _blocks(function)
    # load/store of Memory bound once, where the code calls them outside the fallbacks of
    # direct accesses (which go through mem.load / mem.store).
    bound = any(_MEMORY_CALL.search(line) for line in head + body)
    # The context is where r1 points on entry to the program (a conformance-suite run may
    # pass no context): direct accesses fall back to Memory unless it is mapped there.
    return [f"def f{start}(run, r1, r2=0, r3=0, r4=0, r5=0, depth=0):",
            "    mem = run.mem; load = mem.load; store = mem.store" if bound else
            "    mem = run.mem",
            *([f"    ctx, ctx_size = run.ctx_view if r1 == {CTX_BASE:#x} else (None, -1)"]
              if uses_ctx else []),
            "    r0 = r6 = r7 = r8 = r9 = 0",
            *(["    r10 = stack_top(mem, depth)"] if uses_stack else []),  # else never named
            *([f"    stack = mem.view(r10 - {MAX_BPF_STACK}, {MAX_BPF_STACK}, True)"]
              if fixed_stack else []),
            "    budget = run.budget",
            *(head or [f"    L = {start}"]),
            *(["    while True:", *body] if body else [])]


def _blocks(function: Function) -> tuple[list[str], list[str], bool]:
    """The first block's lines when it runs once before the loop (else []), the loop's
    blocks, and whether any block reads the context buffer directly."""
    insns, start, end = function.insns, function.code.start, function.code.stop
    leaders = block_leaders(insns, start, end)
    ctx_at = context_registers(insns, start, end, leaders)
    entered_again = any(jump_target(i, pc) == start for pc, i in enumerate(insns[start:end], start)
                        if is_jump(i))
    head: list[str] = []
    body: list[str] = []
    uses_ctx = False
    for block_start, block_stop in zip(leaders, [*leaders[1:], end], strict=True):
        block = block_source(function, block_start, block_stop,
                             ctx_at.get(block_start, frozenset()))
        uses_ctx |= block.uses_ctx
        if block_start == start and not entered_again:
            head = ["    " + line for line in block.lines]
        else:
            body += [f"        if L == {block_start}:",
                     *("            " + line for line in block.lines)]
    return head, body, uses_ctx
