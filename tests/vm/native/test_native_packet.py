"""LD_ABS and LD_IND read the packet natively (SkBuff.load's rules: network byte order, the
end of the program beyond the frame, the SKF_*_OFF bases through Python) and see the frame a
helper just changed, replaced or lengthened."""

from __future__ import annotations

import pytest

pytest.importorskip("llvmlite")

from native_cases import PACKET, REFERENCE, outcome

from bpffs.vm import asm
from bpffs.vm.isa import R0, R1, R2, R3, R4, R5, R6, R7, R8, R10, Alu
from bpffs.vm.uapi import SKF_LL_OFF, SKF_NET_OFF, Helper, ProgType


def same(code: bytes, **kw) -> str:
    native = outcome(code, "native", **kw)
    assert native == outcome(code, REFERENCE, **kw)
    return native.result


@pytest.mark.parametrize("prog_type", [ProgType.SCHED_CLS, ProgType.SOCKET_FILTER])
@pytest.mark.parametrize("size", [1, 2, 4, 8])
@pytest.mark.parametrize("off", [0, 5, 12, len(PACKET) - 8, len(PACKET) - 4, len(PACKET) - 1,
                                 len(PACKET), 1 << 20, 0x7FFFFFFF, -1, SKF_NET_OFF,
                                 SKF_NET_OFF + 3, SKF_LL_OFF + 12, SKF_LL_OFF - 1])
def test_ld_abs_and_ld_ind_at_every_kind_of_offset(off: int, size: int, prog_type) -> None:
    absolute = asm.program(asm.mov64_reg(R6, R1), asm.mov64_imm(R0, 77),
                           asm.ld_abs(size, off), asm.exit())
    same(absolute, prog_type=prog_type)
    for base in (0, 3, -3, 1 << 31):
        indirect = asm.program(asm.mov64_reg(R6, R1), asm.ld_imm64(R7, base),
                               asm.ld_ind(size, R7, off - base if -2**31 <= off - base < 2**31
                                          else off), asm.exit())
        same(indirect, prog_type=prog_type)


def test_a_frame_changed_by_a_helper_is_read_as_changed() -> None:
    code = asm.program(asm.mov64_reg(R6, R1), asm.ld_abs(1, 20), asm.mov64_reg(R8, R0),
                       asm.st(4, R10, -4, 0x5A5A5A5A),
                       asm.mov64_reg(R1, R6), asm.mov64_imm(R2, 20), asm.mov64_reg(R3, R10),
                       asm.add64_imm(R3, -4), asm.mov64_imm(R4, 1), asm.mov64_imm(R5, 0),
                       asm.call(Helper.skb_store_bytes),
                       asm.ld_abs(1, 20), asm.alu64(Alu.LSH, R8, imm=8, reg=False),
                       asm.alu64(Alu.OR, R0, R8, reg=True), asm.exit())
    assert same(code) == f"r0={(PACKET[20] << 8) | 0x5A:#x}"


def test_a_frame_lengthened_by_a_helper_is_read_to_its_new_end() -> None:
    """Two VLAN pushes put the first tag into the frame: four bytes longer."""
    code = asm.program(asm.mov64_reg(R6, R1),
                       asm.mov64_reg(R1, R6), asm.mov64_imm(R2, 0x0081), asm.mov64_imm(R3, 5),
                       asm.call(Helper.skb_vlan_push),
                       asm.mov64_reg(R1, R6), asm.mov64_imm(R2, 0x0081), asm.mov64_imm(R3, 6),
                       asm.call(Helper.skb_vlan_push),
                       asm.ld_abs(4, len(PACKET)), asm.exit())
    same(code)
    assert same(code) != "r0=0x0"
