"""The native tier: each program translated to LLVM IR (ir.py) and compiled to machine code
with llvmlite (engine.py); memory, budget and calls behave as on the other tiers, through a
region table and a context struct shared with Python (abi.py, regions.py, glue.py). Map
lookups and updates of present keys run natively on the maps' shared memory (maps.py); the
"auto" tier compiles programs in a background thread and switches them over (background.py).

llvmlite is optional: `available()` says whether this tier can run here, and nothing in this
package is imported by the rest of the VM until a program asks for it.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from importlib.util import find_spec
from typing import TYPE_CHECKING

from ..errors import BpfError

if TYPE_CHECKING:
    from ..program import Program

__all__ = ["NATIVE_MAX_INSNS", "QUICK", "QUICK_FIRST_INSNS", "available", "compile_native",
           "compile_tiers"]

# Larger programs run on the compiled tier instead: LLVM's time grows faster than linearly
# with the size of a function (see bench/vm.py for measured compile times).
NATIVE_MAX_INSNS = 65_536
# From this size on, tiering up compiles quick code first (QUICK, about a third of
# -O2's time), then -O2's from the same IR: 1,000 insns take ~50 ms at -O2, 4,096 up to ~2 s.
QUICK_FIRST_INSNS = 1024
# The quick first compile's level (engine.QUICK's pipeline; defined here, where the tiering
# is, because engine imports llvmlite and this package may not).
QUICK = -1


def available() -> bool:
    """Whether llvmlite is installed (the tier's one dependency)."""
    return find_spec("llvmlite") is not None


def compile_native(prog: Program, opt: int | None = None,
                   translated: Callable[..., int] | None = None) -> Callable[..., int]:
    """The native entry of `prog`, `entry(run, r1, r2=0, depth=0) -> r0`, as the other tiers'
    entries, compiled at `opt` (engine's DEFAULT_OPT, or QUICK), from the IR of `translated`
    (the same program's entry at another level) where given; BpfError(EOPNOTSUPP) where
    llvmlite is missing."""
    try:
        from .engine import DEFAULT_OPT
        from .glue import NativeProgram
    except ImportError as e:
        raise BpfError(errno.EOPNOTSUPP, f"the native tier needs llvmlite ({e})") from None
    return NativeProgram(prog, DEFAULT_OPT if opt is None else opt, translated)


def compile_tiers(prog: Program) -> Iterator[Callable[..., int]]:
    """The native entries of `prog` as they get better, for the background thread to switch
    to in turn: quick code first where the program is long (QUICK_FIRST_INSNS), then -O2's."""
    quick = None
    if len(prog.decoded) >= QUICK_FIRST_INSNS:
        quick = compile_native(prog, QUICK)
        yield quick
    yield compile_native(prog, translated=quick)
