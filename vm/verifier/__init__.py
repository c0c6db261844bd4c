"""The verifier: BPF_PROG_LOAD's static checks (kernel/bpf/verifier.c), run on every load.

cfg.py checks the shape and control flow (check_subprogs, check_cfg), check.py walks every
path with an abstract state of registers and stack (do_check; one frame per function on the
call stack, bpf-to-bpf callees walked per call chain), state.py holds that state and
liveness.py says what of it is still read at each instruction (for pruning). The control flow
comes from vm.insn, computed once per program. A rejected program is EACCES (EINVAL for
malformed instructions, E2BIG when too complex) and the error carries the log so far, as the
kernel writes it into the caller's log buffer.
"""

from __future__ import annotations

from ..insn import flow
from ..isa import Insn
from ..maps import BpfMap
from .cfg import Rejected, check_cfg
from .check import do_check
from .liveness import live_in

__all__ = ["Rejected", "verify"]


def verify(prog_type: int, insns: list[Insn], maps: list[BpfMap], *, license: str,
           privileged: bool, log_level: int, allow_loops: bool = False) -> str:
    """The verifier log of an accepted program; raises Rejected (a BpfError with `.log`)."""
    from ..program import GPL_COMPATIBLE

    log: list[str] = []
    cfg = flow(insns)  # successors of every insn, computed once for every pass
    check_cfg(prog_type, insns, cfg, license in GPL_COMPATIBLE, allow_loops, log, privileged)
    do_check(prog_type, insns, cfg, live_in(insns, cfg), maps, privileged, allow_loops, log,
             verbose=log_level > 0)
    return "\n".join(log) + "\n" if log_level else ""
