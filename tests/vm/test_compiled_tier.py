"""The compiled tier's shortcuts give the reference interpreter's results bit for bit: lazy
masking (registers left unmasked between ALU ops), direct stack access at r10 + constant, and
functions that never touch r10 running without a stack. Compared on the full 64-bit r0 and the
stack, not only the 32-bit retval a test run reports."""

from __future__ import annotations

import random

import pytest

from bpffs.vm import asm, load_program
from bpffs.vm.env import RunEnv
from bpffs.vm.errors import VmFault
from bpffs.vm.isa import R0, R1, R2, R10, U64, Alu, Atomic, Class, Jmp
from bpffs.vm.memory import STACK_REGION, region_base
from bpffs.vm.run import Run
from bpffs.vm.uapi import ProgType

TIERS = ("interpreter", "compiled")
PACKET = bytes(14) + bytes(range(50))


def start(code: bytes, budget: int = RunEnv.budget) -> tuple:
    prog, _ = load_program(ProgType.SCHED_CLS, code, license="GPL", resolve_map={}.get,
                           verify=False)
    run = Run.for_test(prog, PACKET, None, RunEnv(budget=budget))
    run.reset()
    return prog, run


def stack_of(run: Run) -> bytes:
    stack = run.mem.regions.get(STACK_REGION)
    return bytes(stack.buf) if stack else b""


def execute(code: bytes, tier: str) -> tuple[int, bytes]:
    """Full 64-bit r0 and the frame-0 stack after a run (no verifier: some of these programs
    exist to poke at the VM itself)."""
    prog, run = start(code)
    r0 = prog.execute(run, tier)
    return r0, stack_of(run)


def both(code: bytes) -> tuple[int, bytes]:
    results = {tier: execute(code, tier) for tier in TIERS}
    assert results["interpreter"] == results["compiled"]
    return results["compiled"]


def test_a_store_does_not_make_an_unmasked_r0_exact() -> None:
    """r0 = 2**64 + 1 unmasked after the add; the store in between must not hide that from
    the comparison (the compiled tier used to believe every non-ALU insn wrote r0)."""
    code = asm.program(asm.mov64_imm(R0, -1), asm.add64_imm(R0, 2), asm.stx(8, R10, R1, -8),
                       asm.jmp_imm(Jmp.JEQ, R0, 1, 1), asm.mov64_imm(R0, 7), asm.exit())
    assert both(code)[0] == 1


def test_an_atomic_add_without_fetch_leaves_its_source_register_alone() -> None:
    code = asm.program(asm.st(8, R10, -8, 0), asm.mov64_imm(R1, -1), asm.add64_imm(R1, 3),
                       asm.atomic(8, Atomic.ADD, R10, R1, -8),
                       asm.mov64_imm(R0, 0), asm.jmp_imm(Jmp.JNE, R1, 2, 1),
                       asm.mov64_imm(R0, 1), asm.exit())
    assert both(code)[0] == 1


def test_exit_returns_a_masked_r0_from_a_subprogram() -> None:
    """The callee's r0 overflowed; the caller shifts it right, which needs the exact value."""
    code = asm.program(asm.call_local(3), asm.alu64(Alu.RSH, R0, imm=1, reg=False),
                       asm.exit(), asm.exit(),
                       asm.ld_imm64(R0, U64), asm.alu64(Alu.MUL, R0, R0, reg=True),
                       asm.add64_imm(R0, 3), asm.exit())
    assert both(code)[0] == 2  # (2**64 - 1)**2 + 3 == 4 mod 2**64


def test_a_value_growing_past_the_lazy_bound_is_masked_in_time() -> None:
    code = asm.program(asm.ld_imm64(R0, 0xFFFF_FFFF_FFFF_FFF1),
                       *[asm.alu64(Alu.MUL, R0, R0, reg=True) for _ in range(8)],
                       *[asm.alu64(Alu.LSH, R0, imm=60, reg=False) for _ in range(3)],
                       asm.alu64(Alu.RSH, R0, imm=0, reg=False), asm.exit())
    assert both(code)[0] == 0  # shifted out entirely
    code = asm.program(asm.ld_imm64(R0, 0xFFFF_FFFF_FFFF_FFF1),
                       *[asm.alu64(Alu.MUL, R0, R0, reg=True) for _ in range(8)], asm.exit())
    assert both(code)[0] == pow(0xFFFF_FFFF_FFFF_FFF1, 2 ** 8, 1 << 64)


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_direct_stack_stores_truncate_and_sign_extending_loads_extend(size: int) -> None:
    code = asm.program(asm.ld_imm64(R1, U64), asm.add64_imm(R1, -0x7F),  # ...ff80, unmasked
                       asm.stx(size, R10, R1, -16), asm.st(size, R10, -8, -2),
                       asm.ldxs(size, R0, R10, -16) if size < 8 else asm.ldx(8, R0, R10, -16),
                       asm.ldx(size, R2, R10, -8), asm.alu64(Alu.XOR, R0, R2, reg=True),
                       asm.exit())
    r0, stack = both(code)
    mask = (1 << (size * 8)) - 1
    assert r0 == (0xFFFF_FFFF_FFFF_FF80 ^ (0xFFFF_FFFF_FFFF_FFFE & mask))
    stored = (0xFFFF_FFFF_FFFF_FF80 & mask).to_bytes(size, "little")
    assert stack[512 - 16:512 - 16 + size] == stored


def test_a_program_without_r10_gets_no_stack_in_either_tier() -> None:
    """Nothing maps the stack, so a forged stack address faults the same way in both."""
    assert both(asm.program(asm.mov64_imm(R0, 3), asm.exit())) == (3, b"")
    forged = asm.program(asm.ld_imm64(R1, region_base(STACK_REGION) + 504),
                         asm.ldx(8, R0, R1, 0), asm.exit())
    for tier in TIERS:
        with pytest.raises(VmFault, match="not a mapped region"):
            execute(forged, tier)


def test_a_written_r10_turns_direct_stack_access_off() -> None:
    """Unverified code may move r10; accesses then go through Memory with its checks."""
    code = asm.program(asm.mov64_reg(R2, R10), asm.add64_imm(R10, -8),
                       asm.st(8, R10, 0, 0x55), asm.ldx(8, R0, R2, -8), asm.exit())
    assert both(code)[0] == 0x55


LAZY = [Alu.ADD, Alu.SUB, Alu.MUL, Alu.LSH, Alu.AND, Alu.OR, Alu.XOR, Alu.MOV]
EXACT = [Alu.RSH, Alu.ARSH, Alu.DIV, Alu.MOD]
REGS = [0, 1, 2, 3, 4, 5]


def lazy_heavy_program(seed: int, length: int = 80) -> bytes:
    """Mostly ALU64 ops the compiler leaves unmasked, interleaved with the instructions that
    need exact values (right shifts, division, compares, stores, atomics, 32-bit ops)."""
    rng = random.Random(seed)
    body: list = [asm.ld_imm64(r, rng.getrandbits(64)) for r in REGS]
    body += [asm.st(8, R10, -8 * n, rng.getrandbits(31)) for n in range(1, 5)]
    for _ in range(length):
        kind = rng.random()
        dst, src = rng.choice(REGS), rng.choice(REGS)
        if kind < 0.55:
            op = rng.choice(LAZY)
            if rng.random() < 0.5:
                imm = rng.choice([0, 1, -1, 63, 0x7FFFFFFF, -0x80000000, rng.getrandbits(31)])
                body.append(asm.alu64(op, dst, imm=imm & 63 if op == Alu.LSH else imm,
                                      reg=False))
            else:
                body.append(asm.alu64(op, dst, src, reg=True))
        elif kind < 0.65:
            body.append(asm.alu64(rng.choice(EXACT), dst, src, reg=True))
        elif kind < 0.72:
            body.append(asm.alu32(rng.choice(LAZY + EXACT), dst, src, reg=True))
        elif kind < 0.80:
            size = rng.choice([1, 2, 4, 8])
            body.append(asm.stx(size, R10, src, -8 * rng.randint(1, 4)))
        elif kind < 0.85:
            size = rng.choice([1, 2, 4, 8])
            body.append(asm.ldx(size, dst, R10, -8 * rng.randint(1, 4)))
        elif kind < 0.90:
            op = rng.choice([Atomic.ADD, Atomic.XOR, Atomic.ADD | Atomic.FETCH, Atomic.XCHG,
                             Atomic.CMPXCHG])
            body.append(asm.atomic(rng.choice([4, 8]), op, R10, src, -8 * rng.randint(1, 4)))
        else:
            cls = rng.choice([Class.JMP, Class.JMP32])
            body.append(asm.jmp_reg(rng.choice([Jmp.JEQ, Jmp.JGT, Jmp.JSLT, Jmp.JSET]), dst,
                                    src, rng.randint(0, 2), cls))
            body.append(asm.alu64(Alu.ADD, R0, imm=1, reg=False))
            body.append(asm.alu64(Alu.XOR, dst, src, reg=True))
    body += [asm.alu64(Alu.XOR, R0, r, reg=True) for r in REGS[1:]]
    return asm.program(*body, asm.exit())


@pytest.mark.parametrize("seed", range(300))
def test_lazy_masking_agrees_with_the_interpreter_on_random_programs(seed: int) -> None:
    both(lazy_heavy_program(seed))


@pytest.mark.parametrize("budget", [1, 2, 3, 10, 101, 1000])
def test_both_tiers_run_out_of_budget_at_the_same_insn_with_the_same_stack(budget) -> None:
    """The budget is charged per basic block on entry, in both tiers: the stores a block
    would have made before running out are not made in either."""
    code = asm.program(asm.st(8, R10, -8, 0), asm.mov64_imm(R0, 0),
                       asm.add64_imm(R0, 1), asm.stx(8, R10, R0, -8),
                       asm.st(1, R10, -16, 1), asm.ja(-4))
    outcomes = []
    for tier in TIERS:
        prog, run = start(code, budget)
        with pytest.raises(VmFault, match="instruction budget exhausted") as info:
            prog.execute(run, tier)
        outcomes.append((str(info.value), stack_of(run)))
    assert outcomes[0] == outcomes[1]


def test_a_bad_jump_faults_when_it_runs_not_when_the_program_compiles() -> None:
    code = asm.program(asm.mov64_imm(R0, 1), asm.exit(), asm.ja(100), asm.exit())
    assert both(code)[0] == 1
    reached = asm.program(asm.mov64_imm(R0, 1), asm.ja(100), asm.exit())
    into_ld_imm64 = asm.program(asm.mov64_imm(R0, 1), asm.ja(1), asm.ld_imm64(R1, 5),
                                asm.exit())
    for code, message in ((reached, "insn 102: fell off the end"),
                          (into_ld_imm64, "insn 3: unknown opcode 0x00")):
        for tier in TIERS:
            with pytest.raises(VmFault, match=message):
                execute(code, tier)


def test_context_accesses_follow_the_context_pointer_through_copies_and_joins() -> None:
    """r6 is the context on one path into the last block and the stack on the other: the
    load there must go where r6 points at run time (the compiler may only shortcut loads
    through registers that hold the context on every path)."""
    for take_jump in (0, 1):
        code = asm.program(asm.st(8, R10, -8, 0x77), asm.mov64_reg(6, R1),
                           asm.mov64_imm(R2, take_jump), asm.jmp_imm(Jmp.JEQ, R2, 0, 2),
                           asm.mov64_reg(6, R10), asm.add64_imm(6, -8),
                           asm.ldx(4, R0, 6, 0), asm.exit())
        r0, _ = both(code)
        assert r0 == (0x77 if take_jump else len(PACKET))  # skb->len: the whole frame
    moved = asm.program(asm.mov64_reg(6, R1), asm.add64_imm(6, 4), asm.ldx(4, R0, 6, 0),
                        asm.exit())
    assert both(moved)[0] == execute(asm.program(asm.ldx(4, R0, R1, 4), asm.exit()),
                                     "interpreter")[0]


def test_a_program_run_without_a_context_faults_on_r1_in_both_tiers() -> None:
    """The conformance plugin passes r1 = 0 when the test gives no memory."""
    from bpffs.vm.conformance_plugin import run_hex

    code = asm.program(asm.ldx(4, R0, R1, 0), asm.exit())
    for tier in TIERS:
        with pytest.raises(VmFault, match="not a mapped region"):
            run_hex(code.hex(), "", tier)
        assert run_hex(code.hex(), "2a000000", tier) == 42


@pytest.mark.parametrize("start_value", [-1, -(1 << 40), 1 << 63, 0x1_2345_6789, 7])
def test_a_shift_pair_zero_extension_keeps_the_low_32_bits(start_value: int) -> None:
    """clang's u32 cast `r <<= 32; r >>= 32` becomes one mask in the compiled tier, also on a
    register left unmasked (or negative) by the ops before it; a shift pair that is not
    exactly that (another count, another register, a jump target between) stays two shifts."""
    def shift(op: Alu, dst: int, imm: int):
        return asm.alu64(op, dst, imm=imm, reg=False)

    zext = asm.program(asm.ld_imm64(R0, start_value), asm.add64_imm(R0, 5),
                       asm.alu64(Alu.MUL, R0, imm=3, reg=False), shift(Alu.LSH, R0, 32),
                       shift(Alu.RSH, R0, 32), asm.exit())
    assert both(zext)[0] == ((start_value + 5) * 3) & 0xFFFFFFFF
    other = asm.program(asm.ld_imm64(R0, start_value), shift(Alu.LSH, R0, 32),
                        shift(Alu.RSH, R0, 31), asm.exit())
    both(other)
    across = asm.program(asm.ld_imm64(R0, start_value), asm.mov64_imm(R2, 0),
                         asm.jmp_imm(Jmp.JEQ, R2, 0, 1), shift(Alu.LSH, R0, 32),
                         shift(Alu.RSH, R0, 32), asm.exit())  # the jump lands on the RSH
    assert both(across)[0] == (start_value & U64) >> 32


@pytest.mark.parametrize("size", [1, 2, 4])
def test_ld_abs_at_constant_offsets_reads_the_packet_or_ends_the_program(size: int) -> None:
    """LD_ABS is inlined in the compiled tier: in bounds it reads network order; past the
    end it ends the program with r0 = 0, as the interpreter does."""
    for off in (0, 12, len(PACKET) - size, len(PACKET) - size + 1, 1 << 20):
        code = asm.program(asm.mov64_reg(6, R1), asm.mov64_imm(R0, 99), asm.ld_abs(size, off),
                           asm.exit())
        expected = int.from_bytes(PACKET[off:off + size], "big") \
            if off + size <= len(PACKET) else 0
        assert both(code)[0] == expected


def test_a_jump_back_to_the_first_insn_runs_the_first_block_again() -> None:
    """The first block is compiled outside the block loop unless a jump leads back to it."""
    code = asm.program(asm.add64_imm(R0, 1), asm.jmp_imm(Jmp.JLT, R0, 5, -2), asm.exit())
    assert both(code)[0] == 5
    straight = asm.program(asm.mov64_imm(R0, 3), asm.exit())
    assert both(straight)[0] == 3
