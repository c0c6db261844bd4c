"""The embedded eBPF VM: maps, verifier, two execution tiers, helpers and contexts.

A library with no knowledge of trio, sockets or FUSE: the daemon loads programs with
`load_program` and runs them with `Program.test_run`; tests and benchmarks use it directly.
"""

from .disasm import disassemble, format_insn
from .env import PerfEvent, RunEnv
from .errors import BpfError, MemoryFault, VmFault
from .helpers import HELPERS
from .memory import Memory
from .program import DEFAULT_TIER, Program, load_program
from .run import Run, TestRunResult, check_packets

__all__ = ["DEFAULT_TIER", "HELPERS", "BpfError", "Memory", "MemoryFault", "PerfEvent",
           "Program", "Run", "RunEnv", "TestRunResult", "VmFault", "check_packets",
           "disassemble", "format_insn", "load_program"]
