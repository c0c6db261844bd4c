"""Fixtures of the client tests: the clang-built examples of tests/elf (same builder, same
session cache key), for the public load_object API."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "bpffs_tests_elf_fixtures", Path(__file__).resolve().parents[1] / "elf" / "conftest.py")
assert _spec is not None and _spec.loader is not None
_elf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_elf)

examples = _elf.examples
build = _elf.build
