"""The two tiers agree on every program: an ISA table of edge cases and seeded random
programs, each run on the reference interpreter and the compiled tier."""

from __future__ import annotations

import pytest
from isa_cases import CASES, returns64
from progs import ETH_IPV4, load, random_program
from tiers import TIERS

PACKET = ETH_IPV4 + bytes(range(64))


def r0_of(code: bytes, tier: str, data: bytes = PACKET) -> int:
    return load(code).test_run(data, tier=tier).retval


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_isa_case(name: str, tier: str) -> None:
    body, expected = CASES[name]
    assert r0_of(returns64(*body), tier) == expected


@pytest.mark.parametrize("seed", range(150))
def test_random_programs_agree_across_tiers(seed: int) -> None:
    code = random_program(seed, packet=seed % 3 == 0)
    results = {tier: load(code).test_run(PACKET, tier=tier) for tier in TIERS}
    assert results["interpreter"].retval == results["compiled"].retval
    assert results["interpreter"].data_out == results["compiled"].data_out
