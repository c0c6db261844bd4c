"""The running kernel is the oracle: the same bytecode through BPF_PROG_TEST_RUN and through
the VM (both tiers) must return the same value and packet."""

from __future__ import annotations

import os

import pytest
from progs import ETH_IPV4, load, random_program
from test_tiers import CASES, returns64

from bpffs.vm import kernel
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
    for tier in ("interpreter", "compiled"):
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
        for tier in ("interpreter", "compiled"):
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
            for tier in ("interpreter", "compiled"):
                assert vm_run(code, data, tier, prog_type) == expected, (width, off, tier)
