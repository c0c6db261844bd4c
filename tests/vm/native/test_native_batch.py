"""A buffer of packets run by the native batch driver gives every column the Python tiers
give for the same packets, one test run each: retvals, classids, redirects, outputs, effects,
errors, the maps' contents and the program's run count; whatever makes the driver hand a
packet to Python (a status, a callback, an effect only Python records, a packet that does not
fit an skb) happens in the middle of a buffer."""

from __future__ import annotations

import itertools
import random
from array import array

import pytest

pytest.importorskip("llvmlite")

from native_cases import PACKET
from test_native_maps import FD, map_ops, random_ops

from bpffs.vm import BpfError, asm, load_program
from bpffs.vm.context import SKB
from bpffs.vm.env import RunEnv
from bpffs.vm.isa import R0, R1, R2, R3, R4, R5, R6, R7, R8, R10, Alu, Atomic, Jmp
from bpffs.vm.maps import create_map
from bpffs.vm.uapi import Helper, MapType, ProgType

TIERS = ("interpreter", "compiled", "native")


def buffer_of(packets: list[bytes], gap: int = 3) -> tuple[bytes, array, array]:
    """The packets in one buffer, `gap` bytes of 0xEE between them (nothing may read them)."""
    lengths = array("I", map(len, packets))
    offsets = array("Q", itertools.accumulate((n + gap for n in lengths), initial=gap))
    offsets.pop()
    return (b"\xEE" * gap).join([b"", *packets, b""]), offsets, lengths


def columns(code: bytes, packets: list[bytes], tier: str, maps: dict | None = None,
            budget: int = RunEnv.budget, pieces: int = 3, as_list: bool = False) -> tuple:
    """Everything a batch records, the packets fed as `pieces` buffers (or lists)."""
    prog, _ = load_program(ProgType.SCHED_CLS, code, license="GPL",
                           resolve_map=(maps or {}).__getitem__, verify=False)
    batch = prog.test_run_batch(RunEnv(budget=budget), tier)
    step = -(-len(packets) // pieces)
    for start in range(0, len(packets), step):
        if as_list:
            batch.feed(packets[start:start + step])
        else:
            batch.feed_buffer(*buffer_of(packets[start:start + step]))
    return (batch.retvals.tolist(), batch.classids.tolist(), batch.redirects.tolist(),
            batch.outputs, batch.effects, batch.errors, prog.run_cnt)


def agree(code: bytes, packets: list[bytes], **kw) -> tuple:
    got = {tier: columns(code, packets, tier, **kw) for tier in TIERS}
    assert got["native"] == got["compiled"] == got["interpreter"]
    return got["native"]


def frames(seed: int, n: int = 300) -> list[bytes]:
    """Ethernet frames of every protocol the classifier knows and some it does not, and a
    few that do not fit an skb (too short, too long)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.03:
            out.append(rng.randbytes(rng.randrange(14)))
        elif roll < 0.04:
            out.append(bytes(70_000))
        else:
            out.append(rng.choice([bytes(6), b"\xff" * 6, rng.randbytes(6)]) + rng.randbytes(6)
                       + rng.choice([b"\x08\x00", b"\x08\x06", b"\x86\xdd", b"\x88\xcc"])
                       + rng.randbytes(rng.choice([0, 1, 46, 100, 1500])))
    return out


def classifier(mark_lldp: bool = False) -> bytes:
    """The protocol classifier of examples/tc_classifier.c, plus the packet type and length
    in r0's upper bits; with `mark_lldp`, LLDP frames get a mark (an effect Python records)."""
    return asm.program(
        asm.mov64_reg(R6, R1), asm.ld_abs(2, 12), asm.mov64_reg(R7, R0),
        asm.ldx(4, R8, R6, SKB["pkt_type"]), asm.alu64(Alu.LSH, R8, imm=32, reg=False),
        asm.ldx(4, R1, R6, SKB["len"]), asm.alu64(Alu.LSH, R1, imm=40, reg=False),
        asm.alu64(Alu.OR, R8, R1, reg=True),
        asm.jmp_imm(Jmp.JNE, R7, 0x0806, 2), asm.st(4, R6, SKB["tc_classid"], 0x10001),
        asm.jmp_imm(Jmp.JA, 0, 0, 6),
        asm.jmp_imm(Jmp.JNE, R7, 0x0800, 2), asm.st(4, R6, SKB["tc_classid"], 0x10002),
        asm.jmp_imm(Jmp.JA, 0, 0, 3),
        asm.jmp_imm(Jmp.JNE, R7, 0x86DD, 2 if mark_lldp else 1),
        asm.st(4, R6, SKB["tc_classid"], 0x10003),
        *([asm.jmp_imm(Jmp.JA, 0, 0, 1), asm.st(4, R6, SKB["mark"], 9)] if mark_lldp else []),
        asm.ldx(4, R0, R6, SKB["protocol"]), asm.alu64(Alu.OR, R0, R8, reg=True), asm.exit())


def test_the_classifier_s_columns_agree_and_need_no_python_per_packet() -> None:
    retvals, classids, *_ = agree(classifier(), frames(1))
    assert set(classids) == {0, 0x10001, 0x10002, 0x10003} and any(retvals)


def test_a_mark_is_recorded_as_an_effect_of_its_packet_only() -> None:
    got = agree(classifier(mark_lldp=True), frames(2))
    assert got[4] and all(e == {"mark": 9} for e in got[4].values())


def test_redirects_are_a_column_and_bad_flags_drop_the_packet() -> None:
    """bpf_redirect(ifindex = byte 20, flags = byte 21): flags above BPF_F_INGRESS make it
    TC_ACT_SHOT and record nothing; some packets redirect twice (the last one counts)."""
    code = asm.program(
        asm.mov64_reg(R6, R1), asm.ld_abs(1, 21), asm.mov64_reg(R7, R0),
        asm.ld_abs(1, 20), asm.mov64_reg(R1, R0), asm.alu64(Alu.AND, R1, imm=7, reg=False),
        asm.mov64_reg(R2, R7), asm.alu64(Alu.AND, R2, imm=3, reg=False),
        asm.call(Helper.redirect), asm.mov64_reg(R8, R0),
        asm.jmp_imm(Jmp.JLT, R7, 0x80, 3),
        asm.mov64_imm(R1, 33), asm.mov64_imm(R2, 0), asm.call(Helper.redirect),
        asm.alu64(Alu.LSH, R0, imm=8, reg=False), asm.alu64(Alu.OR, R0, R8, reg=True),
        asm.exit())
    _, _, redirects, _, effects, _, _ = agree(code, frames(3))
    assert {r & 0xFF for r in redirects if r} >= {33, 1, 2} and not effects


def test_redirects_and_python_helpers_keep_their_order() -> None:
    """A redirect, a helper that runs in Python, a second redirect only on some packets."""
    code = asm.program(
        asm.mov64_reg(R6, R1), asm.mov64_imm(R1, 4), asm.mov64_imm(R2, 1),
        asm.call(Helper.redirect),
        asm.mov64_reg(R1, R6), asm.call(Helper.get_cgroup_classid), asm.mov64_reg(R7, R0),
        asm.ld_abs(1, 30), asm.jmp_imm(Jmp.JGT, R0, 0x80, 3),
        asm.mov64_imm(R1, 5), asm.mov64_imm(R2, 0), asm.call(Helper.redirect),
        asm.mov64_reg(R0, R7), asm.exit())
    _, _, redirects, *_ = agree(code, frames(4))
    assert {r & 0xFFFFFFFFFF for r in redirects} >= {5, (1 << 32) | 4}


def test_a_helper_that_rewrites_the_frame_gives_its_output() -> None:
    """skb_store_bytes and LD_ABS of what it wrote; fed as buffers and as lists of packets
    (PacketBatch.feed: the native entry a packet at a time)."""
    code = asm.program(asm.mov64_reg(R6, R1), asm.ld_abs(2, 12), asm.mov64_reg(R8, R0),
                       asm.st(4, R10, -4, 0x11223344),
                       asm.mov64_reg(R1, R6), asm.mov64_imm(R2, 14), asm.mov64_reg(R3, R10),
                       asm.add64_imm(R3, -4), asm.mov64_imm(R4, 2), asm.mov64_imm(R5, 0),
                       asm.call(Helper.skb_store_bytes),
                       asm.ld_abs(2, 14), asm.alu64(Alu.LSH, R0, imm=16, reg=False),
                       asm.alu64(Alu.OR, R0, R8, reg=True), asm.exit())
    packets = [PACKET, PACKET[:14], PACKET[:16], b"x", *frames(5, 40)]
    got = agree(code, packets)
    assert got[3] and got[5]
    assert got == agree(code, packets, as_list=True)


def test_faults_packet_exits_and_budgets_in_the_middle_of_a_buffer() -> None:
    """Byte 14 picks: a read past the context (EFAULT), LD_ABS past the frame (r0 = 0), a
    loop of byte 15 rounds (out of budget above ~20), or a plain return of a 64-bit r0."""
    code = asm.program(
        asm.mov64_reg(R6, R1), asm.ld_abs(1, 14), asm.mov64_reg(R7, R0),
        asm.jmp_imm(Jmp.JGT, R7, 0x40, 2), asm.ldx(4, R0, R6, 200), asm.exit(),
        asm.jmp_imm(Jmp.JGT, R7, 0x80, 2), asm.ld_abs(4, 5000), asm.exit(),
        asm.jmp_imm(Jmp.JGT, R7, 0xC0, 5), asm.ld_abs(1, 15),
        asm.alu64(Alu.SUB, R0, imm=1, reg=False), asm.jmp_imm(Jmp.JSGT, R0, 0, -2),
        asm.mov64_imm(R0, 3), asm.exit(),
        asm.ld_imm64(R0, 0x1234_5678_9ABC_DEF0), asm.exit())
    retvals, *_, errors, runs = agree(code, frames(6), budget=100)
    messages = " ".join(message for _, message in errors.values())
    assert "budget" in messages and "context" in messages, messages
    assert 0x9ABCDEF0 in retvals and runs == len(retvals) - len(errors)


def test_tail_calls_in_a_batch_run_the_target() -> None:
    def program(tier: str) -> tuple:
        counter = create_map(MapType.ARRAY, 4, 8, 1)
        progs = create_map(MapType.PROG_ARRAY, 4, 4, 1)
        target, _ = load_program(ProgType.SCHED_CLS, asm.program(
            asm.st(4, R1, SKB["tc_classid"], 0x20002), asm.mov64_imm(R0, 42), asm.exit()),
            license="GPL", resolve_map={}.get)
        progs.put(bytes(4), target)
        code = asm.program(
            asm.mov64_reg(R6, R1), asm.st(4, R10, -4, 0), asm.mov64_reg(R2, R10),
            asm.add64_imm(R2, -4), asm.ld_map_fd(R1, 1), asm.call(Helper.map_lookup_elem),
            asm.jmp_imm(Jmp.JEQ, R0, 0, 2),
            asm.mov64_imm(R1, 1), asm.atomic(8, Atomic.ADD, R0, R1, 0),
            asm.ld_abs(1, 14), asm.jmp_imm(Jmp.JGT, R0, 0x80, 5),
            asm.mov64_reg(R1, R6), asm.ld_map_fd(R2, 2), asm.mov64_imm(R3, 0),
            asm.call(Helper.tail_call),
            asm.mov64_imm(R0, 7), asm.exit())
        got = columns(code, frames(7), tier, maps={1: counter, 2: progs})
        return got, counter.lookup_copy(bytes(4))

    got = {tier: program(tier) for tier in TIERS}
    assert got["native"] == got["compiled"] == got["interpreter"]
    assert {42, 7} <= set(got["native"][0][0])


def test_a_packet_that_faults_after_a_classid_and_a_redirect_has_neither() -> None:
    """Columns of a refused packet are 0 on every tier, whatever its run did before."""
    code = asm.program(
        asm.mov64_reg(R6, R1), asm.st(4, R6, SKB["tc_classid"], 7),
        asm.mov64_imm(R1, 3), asm.mov64_imm(R2, 0), asm.call(Helper.redirect),
        asm.ld_abs(1, 14), asm.jmp_imm(Jmp.JGT, R0, 0x80, 1), asm.ldx(4, R0, R6, 200),
        asm.exit())
    _, classids, redirects, _, _, errors, _ = agree(code, frames(10))
    assert errors and all(not classids[i] and not redirects[i] for i in errors)
    assert any(classids) and any(redirects)


def test_a_tail_call_s_target_decides_the_classid_and_the_redirect() -> None:
    """The caller sets a classid and redirects to 3, directly or from a bpf-to-bpf callee;
    the target clears the classid and redirects to 5: the target's record is the last."""
    def program(tier: str, from_callee: bool) -> tuple:
        progs = create_map(MapType.PROG_ARRAY, 4, 4, 1)
        target, _ = load_program(ProgType.SCHED_CLS, asm.program(
            asm.st(4, R1, SKB["tc_classid"], 0), asm.mov64_imm(R1, 5), asm.mov64_imm(R2, 0),
            asm.call(Helper.redirect), asm.exit()), license="GPL", resolve_map={}.get)
        progs.put(bytes(4), target)
        tail = [asm.mov64_reg(R1, R6), asm.ld_map_fd(R2, 2), asm.mov64_imm(R3, 0),
                asm.call(Helper.tail_call), asm.mov64_imm(R0, 9), asm.exit()]
        head = [asm.mov64_reg(R6, R1), asm.st(4, R6, SKB["tc_classid"], 7),
                asm.mov64_imm(R1, 3), asm.mov64_imm(R2, 0), asm.call(Helper.redirect)]
        code = asm.program(*head, asm.call_local(1), asm.exit(), *tail) if from_callee \
            else asm.program(*head, *tail)
        return columns(code, [PACKET] * 4 + frames(11, 20), tier, maps={2: progs})

    for from_callee in (False, True):
        got = {tier: program(tier, from_callee) for tier in TIERS}
        assert got["native"] == got["compiled"] == got["interpreter"]
        assert not any(got["native"][1]) and set(got["native"][2]) - {0} == {(1 << 40) | 5}


def test_no_redirect_record_outlives_its_packet() -> None:
    """A buffer whose last packet redirected, then packets that do not: none redirects."""
    code = asm.program(asm.mov64_reg(R6, R1), asm.ld_abs(1, 14), asm.jmp_imm(Jmp.JNE, R0, 1, 3),
                       asm.mov64_imm(R1, 5), asm.mov64_imm(R2, 0), asm.call(Helper.redirect),
                       asm.mov64_imm(R0, 0), asm.exit())
    redirecting, quiet = PACKET[:14] + b"\x01" + PACKET[15:], PACKET[:14] + b"\x00" + PACKET[15:]
    got = []
    for tier in TIERS:
        prog, _ = load_program(ProgType.SCHED_CLS, code, license="GPL", resolve_map={}.get)
        batch = prog.test_run_batch(tier=tier)
        batch.feed_buffer(*buffer_of([quiet, redirecting]))
        batch.feed([quiet])
        batch.feed_buffer(*buffer_of([quiet]))
        got.append((batch.redirects.tolist(), prog.test_run(quiet, tier=tier).effects))
    assert got[0] == got[1] == got[2] == ([0, (1 << 40) | 5, 0, 0], {})


@pytest.mark.parametrize("tier", TIERS)
def test_a_packet_too_large_for_an_skb_is_refused_without_a_copy(tier: str) -> None:
    """Four packets of 256 MiB each in a sparse buffer (a client's memfd could say so):
    refused on their length; nothing near their size is allocated."""
    import mmap
    import tracemalloc

    prog, _ = load_program(ProgType.SCHED_CLS, classifier(), license="GPL",
                           resolve_map={}.get)
    batch = prog.test_run_batch(tier=tier)
    batch.feed_buffer(*buffer_of([PACKET]))
    with mmap.mmap(-1, 1 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as sparse:
        tracemalloc.start()
        try:
            batch.feed_buffer(sparse, array("Q", [0, 1 << 28, 2 << 28, 3 << 28]),
                              array("I", [1 << 28] * 4))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 1 << 20, peak
    assert [batch.errors[i][0] for i in range(1, 5)] == [22] * 4
    assert "larger than" in batch.errors[1][1]


@pytest.mark.parametrize("map_type", [MapType.HASH, MapType.ARRAY])
@pytest.mark.parametrize("seed", range(4))
def test_map_operations_in_a_batch_leave_the_same_maps(seed: int, map_type: int) -> None:
    packets = random_ops(seed, map_type, 400)
    got = {}
    for tier in TIERS:
        m = create_map(map_type, 4, 8, 16)
        got[tier] = columns(map_ops(), packets, tier, maps={FD: m}), list(m.items())
    assert got["native"] == got["compiled"] == got["interpreter"]


def test_the_native_tier_really_runs_the_driver(monkeypatch) -> None:
    """Not a fallback to the Python loop: once the first packet has made the batch's Run,
    the classifier's packets never reach Python."""
    from bpffs.vm.run import PacketBatch

    prog, _ = load_program(ProgType.SCHED_CLS, classifier(), license="GPL",
                           resolve_map={}.get)
    batch = prog.test_run_batch(tier="native")
    batch.feed_buffer(*buffer_of([PACKET]))
    in_python = []
    for method in ("feed", "run_one", "finish"):
        monkeypatch.setattr(PacketBatch, method, lambda *args: in_python.append(args))
    good = [f for f in frames(9) if 14 <= len(f) <= 65_549]
    batch.feed_buffer(*buffer_of(good))
    assert not in_python and len(batch) == 1 + len(good) and all(batch.retvals)


@pytest.mark.parametrize("tier", TIERS)
def test_offsets_and_lengths_outside_the_buffer_are_refused(tier: str) -> None:
    prog, _ = load_program(ProgType.SCHED_CLS, classifier(), license="GPL",
                           resolve_map={}.get)
    batch = prog.test_run_batch(tier=tier)
    buffer, offsets, lengths = buffer_of([PACKET] * 4)
    lengths[3] += 4  # one byte past the gap after the last packet
    with pytest.raises(BpfError, match="beyond its buffer"):
        batch.feed_buffer(buffer, offsets, lengths)
    with pytest.raises(BpfError, match="offset and one length"):
        batch.feed_buffer(buffer, offsets, lengths[:2])
    with pytest.raises(BpfError, match="u64"):
        batch.feed_buffer(buffer, array("I", offsets), lengths)
    assert len(batch) == 0 and prog.run_cnt == 0
