"""Memory safety by construction, the second line of defence behind the verifier: every
access outside the program's regions stops the run with a clear error and touches nothing
else; the instruction budget stops runaway programs."""

from __future__ import annotations

import errno

import pytest
from progs import ETH_IPV4
from tiers import TIERS

from bpffs.vm import BpfError, asm, load_program
from bpffs.vm.context import SKB
from bpffs.vm.isa import R0, R1, R2, R10, Jmp
from bpffs.vm.maps import create_map
from bpffs.vm.uapi import Helper, MapType, ProgType

PACKET = ETH_IPV4 + bytes(50)


def run(code: bytes, tier: str, maps: dict | None = None, **kwargs):
    """Run without the verifier: these programs are the ones it exists to refuse."""
    prog, _ = load_program(ProgType.SCHED_CLS, code, license="GPL",
                           resolve_map=(maps or {}).__getitem__, verify=False)
    return prog.test_run(PACKET, tier=tier, **kwargs)


def faults(code: bytes, tier: str, message: str, maps: dict | None = None) -> None:
    with pytest.raises(BpfError) as info:
        run(code, tier, maps)
    assert info.value.errno == errno.EFAULT
    assert message in str(info.value)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("code,message", [
    (asm.program(asm.ldx(8, R0, R10, 0), asm.exit()), "offset 512 of stack of frame 0"),
    (asm.program(asm.st(8, R10, -520, 1), asm.mov64_imm(R0, 0), asm.exit()), "not a mapped"),
    (asm.program(asm.ldx(4, R0, R1, 76), asm.exit()), "offset 76 of context"),
    (asm.program(asm.mov64_imm(R1, 0), asm.ldx(1, R0, R1, 0), asm.exit()), "not a mapped"),
    (asm.program(asm.ld_imm64(R1, 0xFFFF_FFFF_FFFF_FFF0), asm.stx(8, R1, R1, 0),
                 asm.mov64_imm(R0, 0), asm.exit()), "not a mapped"),
], ids=["stack above r10", "stack below 512", "ctx past the end", "null", "wild pointer"])
def test_invalid_accesses_stop_the_program(code: bytes, message: str, tier: str) -> None:
    faults(code, tier, message)


@pytest.mark.parametrize("tier", TIERS)
def test_a_map_value_is_bounded_by_value_size(tier: str) -> None:
    m = create_map(MapType.HASH, 4, 8, 4)
    m.update(bytes(4), bytes(8))
    code = asm.program(asm.st(4, R10, -4, 0), asm.mov64_reg(R2, R10), asm.add64_imm(R2, -4),
                       asm.ld_map_fd(R1, 9), asm.call(Helper.map_lookup_elem),
                       asm.jmp_imm(Jmp.JEQ, R0, 0, 1), asm.st(8, R0, 4, 1),
                       asm.mov64_imm(R0, 0), asm.exit())
    faults(code, tier, "offset 4 of value of", {9: m})
    assert m.lookup_copy(bytes(4)) == bytes(8)  # nothing was written


@pytest.mark.parametrize("tier", TIERS)
def test_a_map_pointer_cannot_be_dereferenced(tier: str) -> None:
    m = create_map(MapType.ARRAY, 4, 8, 4)
    faults(asm.program(asm.ld_map_fd(R1, 9), asm.ldx(8, R0, R1, 0), asm.exit()), tier,
           "not a mapped region", {9: m})


@pytest.mark.parametrize("tier", TIERS)
def test_the_budget_stops_a_runaway_loop(tier: str) -> None:
    code = asm.program(asm.mov64_imm(R0, 1), asm.add64_imm(R0, 1),
                       asm.jmp_imm(Jmp.JNE, R0, 0, -2), asm.exit())
    with pytest.raises(BpfError, match="instruction budget exhausted"):
        run(code, tier, env=None)


@pytest.mark.parametrize("tier", TIERS)
def test_a_fault_leaves_earlier_writes_of_the_run_in_place(tier: str) -> None:
    """Like a kernel program killed midway, map writes already done stay."""
    m = create_map(MapType.ARRAY, 4, 8, 1)
    code = asm.program(asm.st(4, R10, -4, 0), asm.mov64_reg(R2, R10), asm.add64_imm(R2, -4),
                       asm.ld_map_fd(R1, 9), asm.call(Helper.map_lookup_elem),
                       asm.jmp_imm(Jmp.JEQ, R0, 0, 2), asm.st(8, R0, 0, 5),
                       asm.ldx(8, R0, R0, 8), asm.exit())
    faults(code, tier, "offset 8 of value", {9: m})
    assert m.lookup_copy(bytes(4)) == (5).to_bytes(8, "little")


@pytest.mark.parametrize("tier", TIERS)
def test_socket_filters_see_tc_classid_as_unreadable_by_the_verifier_not_the_vm(tier) -> None:
    """The ctx region is one buffer: access rules per field are the verifier's job; the VM
    only guarantees the buffer's bounds."""
    r = run(asm.program(asm.st(4, R1, SKB["tc_classid"], 0x10002), asm.mov64_imm(R0, 0),
                        asm.exit()), tier)
    assert r.effects["tc_classid"] == 0x10002
