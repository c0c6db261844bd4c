"""The tiers every VM test runs a program on: the two Python tiers, and the native tier
where llvmlite is installed (CI installs it; a test run without it still covers the rest)."""

from __future__ import annotations

from importlib.util import find_spec

TIERS: tuple[str, ...] = ("interpreter", "compiled") + (
    ("native",) if find_spec("llvmlite") is not None else ())
