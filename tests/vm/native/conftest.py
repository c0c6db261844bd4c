"""The native tier's tests use the VM tests' builders (tests/vm: progs, isa_cases, the
conformance suite's reader and plugin runner) and skip where llvmlite is missing."""

from __future__ import annotations

import sys
from pathlib import Path

VM_TESTS = str(Path(__file__).resolve().parents[1])
if VM_TESTS not in sys.path:
    sys.path.insert(0, VM_TESTS)
