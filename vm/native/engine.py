"""LLVM through llvmlite: IR text in, addresses of machine code out.

One MCJIT engine per program owns its code: the code lives as long as the engine, which the
program's entry keeps. An engine takes ownership of (and frees) the target machine it is given,
so each gets its own; the optimisation passes share one per level. Engines are never freed by
the garbage collector (which finalises a cycle's objects in any order, and would free a
module's LLVM context before its engine): a dropped program's engine is `release`d and closed,
engine first, by the next compile.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import llvmlite.binding as llvm

from . import QUICK

DEFAULT_OPT = 2
# QUICK, the quick first compile (background.py tiers large programs up in two steps): SROA,
# which puts the registers in SSA form, instcombine and simplifycfg, then the machine code of
# -O0 (fast instruction selection). About a third of -O2's time on a large program.
_QUICK_PASSES = ("add_sroa_pass", "add_instruction_combine_pass", "add_simplify_cfg_pass")
_lock = threading.Lock()  # LLVM's global state (target init, machines) is made once
_compile_lock = threading.Lock()
_machines: dict[int, llvm.TargetMachine] = {}


def _new_machine(opt: int) -> llvm.TargetMachine:
    with _lock:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        target = llvm.Target.from_triple(llvm.get_process_triple())
        return target.create_target_machine(
            cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(),
            opt=opt, jit=True)


def _machine(opt: int) -> llvm.TargetMachine:
    """The shared machine of a level (never given to an engine)."""
    machine = _machines.get(opt)
    if machine is None:
        machine = _machines.setdefault(opt, _new_machine(opt))
    return machine


def triple_and_layout() -> tuple[str, str]:
    """What the IR module must declare to be compiled for this process."""
    machine = _machine(DEFAULT_OPT)
    return machine.triple, str(machine.target_data)


@dataclass
class Jitted:
    """Machine code of one module: keep this object alive while its functions may run. The
    module holds its own LLVM context, which outlives the engine through it."""

    engine: llvm.ExecutionEngine
    module: llvm.ModuleRef

    def address(self, name: str) -> int:
        return self.engine.get_function_address(name)

    def optimized_ir(self) -> str:
        """The module after optimisation (for reading, and for tests of the translation)."""
        return str(self.module)


_released: list[Jitted] = []


def release(jitted: Jitted) -> None:
    """The code is no longer needed (a finaliser calls this: no LLVM work here)."""
    _released.append(jitted)


def _close_released() -> None:
    while _released:
        _released.pop().engine.close()  # then the module, then its context, by refcount


def jit(ir_text: str, opt: int = DEFAULT_OPT) -> Jitted:
    """Parse, verify, optimise (the default pipeline at -O`opt`, or QUICK's) and compile a
    module. Each module gets an LLVM context of its own (programs compile in worker threads,
    and LLVM's global context is not thread-safe); compiles are serialised all the same
    (they share a target machine per level)."""
    with _compile_lock:
        _close_released()
        level = max(opt, 0)
        machine = _machine(level)
        module = llvm.parse_assembly(ir_text, context=llvm.create_context())
        module.verify()
        if opt == QUICK:
            builder = llvm.create_pass_builder(machine,
                                               llvm.create_pipeline_tuning_options(1))
            passes = llvm.create_new_function_pass_manager()
            for add in _QUICK_PASSES:
                getattr(passes, add)()
            for fn in module.functions:
                if not fn.is_declaration:
                    passes.run(fn, builder)
        elif opt:
            tuning = llvm.create_pipeline_tuning_options(speed_level=opt)
            builder = llvm.create_pass_builder(machine, tuning)
            builder.getModulePassManager().run(module, builder)
        engine = llvm.create_mcjit_compiler(module, _new_machine(level))
        engine.finalize_object()
        return Jitted(engine, module)
