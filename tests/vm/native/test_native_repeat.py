"""BPF_PROG_TEST_RUN's repeat loop in native code gives what the Python tiers give: the same
skb carried from one repetition to the next (a mark counted up), maps counted up, helpers
that run in Python (and map values they map) in the middle of the loop, tail calls, a fault
at the Nth repetition, and the program's run count."""

from __future__ import annotations

import pytest

pytest.importorskip("llvmlite")

from native_cases import PACKET

from bpffs.vm import BpfError, asm, load_program
from bpffs.vm.context import SKB
from bpffs.vm.isa import R0, R1, R2, R3, R6, R7, R10, Atomic, Jmp
from bpffs.vm.maps import create_map
from bpffs.vm.uapi import Helper, MapType, ProgType

TIERS = ("interpreter", "compiled", "native")


def repeated(code: bytes, tier: str, repeat: int, maps: dict | None = None) -> tuple:
    prog, _ = load_program(ProgType.SCHED_CLS, code, license="GPL",
                           resolve_map=(maps or {}).__getitem__, verify=False)
    try:
        result = prog.test_run(PACKET, repeat=repeat, tier=tier)
        outcome = (result.retval, result.data_out, result.effects)
    except BpfError as e:
        outcome = (e.errno, e.strerror)
    return outcome, prog.run_cnt


def agree(make, repeat: int) -> tuple:
    got = {tier: make(tier, repeat) for tier in TIERS}
    assert got["native"] == got["compiled"] == got["interpreter"]
    return got["native"]


COUNT_MARK = asm.program(  # mark += 1; r0 = mark: the skb is not reset between repetitions
    asm.ldx(4, R0, R1, SKB["mark"]), asm.add64_imm(R0, 1), asm.stx(4, R1, R0, SKB["mark"]),
    asm.exit())


@pytest.mark.parametrize("repeat", [1, 2, 7, 1000, 70_000])
def test_the_skb_carries_over_from_one_repetition_to_the_next(repeat: int) -> None:
    (retval, _, effects), runs = agree(lambda t, n: repeated(COUNT_MARK, t, n), repeat)
    assert retval == repeat == effects["mark"] == runs


def counter(map_type: int, python_helper: bool, fault_at: int = 0) -> tuple[bytes, dict]:
    """Count the runs in a map value (a native lookup), maybe calling a Python helper after
    the lookup (which maps the value in Memory: the loop stops and goes on), maybe reading
    past the context at the `fault_at`th run."""
    m = create_map(map_type, 4, 8, 1)
    if map_type == MapType.HASH:
        m.update(bytes(4), bytes(8))
    body = [asm.mov64_reg(R6, R1), asm.st(4, R10, -4, 0), asm.mov64_reg(R2, R10),
            asm.add64_imm(R2, -4), asm.ld_map_fd(R1, 1), asm.call(Helper.map_lookup_elem),
            asm.jmp_imm(Jmp.JNE, R0, 0, 1), asm.exit(), asm.mov64_reg(R7, R0),
            asm.mov64_imm(R1, 1), asm.atomic(8, Atomic.ADD | Atomic.FETCH, R7, R1, 0)]
    if python_helper:
        body += [asm.call(Helper.get_prandom_u32)]
    if fault_at:
        body += [asm.jmp_imm(Jmp.JNE, R1, fault_at - 1, 1), asm.ldx(4, R0, R6, 500)]
    body += [asm.ldx(8, R0, R7, 0), asm.exit()]
    return asm.program(*body), {1: m}


@pytest.mark.parametrize("python_helper", [False, True])
@pytest.mark.parametrize("map_type", [MapType.ARRAY, MapType.HASH])
def test_maps_count_every_repetition(map_type: int, python_helper: bool) -> None:
    def make(tier: str, n: int) -> tuple:
        code, maps = counter(map_type, python_helper)
        return repeated(code, tier, n, maps), maps[1].lookup_copy(bytes(4))

    (outcome, runs), value = agree(make, 3000)
    assert outcome[0] == runs == int.from_bytes(value, "little") == 3000


@pytest.mark.parametrize("fault_at", [1, 2, 50, 2999])
def test_a_fault_at_the_nth_repetition_stops_the_run_there(fault_at: int) -> None:
    def make(tier: str, n: int) -> tuple:
        code, maps = counter(MapType.ARRAY, False, fault_at)
        return repeated(code, tier, n, maps), maps[1].lookup_copy(bytes(4))

    (outcome, runs), value = agree(make, 3000)
    assert outcome[0] == 14 and "offset 500 of context" in outcome[1]  # EFAULT
    assert runs == fault_at - 1 and int.from_bytes(value, "little") == fault_at


def test_tail_calls_and_redirects_repeat_too() -> None:
    """Each repetition redirects (to 3, then 4 from the tail call's target) and counts its
    tail calls; the last redirect is the result's, as it would be on one run."""
    def make(tier: str, n: int) -> tuple:
        progs = create_map(MapType.PROG_ARRAY, 4, 4, 1)
        target, _ = load_program(ProgType.SCHED_CLS, asm.program(
            asm.mov64_imm(R1, 4), asm.mov64_imm(R2, 0), asm.call(Helper.redirect),
            asm.exit()), license="GPL", resolve_map={}.get)
        progs.put(bytes(4), target)
        code = asm.program(asm.mov64_reg(R6, R1), asm.mov64_imm(R1, 3), asm.mov64_imm(R2, 1),
                           asm.call(Helper.redirect), asm.mov64_reg(R1, R6),
                           asm.ld_map_fd(R2, 2), asm.mov64_imm(R3, 0),
                           asm.call(Helper.tail_call), asm.exit())
        return repeated(code, tier, n, {2: progs})

    (retval, _, effects), runs = agree(make, 500)
    assert effects["redirect"] == {"ifindex": 4, "ingress": False} and runs == 500
    assert retval == 7  # TC_ACT_REDIRECT


def test_a_map_value_python_saw_is_unmapped_for_the_next_repetition() -> None:
    """The first repetition looks up a value (natively) and calls a Python helper (Memory
    adopts the value); the second reads that value's address without a lookup: unmapped
    there, on every tier."""
    from bpffs.vm.isa import R8
    from bpffs.vm.memory import FIRST_DYNAMIC_REGION, region_base

    def make(tier: str, n: int) -> tuple:
        m = create_map(MapType.ARRAY, 4, 8, 1)
        code = asm.program(
            asm.mov64_reg(R6, R1), asm.ldx(4, R8, R6, SKB["mark"]),
            asm.jmp_imm(Jmp.JNE, R8, 0, 10),
            asm.st(4, R6, SKB["mark"], 1), asm.st(4, R10, -4, 0), asm.mov64_reg(R2, R10),
            asm.add64_imm(R2, -4), asm.ld_map_fd(R1, 1), asm.call(Helper.map_lookup_elem),
            asm.call(Helper.get_prandom_u32), asm.mov64_imm(R0, 0), asm.exit(),
            asm.ld_imm64(R7, region_base(FIRST_DYNAMIC_REGION)), asm.ldx(8, R0, R7, 0),
            asm.exit())
        return repeated(code, tier, n, {1: m})

    (outcome, runs) = agree(make, 2)
    assert outcome[0] == 14 and "not a mapped region" in outcome[1] and runs == 1


TAIL_CALL = [asm.ld_map_fd(R2, 2), asm.mov64_imm(R3, 0), asm.call(Helper.tail_call),
             asm.mov64_imm(R0, 99), asm.exit()]  # 99 where the tail call failed


def prog_array(target_code: bytes) -> dict:
    """Map fd 2: a prog array whose slot 0 holds `target_code`."""
    progs = create_map(MapType.PROG_ARRAY, 4, 4, 1)
    target, _ = load_program(ProgType.SCHED_CLS, target_code, license="GPL",
                             resolve_map={}.get, verify=False)
    progs.put(bytes(4), target)
    return {2: progs}


@pytest.mark.parametrize("from_callee", [False, True])
def test_each_repetition_has_its_own_tail_call_count(from_callee: bool) -> None:
    """Over 33 tail calls in one run fail; over a repeat loop they are counted per
    repetition (Run.reset), however many run in one step of native code."""
    def make(tier: str, n: int) -> tuple:
        code = asm.program(asm.call_local(1), asm.exit(), *TAIL_CALL) if from_callee else \
            asm.program(*TAIL_CALL)
        return repeated(code, tier, n, prog_array(asm.program(asm.mov64_imm(R0, 1),
                                                             asm.exit())))

    (retval, _, _), runs = agree(make, 200)
    assert retval == 1 and runs == 200


def test_a_fault_in_a_tail_call_s_target_counts_the_repetitions_before_it() -> None:
    """The 10th repetition tail-calls a target that faults: 9 ran, on every tier."""
    def make(tier: str, n: int) -> tuple:
        code = asm.program(
            asm.ldx(4, R0, R1, SKB["mark"]), asm.add64_imm(R0, 1),
            asm.stx(4, R1, R0, SKB["mark"]), asm.jmp_imm(Jmp.JEQ, R0, 10, 2),
            asm.mov64_imm(R0, 0), asm.exit(), *TAIL_CALL)
        return repeated(code, tier, n, prog_array(asm.program(asm.ldx(4, R0, R1, 500),
                                                             asm.exit())))

    (outcome, runs) = agree(make, 100)
    assert outcome[0] == 14 and "offset 500 of context" in outcome[1] and runs == 9
