"""The running kernel is the oracle: the same bytecode through BPF_PROG_TEST_RUN and through
the VM (every tier) must return the same value and packet."""

from __future__ import annotations

import os
import struct

import pytest
from isa_cases import CASES, returns64
from progs import ETH_IPV4, load, random_program
from tiers import TIERS

from bpffs.vm import kernel, load_program
from bpffs.vm.uapi import ProgType

pytestmark = pytest.mark.kernel
PACKET = ETH_IPV4 + bytes(range(64))


def kernel_run(code: bytes, data: bytes, prog_type: int = ProgType.SOCKET_FILTER
               ) -> tuple[int, bytes]:
    fd, _ = kernel.prog_load(prog_type, code)
    try:
        retval, data_out, _, _ = kernel.prog_test_run(fd, data)
    finally:
        os.close(fd)
    return retval, data_out


def vm_run(code: bytes, data: bytes, tier: str, prog_type: int = ProgType.SOCKET_FILTER):
    result = load(code, prog_type).test_run(data, tier=tier)
    return result.retval, result.data_out


@pytest.mark.parametrize("name", sorted(CASES))
def test_isa_cases_match_the_kernel(name: str) -> None:
    code = returns64(*CASES[name][0])
    expected = kernel_run(code, PACKET)
    for tier in TIERS:
        assert vm_run(code, PACKET, tier) == expected, tier


@pytest.mark.parametrize("packet", [False, True], ids=["alu-jmp-stack", "ld_abs-ld_ind"])
def test_random_programs_match_the_kernel(packet: bool) -> None:
    compared = 0
    for seed in range(120):
        code = random_program(1000 + seed, packet=packet)
        try:
            expected = kernel_run(code, PACKET)
        except OSError as e:  # the generator should only make programs the kernel accepts
            pytest.fail(f"seed {1000 + seed}: the kernel rejected the program: {e}\n"
                        f"{getattr(e, 'verifier_log', '')[-2000:]}")
        for tier in TIERS:
            assert vm_run(code, PACKET, tier) == expected, f"seed {1000 + seed} {tier}"
        compared += 1
    assert compared == 120


@pytest.mark.parametrize("prog_type", [ProgType.SCHED_CLS, ProgType.SOCKET_FILTER])
@pytest.mark.parametrize("size", [14, 15, 60, 1500])
def test_ld_abs_bounds_match_the_kernel(prog_type: int, size: int) -> None:
    """Loads at every offset around the end of the packet: in bounds, partly out, out."""
    from bpffs.vm import asm
    from bpffs.vm.isa import R0, R1, R6, R7, Alu

    data = bytes((n * 7) & 0xFF for n in range(size))
    for width in (1, 2, 4):
        for off in sorted({0, size - 20, size - 15, size - 14, size - width, size - 1, size}):
            if off < 0:
                continue
            code = asm.program(asm.mov64_reg(R6, R1), asm.mov64_imm(R7, 1),
                               asm.ld_abs(width, off), asm.alu64(Alu.ADD, R0, R7, reg=True),
                               asm.exit())
            expected = kernel_run(code, data, prog_type)
            for tier in TIERS:
                assert vm_run(code, data, tier, prog_type) == expected, (width, off, tier)


# BTF (include/uapi/linux/btf.h), only as much as the kernel wants before it allows a tail call
# in a subprogram: one FUNC per function, all `static int f(int)`.
BTF_MAGIC, BTF_KIND_INT, BTF_KIND_FUNC, BTF_KIND_FUNC_PROTO = 0xEB9F, 1, 12, 13


def static_funcs_btf(count: int) -> bytes:
    """int, int (*)(int), then `count` FUNCs of that prototype (type ids 3..)."""
    strings = b"\0int\0f\0x\0"  # names at offsets 1, 5 and 7
    types = struct.pack("<IIII", 1, BTF_KIND_INT << 24, 4, (1 << 24) | 32)  # signed, 32 bits
    types += struct.pack("<IIIII", 0, (BTF_KIND_FUNC_PROTO << 24) | 1, 1, 7, 1)
    types += struct.pack("<III", 5, BTF_KIND_FUNC << 24, 2) * count
    header = struct.pack("<HBBIIIII", BTF_MAGIC, 1, 0, 24, 0, len(types), len(types),
                         len(strings))
    return header + types + strings


def test_a_tail_call_in_a_subprogram_returns_to_the_subprogram_s_caller() -> None:
    """The target replaces the callee's frame; its r0 comes back to the caller, whose r6
    survived (the kernel needs BTF for this, so the program carries a minimal one)."""
    from bpffs.vm import asm
    from bpffs.vm.isa import R0, R2, R3, R6, Alu
    from bpffs.vm.maps import create_map
    from bpffs.vm.uapi import Helper, MapType

    target = asm.program(asm.mov64_imm(R0, 42), asm.exit())

    def caller(progs_fd: int) -> bytes:
        return asm.program(asm.mov64_imm(R6, 100), asm.call_local(2),
                           asm.alu64(Alu.ADD, R0, R6, reg=True), asm.exit(),
                           # subprogram at insn 4: r1 is still the context
                           asm.mov64_imm(R6, 5), asm.ld_map_fd(R2, progs_fd),
                           asm.mov64_imm(R3, 0), asm.call(Helper.tail_call),
                           asm.mov64_imm(R0, 7), asm.exit())

    btf = kernel.btf_load(static_funcs_btf(2))
    progs = kernel.map_create(MapType.PROG_ARRAY, 4, 4, 1)
    fds = [btf, progs]
    try:
        fds.append(kernel.prog_load(ProgType.SCHED_CLS, target)[0])
        kernel.map_update_elem(progs, bytes(4), fds[-1].to_bytes(4, "little"))
        fds.append(kernel.prog_load(ProgType.SCHED_CLS, caller(progs), btf_fd=btf,
                                    func_info=((0, 3), (4, 4)))[0])
        expected = kernel.prog_test_run(fds[-1], PACKET)[0]
    finally:
        for fd in fds:
            os.close(fd)
    assert expected == 142
    vm_progs = create_map(MapType.PROG_ARRAY, 4, 4, 1)
    vm_progs.put(bytes(4), load(target, ProgType.SCHED_CLS))
    # (unverified: the verifier refuses tail calls in callees of programs without BTF, as
    # the kernel does; the kernel above gets func_info BTF, which our loader never has)
    prog, _ = load_program(ProgType.SCHED_CLS, caller(9), license="GPL",
                           resolve_map={9: vm_progs}.__getitem__, verify=False)
    for tier in TIERS:
        assert prog.test_run(PACKET, tier=tier).retval == expected, tier
