"""`bpffs-vm-plugin` speaks the BPF conformance suite's plugin protocol: program hex on
stdin (or --program), memory hex as the first argument, r0 in hex on stdout."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from plugin_runner import PLUGIN, plugin

from bpffs.vm import asm
from bpffs.vm.isa import R0, R1, R2, Alu

SUM_MEMORY = asm.program(asm.ldx(4, R0, R1, 0), asm.ldx(4, R2, R1, 4),
                         asm.alu64(Alu.ADD, R0, R2, reg=True), asm.exit())


@pytest.mark.parametrize("tier", ["compiled", "interpreter"])
def test_reads_the_memory_argument_and_prints_r0_in_hex(tier: str) -> None:
    out = plugin(SUM_MEMORY, (0x10).to_bytes(4, "little") + (0x20).to_bytes(4, "little"),
                 "--tier", tier)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "30"


def test_program_may_come_from_an_option() -> None:
    out = plugin(asm.program(asm.ld_imm64(R0, 0xDEADBEEFCAFE), asm.exit()), stdin=False)
    assert (out.returncode, out.stdout.strip()) == (0, "deadbeefcafe")


def test_r2_holds_the_memory_length() -> None:
    out = plugin(asm.program(asm.mov64_reg(R0, R2), asm.exit()), bytes(13))
    assert out.stdout.strip() == "d"


def test_an_out_of_bounds_load_fails_with_a_message() -> None:
    out = plugin(asm.program(asm.ldx(8, R0, R1, 4), asm.exit()), bytes(8))
    assert out.returncode == 1
    assert "invalid read of 8 bytes at offset 4" in out.stderr


def test_malformed_hex_is_an_error() -> None:
    out = subprocess.run([*PLUGIN, ""], input="b7 0", capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and "bpffs-vm-plugin" in out.stderr


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang is not installed")
def test_elf_mode_runs_the_main_function_of_an_object(tmp_path) -> None:
    """The runner's --elf mode sends an ELF object; `main` is the program."""
    source = tmp_path / "prog.c"
    source.write_text("static int helper(int x) { return x * 3; }\n"
                      "int other(void) { return 1; }\n"
                      "int main(unsigned long long *mem) { return helper(mem[0]) + 2; }\n")
    obj = tmp_path / "prog.o"
    subprocess.run(["clang", "-O2", "-ffreestanding", "-target", "bpf", "-c", str(source), "-o",
                    str(obj)],
                   check=True, timeout=60)
    out = subprocess.run([*PLUGIN, "--elf", (13).to_bytes(8, "little").hex()],
                         input=obj.read_bytes().hex(), capture_output=True, text=True,
                         timeout=60)
    assert (out.returncode, out.stdout.strip()) == (0, "29"), out.stderr  # 13 * 3 + 2
