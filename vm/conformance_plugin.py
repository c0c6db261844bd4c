"""`bpffs-vm-plugin`: this VM behind the plugin protocol of the BPF conformance suite
(github.com/Alan-Jowett/bpf_conformance), as the kernel, uBPF and rbpf plugins are.

The runner writes the program as hex bytes on stdin (or passes `--program HEX`) and the
memory as hex in the first argument; the program runs with r1 = that memory and r2 = its
length, and the plugin prints r0 in hex. With `--elf` the hex is an ELF object as the runner
writes it (the program is its `main` symbol). A program that faults prints the fault on stderr
and exits 1. No verifier runs (the suite tests the instruction set, not the verifier);
`--tier interpreter` selects the reference tier, `--tier native` LLVM (needs llvmlite).

    bpffs-vm-plugin "01 02 03" < program.hex
    bpf_conformance_runner --test_file_directory tests --plugin_path bpffs-vm-plugin
"""

from __future__ import annotations

import argparse
import io
import sys

from .env import RunEnv
from .errors import BpfError, VmFault
from .isa import U64, decode
from .program import TIERS, Program
from .run import Run
from .uapi import ProgType


def program_of_elf(image: bytes, symbol: str = "main") -> bytes:
    """The instructions of `symbol` in an ELF object (the runner's --elf mode)."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        elf = ELFFile(io.BytesIO(image))
        symtab = elf.get_section_by_name(".symtab")
        sym = next(s for s in symtab.iter_symbols() if s.name == symbol) if symtab else None
    except (ELFError, StopIteration) as e:
        raise ValueError(f"no function {symbol!r} in the ELF object ({e})") from None
    if sym is None:
        raise ValueError("the ELF object has no symbol table")
    data = elf.get_section(sym["st_shndx"]).data()
    start = sym["st_value"]
    return data[start:start + sym["st_size"]] if sym["st_size"] else data[start:]


def run_hex(program_hex: str, memory_hex: str = "", tier: str = "compiled",
            elf: bool = False) -> int:
    """r0 of the program, given as the suite gives it."""
    code = bytes.fromhex("".join(program_hex.split()))
    if elf:
        code = program_of_elf(code)
    memory = bytearray.fromhex("".join(memory_hex.split()))
    prog = Program(ProgType.SOCKET_FILTER, code, decode(code), [], name="conformance",
                   license="GPL", kern_version=0)
    run = Run(prog, RunEnv(), None, memory)
    return prog.entry(tier)(run, run.ctx_addr if memory else 0, len(memory)) & U64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="BPF conformance plugin for the bpffs VM")
    parser.add_argument("memory", nargs="?", default="", help="memory contents as hex bytes")
    parser.add_argument("--program", help="program as hex bytes (default: read stdin)")
    parser.add_argument("--tier", choices=TIERS, default="compiled")
    parser.add_argument("--elf", action="store_true", help="the program is an ELF object")
    args, _unknown = parser.parse_known_args(argv)
    program = args.program if args.program is not None else sys.stdin.read()
    try:
        r0 = run_hex(program, args.memory, args.tier, args.elf)
    except (VmFault, ValueError, BpfError) as e:
        print(f"bpffs-vm-plugin: {e}", file=sys.stderr)
        return 1
    print(f"{r0:x}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
