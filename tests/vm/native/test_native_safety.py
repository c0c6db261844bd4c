"""tests/vm/test_safety.py's cases on the native tier: map values bounded by value_size (now
that lookups map them natively), map pointers, budgets, invalid accesses."""

from __future__ import annotations

import pytest

pytest.importorskip("llvmlite")

import test_safety


@pytest.mark.parametrize("case", [
    test_safety.test_a_map_value_is_bounded_by_value_size,
    test_safety.test_a_map_pointer_cannot_be_dereferenced,
    test_safety.test_the_budget_stops_a_runaway_loop,
    test_safety.test_a_fault_leaves_earlier_writes_of_the_run_in_place,
    test_safety.test_socket_filters_see_tc_classid_as_unreadable_by_the_verifier_not_the_vm,
], ids=lambda f: f.__name__)
def test_safety_case_natively(case) -> None:  # type: ignore[no-untyped-def]
    case("native")


@pytest.mark.parametrize(("code", "message"), next(
    m.args[1] for m in test_safety.test_invalid_accesses_stop_the_program.pytestmark
    if m.args[0] == "code,message"))
def test_invalid_accesses_stop_the_program_natively(code: bytes, message: str) -> None:
    test_safety.test_invalid_accesses_stop_the_program(code, message, "native")
