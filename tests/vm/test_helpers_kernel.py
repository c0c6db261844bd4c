"""Packet, map and tail-call helpers against the running kernel: the same SCHED_CLS program
through BPF_PROG_TEST_RUN and through the VM must return the same value and packet."""

from __future__ import annotations

import os

import dpkt
import pytest
from tiers import TIERS

from bpffs.vm import asm, kernel, load_program
from bpffs.vm.context import SKB
from bpffs.vm.isa import R0, R1, R2, R3, R4, R5, R6, R7, R10, Alu, Jmp
from bpffs.vm.maps import create_map
from bpffs.vm.uapi import (
    BPF_EXIST,
    BPF_F_PSEUDO_HDR,
    BPF_F_RECOMPUTE_CSUM,
    Helper,
    MapType,
    ProgType,
)

pytestmark = pytest.mark.kernel
IP_CSUM, IP_SRC, UDP_CSUM = 14 + 10, 14 + 12, 14 + 20 + 6


def udp_frame() -> bytes:
    udp = dpkt.udp.UDP(sport=1234, dport=53, data=b"hello, world")
    ip = dpkt.ip.IP(src=bytes([10, 0, 0, 1]), dst=bytes([10, 0, 0, 2]), p=dpkt.ip.IP_PROTO_UDP,
                    data=udp)
    ip.len = len(bytes(ip))
    frame = dpkt.ethernet.Ethernet(src=bytes.fromhex("020000000001"), dst=bytes(6),
                                   type=dpkt.ethernet.ETH_TYPE_IP, data=ip)
    return bytes(frame)


FRAME = udp_frame()


def both(code_for, data: bytes = FRAME, maps: int = 0, ctx_in: bytes | None = None):
    """(kernel, [vm per tier]) results of the program code_for(map fds...) builds."""
    kernel_fds = [kernel.map_create(MapType.HASH, 4, 8, 8) for _ in range(maps)]
    vm_maps = {100 + n: create_map(MapType.HASH, 4, 8, 8) for n in range(maps)}
    try:
        fd, _ = kernel.prog_load(ProgType.SCHED_CLS, code_for(*kernel_fds))
        try:
            retval, data_out, _, _ = kernel.prog_test_run(fd, data, ctx_in=ctx_in)
        finally:
            os.close(fd)
    finally:
        for mfd in kernel_fds:
            os.close(mfd)
    prog, _ = load_program(ProgType.SCHED_CLS, code_for(*vm_maps), license="GPL",
                           resolve_map=vm_maps.__getitem__)
    vm = [prog.test_run(data, ctx_in=ctx_in, tier=tier) for tier in TIERS]
    return (retval, data_out), [(r.retval, r.data_out) for r in vm]


def assert_same(code_for, **kwargs) -> tuple[int, bytes]:
    expected, got = both(code_for, **kwargs)
    for tier, result in zip(TIERS, got, strict=True):
        assert result == expected, tier
    return expected


def store_then(value: bytes, offset: int, flags: int = 0, length: int | None = None):
    """A program storing `value` (up to 8 bytes, from the stack) at `offset`; returns r0."""
    length = len(value) if length is None else length
    return asm.program(
        asm.mov64_reg(R6, R1),
        asm.ld_imm64(R2, int.from_bytes(value.ljust(8, b"\0"), "little")),
        asm.stx(8, R10, R2, -8),
        asm.mov64_reg(R1, R6), asm.mov64_imm(R2, offset),
        asm.mov64_reg(R3, R10), asm.add64_imm(R3, -8),
        asm.mov64_imm(R4, length), asm.mov64_imm(R5, flags),
        asm.call(Helper.skb_store_bytes),
        asm.exit())


@pytest.mark.parametrize("offset,flags,length", [
    (IP_SRC, 0, 4), (IP_SRC, BPF_F_RECOMPUTE_CSUM, 4), (0, 0, 6), (len(FRAME) - 2, 0, 2),
    (len(FRAME) - 1, 0, 2), (len(FRAME), 0, 1), (0x10000, 0, 1), (0, 1 << 7, 4),
])
def test_skb_store_bytes(offset: int, flags: int, length: int) -> None:
    assert_same(lambda: store_then(bytes([192, 168, 1, 1, 9, 9, 9, 9]), offset, flags, length))


def csum_program(offset: int, old: int, new: int, flags: int, helper: Helper) -> bytes:
    return asm.program(
        asm.mov64_reg(R6, R1),
        asm.mov64_imm(R2, offset), asm.ld_imm64(R3, old), asm.ld_imm64(R4, new),
        asm.ld_imm64(R5, flags),
        asm.call(helper), asm.exit())


def test_l3_and_l4_csum_replace_keep_checksums_valid() -> None:
    """Rewrite the source address, then fix the IP and UDP checksums as a NAT would."""
    old = int.from_bytes(FRAME[IP_SRC:IP_SRC + 4], "little")
    new_ip = bytes([192, 168, 7, 9])
    new = int.from_bytes(new_ip, "little")

    def nat() -> bytes:
        return asm.program(
            asm.mov64_reg(R6, R1),
            store_then(new_ip, IP_SRC)[:-8],  # without its exit
            asm.mov64_reg(R1, R6), asm.mov64_imm(R2, IP_CSUM), asm.ld_imm64(R3, old),
            asm.ld_imm64(R4, new), asm.mov64_imm(R5, 4),
            asm.call(Helper.l3_csum_replace), asm.mov64_reg(R7, R0),
            asm.mov64_reg(R1, R6), asm.mov64_imm(R2, UDP_CSUM), asm.ld_imm64(R3, old),
            asm.ld_imm64(R4, new), asm.mov64_imm(R5, BPF_F_PSEUDO_HDR | 4),
            asm.call(Helper.l4_csum_replace), asm.alu64(Alu.OR, R0, R7, reg=True),
            asm.exit())

    retval, data_out = assert_same(nat)
    assert retval == 0
    ip = dpkt.ethernet.Ethernet(data_out).data
    assert ip.src == new_ip
    assert ip.sum == dpkt.ip.IP(bytes(ip)).sum  # unchanged when recomputed
    recomputed = dpkt.ip.IP(bytes(ip))
    recomputed.sum = 0
    recomputed.data.sum = 0
    assert dpkt.ip.IP(bytes(recomputed)).sum == ip.sum
    assert dpkt.ip.IP(bytes(recomputed)).data.sum == ip.data.sum


@pytest.mark.parametrize("helper", [Helper.l3_csum_replace, Helper.l4_csum_replace])
@pytest.mark.parametrize("old,new,flags", [
    (0x1234, 0x4321, 2), (0, 0x0101, 0), (5, 6, 0), (1, 2, 3), (1, 2, 1 << 8),
    (0x0A000001, 0xC0A80709, 4),
])
def test_csum_replace_sizes_and_bad_flags(helper: Helper, old: int, new: int,
                                          flags: int) -> None:
    assert_same(lambda: csum_program(IP_CSUM, old, new, flags, helper))


def test_csum_replace_beyond_the_packet_is_efault() -> None:
    retval, _ = assert_same(lambda: csum_program(len(FRAME) - 1, 1, 2, 2,
                                                 Helper.l3_csum_replace))
    assert retval == (-14) & 0xFFFFFFFF


@pytest.mark.parametrize("ops", [["push"], ["push", "push"], ["push", "pop"], ["pop"],
                                 ["push", "push", "pop", "pop"]])
def test_vlan_push_and_pop_change_the_frame_like_the_kernel(ops: list[str]) -> None:
    body = [asm.mov64_reg(R6, R1)]
    for n, op in enumerate(ops):
        body.append(asm.mov64_reg(R1, R6))
        if op == "push":
            body += [asm.mov64_imm(R2, 0x0081), asm.mov64_imm(R3, 100 + n),
                     asm.call(Helper.skb_vlan_push)]
        else:
            body.append(asm.call(Helper.skb_vlan_pop))
    body += [asm.ldx(4, R0, R6, SKB["vlan_tci"]), asm.ldx(4, R2, R6, SKB["len"]),
             asm.alu64(Alu.LSH, R2, imm=16, reg=False), asm.alu64(Alu.OR, R0, R2, reg=True),
             asm.exit()]
    assert_same(lambda: asm.program(*body))


def test_ctx_fields_from_ctx_in_and_writes_to_mark() -> None:
    ctx_in = bytearray(76)
    ctx_in[SKB["mark"]:SKB["mark"] + 4] = (41).to_bytes(4, "little")
    ctx_in[SKB["priority"]:SKB["priority"] + 4] = (3).to_bytes(4, "little")
    code = asm.program(asm.ldx(4, R0, R1, SKB["mark"]), asm.ldx(4, R2, R1, SKB["priority"]),
                       asm.alu64(Alu.MUL, R0, R2, reg=True),
                       asm.ldx(4, R2, R1, SKB["protocol"]), asm.alu64(Alu.ADD, R0, R2,
                                                                       reg=True),
                       asm.ldx(4, R2, R1, SKB["pkt_type"]), asm.alu64(Alu.ADD, R0, R2,
                                                                       reg=True),
                       asm.ldx(4, R2, R1, SKB["ifindex"]), asm.alu64(Alu.ADD, R0, R2,
                                                                      reg=True),
                       asm.exit())
    assert_same(lambda: code, ctx_in=bytes(ctx_in))


def test_map_helpers_return_the_kernels_errors() -> None:
    def program(fd: int) -> bytes:
        return asm.program(
            asm.st(4, R10, -4, 7), asm.st(8, R10, -16, 1),
            asm.mov64_reg(R2, R10), asm.add64_imm(R2, -4),
            asm.mov64_reg(R3, R10), asm.add64_imm(R3, -16),
            asm.ld_map_fd(R1, fd), asm.mov64_imm(R4, BPF_EXIST),
            asm.call(Helper.map_update_elem),           # missing key + EXIST: -ENOENT
            asm.mov64_reg(R7, R0), asm.alu64(Alu.LSH, R7, imm=8, reg=False),
            asm.mov64_reg(R2, R10), asm.add64_imm(R2, -4),
            asm.ld_map_fd(R1, fd), asm.call(Helper.map_delete_elem),  # -ENOENT again
            asm.alu64(Alu.AND, R0, imm=0xFF, reg=False), asm.alu64(Alu.OR, R0, R7, reg=True),
            asm.mov64_reg(R2, R10), asm.add64_imm(R2, -4),
            asm.ld_map_fd(R1, fd), asm.mov64_reg(R7, R0), asm.call(Helper.map_lookup_elem),
            asm.jmp_imm(Jmp.JEQ, R0, 0, 1), asm.mov64_imm(R7, 0),
            asm.mov64_reg(R0, R7), asm.exit())
    assert_same(program, maps=1)


def test_tail_call_limit_matches_the_kernel() -> None:
    """A program that tail-calls itself, counting the calls in r0's slot of an array map."""
    def program(counter_fd: int, progs_fd: int) -> bytes:
        return asm.program(
            asm.mov64_reg(R6, R1),
            asm.st(4, R10, -4, 0), asm.mov64_reg(R2, R10), asm.add64_imm(R2, -4),
            asm.ld_map_fd(R1, counter_fd), asm.call(Helper.map_lookup_elem),
            asm.jmp_imm(Jmp.JEQ, R0, 0, 2),
            asm.mov64_imm(R1, 1), asm.atomic(8, 0, R0, R1, 0),
            asm.mov64_reg(R1, R6), asm.ld_map_fd(R2, progs_fd), asm.mov64_imm(R3, 0),
            asm.call(Helper.tail_call),
            asm.mov64_imm(R0, 7), asm.exit())

    # the kernel
    counter = kernel.map_create(MapType.ARRAY, 4, 8, 1)
    progs = kernel.map_create(MapType.PROG_ARRAY, 4, 4, 1)
    try:
        fd, _ = kernel.prog_load(ProgType.SCHED_CLS, program(counter, progs))
        kernel.map_update_elem(progs, bytes(4), fd.to_bytes(4, "little"))
        retval, _, _, _ = kernel.prog_test_run(fd, FRAME)
        kernel_count = int.from_bytes(kernel.map_lookup_elem(counter, bytes(4), 8), "little")
        os.close(fd)
    finally:
        os.close(counter)
        os.close(progs)
    # the VM, every tier
    for tier in TIERS:
        vm_counter = create_map(MapType.ARRAY, 4, 8, 1)
        vm_progs = create_map(MapType.PROG_ARRAY, 4, 4, 1)
        maps = {1: vm_counter, 2: vm_progs}
        prog, _ = load_program(ProgType.SCHED_CLS, program(1, 2), license="GPL",
                               resolve_map=maps.__getitem__)
        vm_progs.put(bytes(4), prog)
        result = prog.test_run(FRAME, tier=tier)
        count = int.from_bytes(vm_counter.lookup_copy(bytes(4)), "little")
        assert (result.retval, count) == (retval, kernel_count), tier
    assert kernel_count == 34  # the first run and 33 tail calls (4.4: cnt > 32 stops)


@pytest.mark.parametrize("destination", ["ffffffffffff", "01005e000001", "000000000000",
                                         "020000000002", "ffffffffff00"])
def test_pkt_type_and_protocol_of_the_destination_address(destination: str) -> None:
    """eth_type_trans on the test run's device, the loopback: its address and its broadcast
    address are both 00:..:00, so ff:..:ff is multicast like any group address."""
    frame = bytes.fromhex(destination) + FRAME[6:]
    code = asm.program(asm.ldx(4, R0, R1, SKB["pkt_type"]), asm.ldx(4, R2, R1, SKB["protocol"]),
                       asm.alu64(Alu.LSH, R2, imm=8, reg=False),
                       asm.alu64(Alu.OR, R0, R2, reg=True), asm.exit())
    assert_same(lambda: code, data=frame)
