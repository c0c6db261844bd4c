"""The compiled tier: each program becomes Python source once, then runs without dispatch.

Every bpf function (the main program, each bpf-to-bpf callee) becomes one Python function
whose registers are local variables (function.py); each basic block is straight-line code
(block.py) that masks lazily (masking.py) and reaches the stack and context directly where
it can (access.py). The statements come from vm.ops, as in the interpreter (alu.py), jumps
and calls from vm.insn (control.py), and the spelling shared by all of them, with the globals
the generated code runs with, from emit.py. The tiers must agree on every program: the
differential tests (tests/vm) run both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..insn import call_target, is_local_call, subprograms
from ..isa import Insn
from .control import FELL_OFF
from .emit import fault, namespace
from .function import function_source

if TYPE_CHECKING:
    from ..program import Program

__all__ = ["Entry", "compile_program"]

Entry = Callable[..., int]


def compile_program(prog: Program) -> Entry:
    """Translate `prog` to one Python function per subprogram; returns the entry's."""
    insns = prog.decoded
    source = []
    for start, end in subprograms(insns):
        source += function_source(insns, start, end, start not in prog.stackless_functions)
    for target in _calls_outside(insns):  # (unverified code)
        source += [f"def f{target}(*args):", f"    {fault(FELL_OFF, target)}"]
    text = "\n".join(source)
    globals_ = namespace(prog)
    exec(compile(text, f"<bpf prog {prog.name or prog.tag}>", "exec"), globals_)
    entry = globals_["f0"]
    entry.source = text  # for debugging: print(prog.entry("compiled").source)
    return entry


def _calls_outside(insns: list[Insn]) -> list[int]:
    """Targets of bpf-to-bpf calls that lie outside the program."""
    return sorted({call_target(i, pc) for pc, i in enumerate(insns) if is_local_call(i)}
                  - set(range(len(insns))))
