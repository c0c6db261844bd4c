"""Where control goes: jumps set the block variable L (and `continue` the dispatch loop when
they go back), exits return r0, calls run a helper or the callee's function. Jump targets come
from vm.insn, as for the interpreter and the verifier."""

from __future__ import annotations

from .. import ops
from ..insn import call_target, is_local_call, is_second_half, jump_target
from ..isa import EXIT, JA, JA32, U32, U64, Class, Insn, Jmp
from ..runtime import MAX_CALL_FRAMES
from .emit import destination, fault, operand, subst, unknown_opcode

FELL_OFF = "fell off the end of the program"


def jump_source(insns: list[Insn], function: range, i: Insn, pc: int, block_start: int
                ) -> list[str]:
    """The end of a block: an exit, a goto or a conditional jump within `function`."""
    if i.op == Jmp.EXIT:
        return ["run.budget = budget", "return r0"] if i.opcode == EXIT else \
            [unknown_opcode(i, pc)]
    target = jump_target(i, pc)
    if target not in function:  # the interpreter would run on outside this function's code
        return [fault(FELL_OFF, target)]
    if target > function.start and is_second_half(insns, target):
        return [fault("unknown opcode 0x00", target)]
    go = f"L = {target}; continue" if target <= block_start else f"L = {target}"
    if i.op == Jmp.JA:
        return [go] if i.opcode in (JA, JA32) else [unknown_opcode(i, pc)]
    return _conditional(i, pc, go)


def _conditional(i: Insn, pc: int, go: str) -> list[str]:
    """`if <condition>: go` else on to the next insn; the condition is the ops template."""
    template = ops.JMP.get(i.op)
    if template is None:
        return [unknown_opcode(i, pc)]
    wide = i.cls == Class.JMP
    cond = subst(template.format(bits=64 if wide else 32), destination(i, wide),
                 operand(i, U64 if wide else U32))
    return [f"if {cond}:", f"    {go}", "else:", f"    L = {pc + 1}"]


def call_source(i: Insn, pc: int) -> list[str]:
    """A helper call, or a bpf-to-bpf call of the callee's own function f<entry>; the budget
    goes to the run and back, as the callee (or a tail call) spends it."""
    if not is_local_call(i):
        return ["run.budget = budget",
                f"r0 = call_helper(run, {i.imm}, r1, r2, r3, r4, r5, {pc})"]
    too_deep = fault(f"call depth above {MAX_CALL_FRAMES} frames", pc)
    return ["run.budget = budget",
            f"if depth + 1 >= MAX_FRAMES: {too_deep}",
            "try:",
            f"    r0 = f{call_target(i, pc)}(run, r1, r2, r3, r4, r5, depth + 1)",
            "except TailCall:",
            "    r0 = run_tail_calls(run, 'compiled', depth + 1, prog)",
            "budget = run.budget"]
