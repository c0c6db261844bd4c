"""Faults, the budget, helpers, map values mapped during a run, bpf-to-bpf and tail calls
behave on the native tier exactly as on the interpreter: same exception class and message,
same errno through test_run, same stack and budget left."""

from __future__ import annotations

import errno

import pytest

pytest.importorskip("llvmlite")

from native_cases import PACKET, REFERENCE, outcome

from bpffs.vm import BpfError, MemoryFault, VmFault, asm, load_program
from bpffs.vm.context import SKB
from bpffs.vm.env import RunEnv
from bpffs.vm.isa import R0, R1, R2, R3, R6, R7, R10, U64, Alu, Atomic, Jmp, decode
from bpffs.vm.maps import create_map
from bpffs.vm.memory import STACK_REGION, region_base
from bpffs.vm.program import Program
from bpffs.vm.run import Run
from bpffs.vm.uapi import Helper, MapType, ProgType

TIERS = ("interpreter", "compiled", "native")


def same(code: bytes, budget: int = RunEnv.budget, maps: dict | None = None, **kw) -> str:
    """The outcome on the native tier, checked equal to the interpreter's."""
    native = outcome(code, "native", budget, maps, **kw)
    assert native == outcome(code, REFERENCE, budget, maps, **kw)
    return native.result


def test_test_run_faults_are_efault_with_the_interpreter_s_message() -> None:
    code = asm.program(asm.ldx(4, R0, R1, 1000), asm.exit())
    messages = []
    for tier in TIERS:
        prog, _ = load_program(ProgType.SCHED_CLS, code, license="GPL", resolve_map={}.get,
                               verify=False)
        with pytest.raises(BpfError) as info:
            prog.test_run(PACKET, tier=tier)
        assert info.value.errno == errno.EFAULT
        messages.append(str(info.value))
    assert len(set(messages)) == 1 and "offset 1000 of context" in messages[0]


# (tests/vm/test_safety.py runs its invalid accesses on every tier, the native one included)
@pytest.mark.parametrize("code,message", [
    (asm.program(asm.mov64_reg(R2, R10), asm.add64_imm(R10, -8), asm.st(8, R10, 0, 0x55),
                 asm.ldx(8, R0, R2, -8), asm.exit()), "r0=0x55"),
    (asm.program(asm.ld_imm64(R1, region_base(STACK_REGION) + 504), asm.ldx(8, R0, R1, 0),
                 asm.exit()), "not a mapped region"),  # no r10: no stack is mapped
    (asm.program(asm.mov64_imm(R0, 1), asm.ja(100), asm.exit()), "insn 102: fell off"),
    (asm.program(asm.mov64_imm(R0, 1), asm.ja(1), asm.ld_imm64(R1, 5), asm.exit()),
     "insn 3: unknown opcode 0x00"),
    (asm.program(asm.mov64_imm(R0, 1)), "insn 1: fell off"),
    (asm.program(asm.call(9999), asm.exit()), "insn 0: call to unknown helper 9999"),
    (asm.program(asm.call_local(-1), asm.exit()), "insn 0: call depth above 8 frames"),
    (asm.program(asm.call_local(5), asm.exit()), "insn 6: fell off"),
], ids=["moved r10", "forged stack", "jump out", "into ld_imm64", "no exit", "unknown helper",
        "recursion without end", "call outside"])
def test_faults_are_the_interpreter_s(code: bytes, message: str) -> None:
    assert message in same(code)


@pytest.mark.parametrize("budget", [1, 2, 3, 10, 101, 1000])
def test_the_budget_runs_out_at_the_same_insn_with_the_same_stack(budget: int) -> None:
    code = asm.program(asm.st(8, R10, -8, 0), asm.mov64_imm(R0, 0),
                       asm.add64_imm(R0, 1), asm.stx(8, R10, R0, -8),
                       asm.st(1, R10, -16, 1), asm.ja(-4))
    assert "instruction budget exhausted" in same(code, budget)


@pytest.mark.parametrize("budget", [5, 50, 500, 5000])
def test_the_budget_is_shared_with_callees(budget: int) -> None:
    """A loop calling a function that loops: the budget runs out inside either."""
    code = asm.program(asm.mov64_imm(R6, 0),
                       asm.mov64_imm(R1, 3), asm.call_local(4), asm.add64_imm(R6, 1),
                       asm.jmp_imm(Jmp.JLT, R6, 30, -4), asm.mov64_reg(R0, R6), asm.exit(),
                       asm.st(8, R10, -8, 7),
                       asm.alu64(Alu.SUB, R1, imm=1, reg=False),
                       asm.jmp_imm(Jmp.JNE, R1, 0, -2), asm.ldx(8, R0, R10, -8), asm.exit())
    same(code, budget)
    assert same(code) == "r0=0x1e"


def test_calls_nest_eight_frames_deep_and_no_deeper() -> None:
    def chain(depth: int) -> bytes:  # each function calls the next; the last returns 7
        body = []
        for n in range(depth - 1):
            body += [asm.st(8, R10, -8, n), asm.call_local(2), asm.exit(), asm.exit()]
        return asm.program(*body, asm.mov64_imm(R0, 7), asm.exit())

    assert same(chain(8)) == "r0=0x7"
    assert "call depth above 8 frames" in same(chain(9))


def _lookup(map_fd: int, key_slot: int = -4) -> list:
    return [asm.mov64_reg(R2, R10), asm.add64_imm(R2, key_slot), asm.ld_map_fd(R1, map_fd),
            asm.call(Helper.map_lookup_elem)]


def test_a_helper_that_raises_stops_the_run_with_its_fault() -> None:
    code = asm.program(asm.mov64_imm(R1, 3), asm.mov64_reg(R2, R10),
                       asm.call(Helper.map_lookup_elem), asm.exit())
    assert "is not a map of this program" in same(code)


def test_hundreds_of_map_values_mapped_during_one_run_are_reachable() -> None:
    """Each lookup maps a new region (the table grows past its first size); each value is
    written through its own pointer, then all are checked."""
    results = {}
    for tier in TIERS:
        m = create_map(MapType.ARRAY, 4, 8, 300)
        code = asm.program(
            asm.mov64_imm(R6, 0),
            asm.stx(4, R10, R6, -4), *_lookup(9),
            asm.jmp_imm(Jmp.JEQ, R0, 0, 3),
            asm.ldx(8, R1, R0, 0), asm.alu64(Alu.ADD, R1, R6, reg=True),
            asm.stx(8, R0, R1, 0),
            asm.add64_imm(R6, 1), asm.jmp_imm(Jmp.JLT, R6, 300, -12),
            asm.mov64_reg(R0, R6), asm.exit())
        results[tier] = (outcome(code, tier, maps={9: m}),
                         [m.lookup_copy(n.to_bytes(4, "little")) for n in range(300)])
        assert results[tier][1][299] == (299).to_bytes(8, "little")
    assert results["native"] == results["interpreter"] == results["compiled"]


def test_a_read_only_region_can_be_read_and_not_written() -> None:
    """No helper maps one yet; the table's write limit must still refuse the write, also of
    an atomic, but not of a cmpxchg that does not store."""
    def run_on(code: bytes, tier: str) -> str:
        prog = Program(ProgType.SOCKET_FILTER, code, decode(code), [], name="ro",
                       license="GPL", kern_version=0)
        run = Run(prog, RunEnv(), None, bytearray(8))
        addr = run.mem.add(memoryview(bytes(range(16))), False, "read-only buffer")
        try:
            return f"r0={prog.entry(tier)(run, addr):#x}"
        except VmFault as e:
            return f"{type(e).__name__}: {e}"

    cases = [asm.program(asm.ldx(8, R0, R1, 8), asm.exit()),
             asm.program(asm.st(1, R1, 0, 1), asm.exit()),
             asm.program(asm.mov64_imm(R0, 99), asm.mov64_imm(R2, 1),
                         asm.atomic(8, Atomic.CMPXCHG, R1, R2, 0), asm.exit()),
             asm.program(asm.mov64_imm(R0, 0x03020100), asm.mov64_imm(R2, 1),
                         asm.atomic(4, Atomic.CMPXCHG, R1, R2, 0), asm.exit()),
             asm.program(asm.mov64_imm(R2, 1), asm.atomic(4, Atomic.ADD, R1, R2, 12),
                         asm.exit()),
             asm.program(asm.mov64_imm(R2, 1), asm.atomic(4, Atomic.ADD, R1, R2, 14),
                         asm.exit())]
    got = [[run_on(code, tier) for code in cases] for tier in ("interpreter", "native")]
    assert got[0] == got[1]
    assert got[1][0] == "r0=0xf0e0d0c0b0a0908"
    assert got[1][1].startswith("MemoryFault: write of 1 bytes into read-only")
    assert got[1][2] == "r0=0x706050403020100"
    assert "read-only" in got[1][3] and "read-only" in got[1][4]
    assert "invalid read of 4 bytes at offset 14" in got[1][5]


def test_tail_calls_replace_the_program_up_to_the_limit() -> None:
    counts = []
    for tier in TIERS:
        counter = create_map(MapType.ARRAY, 4, 8, 1)
        progs = create_map(MapType.PROG_ARRAY, 4, 4, 1)
        code = asm.program(
            asm.mov64_reg(R6, R1),
            asm.st(4, R10, -4, 0), *_lookup(1),
            asm.jmp_imm(Jmp.JEQ, R0, 0, 2),
            asm.mov64_imm(R1, 1), asm.atomic(8, Atomic.ADD, R0, R1, 0),
            asm.mov64_reg(R1, R6), asm.ld_map_fd(R2, 2), asm.mov64_imm(R3, 0),
            asm.call(Helper.tail_call),
            asm.mov64_imm(R0, 7), asm.exit())
        prog, _ = load_program(ProgType.SCHED_CLS, code, license="GPL",
                               resolve_map={1: counter, 2: progs}.__getitem__)
        progs.put(bytes(4), prog)
        result = prog.test_run(PACKET, tier=tier)
        counts.append((result.retval, counter.lookup_copy(bytes(4))))
    assert counts[0] == counts[1] == counts[2]
    assert int.from_bytes(counts[2][1], "little") == 34  # the first run and 33 tail calls


def test_a_tail_call_in_a_callee_returns_to_the_callee_s_caller() -> None:
    target, _ = load_program(ProgType.SCHED_CLS, asm.program(asm.mov64_imm(R0, 42),
                                                             asm.exit()),
                             license="GPL", resolve_map={}.get)
    progs = create_map(MapType.PROG_ARRAY, 4, 4, 1)
    progs.put(bytes(4), target)
    code = asm.program(asm.mov64_imm(R6, 100), asm.call_local(2),
                       asm.alu64(Alu.ADD, R0, R6, reg=True), asm.exit(),
                       asm.mov64_imm(R6, 5), asm.ld_map_fd(R2, 9),
                       asm.mov64_imm(R3, 0), asm.call(Helper.tail_call),
                       asm.mov64_imm(R0, 7), asm.exit())
    assert same(code, maps={9: progs}) == "r0=0x8e"  # 142


def test_ld_abs_beyond_the_packet_ends_the_program_from_a_callee_too() -> None:
    code = asm.program(asm.mov64_reg(R6, R1), asm.mov64_imm(R7, 3), asm.call_local(2),
                       asm.mov64_imm(R0, 9), asm.exit(),
                       asm.ld_abs(2, 12), asm.ld_ind(4, R7, 10_000), asm.exit())
    assert same(code) == "r0=0x0"
    inside = asm.program(asm.mov64_reg(R6, R1), asm.mov64_imm(R7, -3), asm.ld_abs(2, 12),
                         asm.mov64_reg(R1, R0), asm.ld_ind(1, R7, 20),
                         asm.alu64(Alu.LSH, R1, imm=8, reg=False),
                         asm.alu64(Alu.OR, R0, R1, reg=True), asm.exit())
    assert same(inside) == f"r0={(0x0800 << 8) | PACKET[17]:#x}"


def test_context_fields_written_natively_are_seen_by_the_run() -> None:
    code = asm.program(asm.st(4, R1, SKB["tc_classid"], 0x10002), asm.mov64_imm(R0, 0),
                       asm.exit())
    for tier in TIERS:
        prog, _ = load_program(ProgType.SCHED_CLS, code, license="GPL", resolve_map={}.get,
                               verify=False)
        assert prog.test_run(PACKET, tier=tier).effects["tc_classid"] == 0x10002


def test_repeated_runs_reuse_the_run_and_its_table() -> None:
    m = create_map(MapType.HASH, 4, 8, 4)
    m.update(bytes(4), bytes(8))
    code = asm.program(asm.st(4, R10, -4, 0), *_lookup(9), asm.jmp_imm(Jmp.JEQ, R0, 0, 2),
                       asm.mov64_imm(R1, 1), asm.atomic(8, Atomic.ADD, R0, R1, 0),
                       asm.mov64_imm(R0, 0), asm.exit())
    prog, _ = load_program(ProgType.SCHED_CLS, code, license="GPL", resolve_map={9: m}.get)
    prog.test_run(PACKET, repeat=50, tier="native")
    assert int.from_bytes(m.lookup_copy(bytes(4)), "little") == 50


def test_u64_results_are_whole() -> None:
    code = asm.program(asm.ld_imm64(R0, U64), asm.alu64(Alu.MUL, R0, R0, reg=True),
                       asm.add64_imm(R0, -3), asm.exit())
    assert same(code) == f"r0={(1 - 3) & U64:#x}"


def test_memory_faults_are_memory_fault_instances() -> None:
    code = asm.program(asm.ldx(8, R0, R10, 0), asm.exit())
    prog, _ = load_program(ProgType.SCHED_CLS, code, license="GPL", resolve_map={}.get,
                           verify=False)
    run = Run.for_test(prog, PACKET, None, RunEnv())
    with pytest.raises(MemoryFault, match="offset 512 of stack of frame 0"):
        prog.execute(run, "native")
