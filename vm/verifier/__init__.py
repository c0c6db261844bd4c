"""The verifier: BPF_PROG_LOAD's static checks (kernel/bpf/verifier.c).

`verify` is called by vm.program.load_program on every load. cfg.py holds the control-flow
checks (valid opcodes, reserved fields, jump ranges, unreachable instructions, back-edges,
helper calls allowed for the program type and license).
"""

from .cfg import verify

__all__ = ["verify"]
