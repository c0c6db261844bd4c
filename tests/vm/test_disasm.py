"""`vm.disassemble` prints what `bpftool prog dump xlated` prints (the kernel's
kernel/bpf/disasm.c): checked against the bpftool of this machine on programs the running
kernel loaded, and, for the instructions newer than that bpftool, against disasm.c's formats."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from bpffs.vm import asm, disassemble, kernel
from bpffs.vm.isa import R0, R1, R10, Alu, Atomic, Class, Insn, Jmp, Source
from bpffs.vm.uapi import ProgType


def prologue() -> list:
    """An unknown u64 spilled at r10-16 and an unknown u32 at r10-24 (from the context), so
    the kernel can neither fold an instruction nor prove a branch dead; a zeroed r10-8."""
    return [asm.mov64_reg(6, R1), asm.ldx(4, 2, 6, 4), asm.alu64(Alu.LSH, 2, imm=32, reg=False),
            asm.ldx(4, 3, 6, 8), asm.alu64(Alu.OR, 2, 3, reg=True), asm.stx(8, R10, 2, -16),
            asm.ldx(4, 3, 6, 0), asm.stx(8, R10, 3, -24), asm.st(8, R10, -8, 0)]


def exercise(form: Insn) -> list:
    """The form on fresh unknowns; a jump skips one insn."""
    reload = [asm.ldx(8, 2, R10, -16), asm.ldx(8, 3, R10, -24), asm.mov64_imm(R0, 0)]
    return [*reload, form, *([asm.mov64_imm(R0, 1)] if form.cls in (Class.JMP, Class.JMP32)
                             else [])]


def forms_bpftool_knows() -> list[Insn]:
    forms: list[Insn] = []
    for cls in (Class.ALU64, Class.ALU):
        for op in (Alu.ADD, Alu.SUB, Alu.MUL, Alu.OR, Alu.AND, Alu.LSH, Alu.RSH, Alu.XOR,
                   Alu.MOV, Alu.ARSH):
            forms.append(Insn(cls | op | Source.X, 2, 3, 0, 0))
            shift = op in (Alu.LSH, Alu.RSH, Alu.ARSH)
            forms.append(Insn(cls | op | Source.K, 2, 0, 0, 7 if shift else -5))
        forms += [Insn(cls | Alu.NEG, 2, 0, 0, 0), Insn(cls | Alu.DIV | Source.K, 2, 0, 0, 3),
                  Insn(cls | Alu.MOD | Source.K, 2, 0, 0, 3)]
    for width in (16, 32, 64):
        forms += [Insn(Class.ALU | Alu.END | Source.K, 2, 0, 0, width),
                  Insn(Class.ALU | Alu.END | Source.X, 2, 0, 0, width)]
    for size in (1, 2, 4, 8):
        forms += [asm.stx(size, R10, 3, -8), asm.st(size, R10, -8, -3),
                  asm.ldx(size, 4, R10, -8)]
    for size in (4, 8):
        for op in (Atomic.ADD, Atomic.OR, Atomic.AND, Atomic.XOR, Atomic.ADD | Atomic.FETCH,
                   Atomic.XOR | Atomic.FETCH, Atomic.XCHG, Atomic.CMPXCHG):
            forms.append(asm.atomic(size, op, R10, 3, -8))
    for cls in (Class.JMP, Class.JMP32):
        for op in (Jmp.JEQ, Jmp.JGT, Jmp.JGE, Jmp.JSET, Jmp.JNE, Jmp.JSGT, Jmp.JSGE,
                   Jmp.JLT, Jmp.JLE, Jmp.JSLT, Jmp.JSLE):
            forms += [Insn(cls | op | Source.X, 2, 3, 1, 0),
                      Insn(cls | op | Source.K, 2, 0, 1, -7)]
    return forms


def bpftool_xlated(code: bytes) -> list[str]:
    fd, _ = kernel.prog_load(ProgType.SCHED_CLS, code)
    try:
        with open(f"/proc/self/fdinfo/{fd}") as fdinfo:
            prog_id = next(line.split()[1] for line in fdinfo if line.startswith("prog_id:"))
        out = subprocess.run(["bpftool", "prog", "dump", "xlated", "id", prog_id],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.close(fd)
    return [line.strip() for line in out.splitlines() if line.strip()]


@pytest.mark.kernel
@pytest.mark.skipif(shutil.which("bpftool") is None, reason="bpftool is not installed")
def test_each_instruction_prints_as_bpftool_prints_the_kernel_s_copy() -> None:
    body = [insn for form in forms_bpftool_knows() for insn in exercise(form)]
    code = asm.program(*prologue(), *body, asm.mov64_imm(R0, 0), asm.exit())
    ours = disassemble(code)[len(prologue()):]
    theirs = bpftool_xlated(code)[-len(ours):]  # the kernel may expand the context loads
    strip_pc = [line.split(": ", 1)[1] for line in ours], [line.split(": ", 1)[1]
                                                             for line in theirs]
    assert strip_pc[0] == strip_pc[1]
    assert len(ours) == len(body) + 2 and len(forms_bpftool_knows()) == 124


@pytest.mark.parametrize("insn,text", [
    (Insn(Class.ALU64 | Alu.DIV | Source.K, 2, 0, 1, 3), "(37) r2 s/= 3"),
    (Insn(Class.ALU | Alu.MOD | Source.X, 2, 3, 1, 0), "(9c) w2 s%= w3"),
    (Insn(Class.ALU64 | Alu.MOV | Source.X, 2, 3, 8, 0), "(bf) r2 = (s8)r3"),
    (Insn(Class.ALU | Alu.MOV | Source.X, 2, 3, 16, 0), "(bc) w2 = (s16)w3"),
    (Insn(Class.ALU64 | Alu.END, 2, 0, 0, 32), "(d7) r2 = bswap32 r2"),
    (asm.ldxs(2, 4, R10, -8), "(89) r4 = *(s16 *)(r10 -8)"),
    (Insn(Class.JMP32 | Jmp.JA, 0, 0, 0, -3), "(06) gotol pc-3"),
    (asm.call_local(5), "(85) call pc+5"),
], ids=["sdiv", "smod32", "movsx8", "movsx16 32-bit", "bswap32", "ldxsh", "gotol", "call"])
def test_instructions_newer_than_4_4_print_as_kernel_disasm_c_does(insn, text) -> None:
    assert disassemble(asm.program(insn)) == [f"0: {text}"]


def test_map_references_print_as_map_ids_and_ld_imm64_takes_two_slots() -> None:
    code = asm.program(asm.ld_map_fd(R1, 0), asm.ld_imm64(R0, 0x1_0000_0002), asm.exit())
    assert disassemble(code, maps=[17]) == ["0: (18) r1 = map[id:17]",
                                            "2: (18) r0 = 0x100000002", "4: (95) exit"]
