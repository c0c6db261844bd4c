"""The native tier agrees with the reference interpreter: the ISA edge cases, the seeded
random programs of the tier tests, the compiled tier's lazy-masking programs, and unverified
programs with loops, recursion, atomics, invalid instructions and small budgets, compared on
the full 64-bit r0 or the fault, the stack and the budget left."""

from __future__ import annotations

import pytest

pytest.importorskip("llvmlite")

from isa_cases import CASES, returns64
from native_cases import PACKET, REFERENCE, outcome, wild_program
from progs import load, random_program
from test_compiled_tier import lazy_heavy_program

TIERS = ("interpreter", "compiled", "native")


@pytest.mark.parametrize("name", sorted(CASES))
def test_isa_case_natively(name: str) -> None:
    body, expected = CASES[name]
    assert load(returns64(*body)).test_run(PACKET, tier="native").retval == expected


@pytest.mark.parametrize("seed", range(150))
def test_random_programs_agree_across_all_tiers(seed: int) -> None:
    code = random_program(seed, packet=seed % 3 == 0)
    results = {tier: load(code).test_run(PACKET, tier=tier) for tier in TIERS}
    assert results["native"].retval == results["interpreter"].retval == \
        results["compiled"].retval
    assert results["native"].data_out == results["interpreter"].data_out


@pytest.mark.parametrize("seed", range(100))
def test_lazy_masking_programs_agree_natively(seed: int) -> None:
    code = lazy_heavy_program(seed)
    assert outcome(code, "native") == outcome(code, REFERENCE)


@pytest.mark.parametrize("budget", [7, 60, 400, 1_000_000])
@pytest.mark.parametrize("seed", range(60))
def test_wild_programs_end_the_same_way_natively(seed: int, budget: int) -> None:
    code = wild_program(seed)
    assert outcome(code, "native", budget) == outcome(code, REFERENCE, budget)
