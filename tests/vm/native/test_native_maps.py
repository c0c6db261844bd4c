"""The native map helpers (vm.native.maps) agree with the Python ones: random sequences of
lookups, updates, deletes and atomic adds leave the same map contents and results on every
tier; hashes equal zlib.crc32 for keys of every size; a value pointer faults past its value
as on the other tiers; values mapped natively are seen by Python helpers that follow."""

from __future__ import annotations

import random
import struct

import pytest

pytest.importorskip("llvmlite")

from native_cases import PACKET, outcome

from bpffs.vm import VmFault, asm, load_program
from bpffs.vm.env import RunEnv
from bpffs.vm.isa import R0, R1, R2, R3, R4, R6, R7, R8, R9, R10, Atomic, Insn, Jmp
from bpffs.vm.maps import create_map
from bpffs.vm.memory import FIRST_DYNAMIC_REGION, region_base
from bpffs.vm.program import Program
from bpffs.vm.run import Run
from bpffs.vm.uapi import BPF_ANY, Helper, MapType, ProgType

TIERS = ("interpreter", "compiled", "native")
FD = 7
MISS = 0xDEAD
OP_LOOKUP, OP_UPDATE, OP_DELETE, OP_ADD, OP_COPY = range(5)


def assemble(*items: Insn | list[Insn] | tuple) -> bytes:
    """asm.program with labels: ("label", name) marks a place, ("jeq", reg, imm, name) jumps
    to one."""
    at, labels, flat = 0, {}, []
    for item in items:
        if isinstance(item, tuple) and item[0] == "label":
            labels[item[1]] = at
            continue
        flat.append((at, item))
        at += 1 if isinstance(item, (Insn, tuple)) else len(item)
    return asm.program(*[asm.jmp_imm(Jmp.JEQ, item[1], item[2], labels[item[3]] - pc - 1)
                         if isinstance(item, tuple) else item for pc, item in flat])


def map_ops() -> bytes:
    """One map operation per packet: op (byte 14), key (u32 at 15), value (u32 at 19, as a
    u64), update flags (byte 23)."""
    return assemble(
        asm.mov64_reg(R6, R1),
        asm.ld_abs(1, 14), asm.mov64_reg(R7, R0),
        asm.ld_abs(4, 15), asm.mov64_reg(R9, R0), asm.stx(4, R10, R0, -4),
        asm.ld_abs(4, 19), asm.stx(8, R10, R0, -16),
        asm.ld_abs(1, 23), asm.mov64_reg(R8, R0),
        asm.mov64_reg(R2, R10), asm.add64_imm(R2, -4),
        asm.ld_map_fd(R1, FD),
        ("jeq", R7, OP_UPDATE, "update"),
        ("jeq", R7, OP_DELETE, "delete"),
        asm.call(Helper.map_lookup_elem),
        ("jeq", R0, 0, "miss"),
        ("jeq", R7, OP_ADD, "add"),
        ("jeq", R7, OP_COPY, "copy"),
        asm.ldx(4, R0, R0, 0),
        asm.exit(),
        ("label", "add"),
        asm.ldx(8, R1, R10, -16),
        asm.atomic(8, Atomic.ADD | Atomic.FETCH, R0, R1, 0),
        asm.mov64_reg(R0, R1),
        asm.exit(),
        ("label", "copy"),  # the value found, by its pointer, to key + 1 (often a new key)
        asm.mov64_reg(R3, R0),
        asm.add64_imm(R9, 1), asm.stx(4, R10, R9, -8),
        asm.mov64_reg(R2, R10), asm.add64_imm(R2, -8),
        asm.ld_map_fd(R1, FD),
        asm.mov64_imm(R4, BPF_ANY),
        asm.call(Helper.map_update_elem),
        asm.exit(),
        ("label", "miss"),
        asm.mov64_imm(R0, MISS),
        asm.exit(),
        ("label", "update"),
        asm.mov64_reg(R3, R10), asm.add64_imm(R3, -16),
        asm.mov64_reg(R4, R8),
        asm.call(Helper.map_update_elem),
        asm.exit(),
        ("label", "delete"),
        asm.call(Helper.map_delete_elem),
        asm.exit())


def packet(op: int, key: int, value: int, flags: int) -> bytes:
    body = struct.pack(">BIIB", op, key, value, flags)
    return PACKET[:14] + body + PACKET[14 + len(body):]


def random_ops(seed: int, map_type: int, n: int = 250) -> list[bytes]:
    rng = random.Random(seed)
    ops = [OP_LOOKUP, OP_UPDATE, OP_ADD, OP_COPY] + ([OP_DELETE] if map_type == MapType.HASH
                                                      else [])
    keys = rng.randint(4, 24)
    return [packet(rng.choice(ops), rng.randrange(keys), rng.getrandbits(32),
                   rng.choice([0, 0, 0, 1, 2, 2, 3, 0xFF])) for _ in range(n)]


def run_ops(map_type: int, packets: list[bytes], tier: str) -> tuple[list[int], list]:
    m = create_map(map_type, 4, 8, 16)
    prog, _ = load_program(ProgType.SCHED_CLS, map_ops(), license="GPL",  # (4.4 refuses
                           resolve_map={FD: m}.__getitem__, verify=False)  # a value's pointer
    retvals = [prog.test_run(p, tier=tier).retval for p in packets]
    return retvals, list(m.items())


@pytest.mark.parametrize("map_type", [MapType.HASH, MapType.ARRAY])
@pytest.mark.parametrize("seed", range(12))
def test_random_map_operations_agree_on_all_tiers(seed: int, map_type: int) -> None:
    packets = random_ops(seed, map_type)
    results = {tier: run_ops(map_type, packets, tier) for tier in TIERS}
    assert results["native"] == results["interpreter"] == results["compiled"]


@pytest.mark.parametrize("key_size", [1, 2, 3, 4, 7, 8, 13, 16, 40, 64, 65, 100])
def test_native_hash_finds_keys_of_every_size(key_size: int) -> None:
    """Keys the Python side placed by zlib.crc32 are found by the native walk; others are
    not."""
    rng = random.Random(key_size)
    m = create_map(MapType.HASH, key_size, 8, 32)
    keys = [rng.randbytes(key_size) for _ in range(20)]
    for n, key in enumerate(keys):
        m.update(key, struct.pack("<Q", n + 1))
    code = asm.program(
        asm.mov64_reg(R2, R1),  # the key: the context's first bytes (kprobe pt_regs)
        asm.ld_map_fd(R1, FD),
        asm.call(Helper.map_lookup_elem),
        asm.jmp_imm(Jmp.JEQ, R0, 0, 1),
        asm.ldx(8, R0, R0, 0),
        asm.exit())
    prog, _ = load_program(ProgType.KPROBE, code, license="GPL",
                           resolve_map={FD: m}.__getitem__, verify=False)
    for n, key in enumerate(keys):
        ctx = key.ljust(168, b"\0")
        for tier in ("compiled", "native"):
            assert prog.test_run(ctx_in=ctx, tier=tier).retval == n + 1
    absent = bytes(b ^ 0xFF for b in keys[0]).ljust(168, b"\0")
    assert prog.test_run(ctx_in=absent, tier="native").retval == 0


def value_access(off: int, size: int, write: bool, map_type: int) -> bytes:
    access = asm.st(size, R0, off, 1) if write else asm.ldx(size, R0, R0, off)
    return asm.program(
        asm.st(4, R10, -4, 1),
        asm.mov64_reg(R2, R10), asm.add64_imm(R2, -4),
        asm.ld_map_fd(R1, FD),
        asm.call(Helper.map_lookup_elem),
        asm.jmp_imm(Jmp.JNE, R0, 0, 1),
        asm.exit(),
        access,
        asm.mov64_imm(R0, 1),
        asm.exit())


@pytest.mark.parametrize("map_type", [MapType.HASH, MapType.ARRAY])
@pytest.mark.parametrize(("off", "size", "write"), [
    (0, 8, False), (8, 1, False), (6, 4, True), (-1, 1, False), (-8, 8, True),
    (12, 4, False), (0x7FFF, 1, True)])
def test_value_pointers_fault_past_their_value_as_on_other_tiers(
        off: int, size: int, write: bool, map_type: int) -> None:
    m = create_map(map_type, 4, 12, 4)
    m.update(struct.pack("<I", 1), bytes(12))
    code = value_access(off, size, write, map_type)
    expected = outcome(code, "interpreter", maps={FD: m})
    assert outcome(code, "native", maps={FD: m}) == expected
    # (the compiled tier may charge a faulting block differently: only its result)
    assert outcome(code, "compiled", maps={FD: m}).result == expected.result


@pytest.mark.parametrize("map_type", [MapType.HASH, MapType.ARRAY])
def test_bad_key_and_value_pointers_fault_as_on_other_tiers(map_type: int) -> None:
    m = create_map(map_type, 4, 8, 4)
    for helper, r3 in ((Helper.map_lookup_elem, 0), (Helper.map_update_elem, 0),
                       (Helper.map_update_elem, 8)):
        for r2 in (0, 8):  # NULL, or a key past the end of the context's pointer
            code = asm.program(
                asm.st(4, R10, -8, 0),
                asm.mov64_reg(R2, R10), asm.add64_imm(R2, -r2 if r2 else 0),
                asm.mov64_reg(R3, R10), asm.add64_imm(R3, -r3 if r3 else 0),
                asm.mov64_imm(R4, 0),
                asm.ld_map_fd(R1, FD),
                asm.call(helper),
                asm.exit())
            expected = outcome(code, "interpreter", maps={FD: m})
            assert outcome(code, "native", maps={FD: m}) == expected, (helper, r2, r3)


def test_many_lookups_in_one_run_outgrow_the_region_table() -> None:
    """Each lookup maps a region, as on the other tiers: past the table's room native code
    calls the Python helper, and the ids stay the other tiers'."""
    m = create_map(MapType.ARRAY, 4, 8, 4)
    code = asm.program(
        asm.mov64_imm(R6, 0),
        asm.mov64_imm(R7, 0),
        asm.st(4, R10, -4, 2),
        asm.mov64_reg(R2, R10), asm.add64_imm(R2, -4),  # loop:
        asm.ld_map_fd(R1, FD),
        asm.call(Helper.map_lookup_elem),
        asm.jmp_imm(Jmp.JEQ, R0, 0, 3),
        asm.mov64_imm(R1, 1),
        asm.atomic(8, Atomic.ADD, R0, R1, 0),
        asm.mov64_reg(R7, R0),
        asm.add64_imm(R6, 1),
        asm.jmp_imm(Jmp.JLT, R6, 300, -11),
        asm.mov64_reg(R0, R7),
        asm.exit())
    results = {tier: outcome(code, tier, maps={FD: m}) for tier in TIERS}
    assert results["native"] == results["interpreter"] == results["compiled"]
    assert results["native"].result == f"r0={region_base(FIRST_DYNAMIC_REGION + 299):#x}"
    assert m.lookup_copy(struct.pack("<I", 2)) == struct.pack("<Q", 900)


def test_a_failed_insert_leaves_the_python_index_the_truth() -> None:
    """A new key goes through the Python helper (HashMap's index and free list), a present
    one is written natively under its seqlock: the seq ends even, two higher."""
    m = create_map(MapType.HASH, 4, 8, 2)
    code = map_ops()
    prog, _ = load_program(ProgType.SCHED_CLS, code, license="GPL",
                           resolve_map={FD: m}.__getitem__, verify=False)
    assert prog.test_run(packet(OP_UPDATE, 5, 9, 0), tier="native").retval == 0
    slot = m._index[struct.pack("<I", 5)]
    seq_at = m.layout.elem(slot)
    seq = int.from_bytes(m.shm.buf[seq_at:seq_at + 4], "little")
    assert prog.test_run(packet(OP_UPDATE, 5, 10, 0), tier="native").retval == 0
    assert int.from_bytes(m.shm.buf[seq_at:seq_at + 4], "little") == seq + 2
    assert m.lookup_copy(struct.pack("<I", 5)) == struct.pack("<Q", 10)
    assert prog.test_run(packet(OP_UPDATE, 6, 1, 0), tier="native").retval == 0
    assert prog.test_run(packet(OP_UPDATE, 7, 1, 0), tier="native").retval == \
        (-7) & 0xFFFFFFFF  # E2BIG: full
    assert len(m) == 2


def test_lookups_and_updates_of_present_keys_never_call_python(monkeypatch) -> None:
    """The common cases are native: only inserting a key and deleting one call the Python
    helper."""
    from bpffs.vm.native import glue

    called: list[int] = []
    real = glue.call_helper

    def counting(run, helper_id, *args):  # type: ignore[no-untyped-def]
        called.append(helper_id)
        return real(run, helper_id, *args)

    monkeypatch.setattr(glue, "call_helper", counting)
    for map_type in (MapType.HASH, MapType.ARRAY):
        m = create_map(map_type, 4, 8, 16)
        prog, _ = load_program(ProgType.SCHED_CLS, map_ops(), license="GPL",
                               resolve_map={FD: m}.__getitem__, verify=False)
        prog.test_run(packet(OP_UPDATE, 3, 1, 0), tier="native")  # a hash map inserts
        called.clear()
        for op in (OP_LOOKUP, OP_UPDATE, OP_ADD, OP_LOOKUP):
            prog.test_run(packet(op, 3, 5, 0), tier="native")
        prog.test_run(packet(OP_UPDATE, 3, 5, 1), tier="native")  # EEXIST
        prog.test_run(packet(OP_UPDATE, 9, 5, 2), tier="native")  # ENOENT / in range
        assert called == []
        if map_type == MapType.HASH:
            prog.test_run(packet(OP_DELETE, 3, 0, 0), tier="native")
            assert called == [Helper.map_delete_elem]


def stale_read(prog: Program, tier: str) -> str:
    """Run `prog`, then on the same Run a program that reads the first value it mapped."""
    run = Run.for_test(prog, PACKET, None, RunEnv())
    run.reset()
    prog.execute(run, tier)
    reader, _ = load_program(ProgType.SCHED_CLS, asm.program(
        asm.ld_imm64(R2, region_base(FIRST_DYNAMIC_REGION)), asm.ldx(8, R0, R2, 0),
        asm.exit()), license="GPL", resolve_map={}.get, verify=False)
    run.reset()
    try:
        return f"r0={reader.execute(run, tier):#x}"
    except VmFault as e:
        return f"{type(e).__name__}: {e}"


def test_a_value_pointer_outlives_a_tail_call_as_on_other_tiers() -> None:
    """A pointer from a native lookup, left in the context's cb[] for the tail-called
    program: Memory maps the value too (the glue adopts it), so the target reads it; a run
    that ends only unmaps it, so the next run cannot."""
    from bpffs.vm.context import SKB

    results = []
    for tier in TIERS:
        values = create_map(MapType.ARRAY, 4, 8, 2)
        values.update(struct.pack("<I", 1), struct.pack("<Q", 41))
        progs = create_map(MapType.PROG_ARRAY, 4, 4, 1)
        target, _ = load_program(ProgType.SCHED_CLS, asm.program(
            asm.ldx(8, R2, R1, SKB["cb0"]),
            asm.ldx(8, R0, R2, 0), asm.add64_imm(R0, 1), asm.stx(8, R2, R0, 0),
            asm.exit()), license="GPL", resolve_map={}.get, verify=False)
        progs.put(bytes(4), target)
        first, _ = load_program(ProgType.SCHED_CLS, asm.program(
            asm.mov64_reg(R6, R1),
            asm.st(4, R10, -4, 1),
            asm.mov64_reg(R2, R10), asm.add64_imm(R2, -4),
            asm.ld_map_fd(R1, FD),
            asm.call(Helper.map_lookup_elem),
            asm.stx(8, R6, R0, SKB["cb0"]),
            asm.mov64_reg(R1, R6), asm.ld_map_fd(R2, 2), asm.mov64_imm(R3, 0),
            asm.call(Helper.tail_call),
            asm.mov64_imm(R0, 7), asm.exit()), license="GPL",
            resolve_map={FD: values, 2: progs}.__getitem__, verify=False)
        got = [first.test_run(PACKET, tier=tier).retval]
        got.append(stale_read(first, tier))
        lookup, _ = load_program(ProgType.SCHED_CLS, value_access(0, 8, False, MapType.ARRAY),
                                 license="GPL", resolve_map={FD: values}.__getitem__)
        got.append(stale_read(lookup, tier))  # (natively: a run that ends unmaps it)
        got.append(values.lookup_copy(struct.pack("<I", 1)))
        results.append(got)
    assert results[0] == results[1] == results[2]
    assert results[2][0] == 42
    assert "not a mapped region" in results[2][1] and "not a mapped region" in results[2][2]
