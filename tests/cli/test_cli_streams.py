"""The streaming commands and the last-resort error path: `prog tracelog` prints each
bpf_trace_printk line once, as the kernel's trace_pipe; a bug inside bpffs is one `Error:`
line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bpffs.client import Client
from bpffs.vm import asm
from bpffs.vm.isa import R1, R2, R3, R10
from bpffs.vm.uapi import Helper, ProgType

FRAME = bytes(12) + b"\x08\x00" + bytes(20)


def printk(fmt: bytes) -> bytes:
    """A program that calls bpf_trace_printk(fmt, len, 5) with fmt (up to 8 bytes, its one
    NUL last, as the kernel checks) on its stack."""
    assert len(fmt) <= 8 and fmt.index(b"\0") == len(fmt) - 1
    return asm.program(asm.ld_imm64(R1, int.from_bytes(fmt.ljust(8, b"\0"), "little")),
                       asm.stx(8, R10, R1, -8), asm.mov64_reg(R1, R10), asm.add64_imm(R1, -8),
                       asm.mov64_imm(R2, len(fmt)), asm.mov64_imm(R3, 5),
                       asm.call(Helper.trace_printk), asm.exit())


def test_tracelog_prints_no_blank_line_after_a_newline(client: Client,
                                                       cli_env: dict[str, str]) -> None:
    """A format that ends in \\n gives one line in trace_pipe, not a line and a blank one."""
    prog = client.prog_load(ProgType.SOCKET_FILTER, printk(b"nl %d\n\0"))
    try:
        for _ in range(2):
            assert client.prog_test_run(prog, FRAME).retval == len("nl 5\n")
    finally:
        os.close(prog)
    trace = subprocess.Popen(["bpffs", "prog", "tracelog"], env=cli_env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert trace.stdout is not None
        lines = [trace.stdout.readline() for _ in range(2)]
    finally:
        trace.terminate()
        trace.wait(30)
    assert [line.rstrip("\n").endswith("bpf_trace_printk: nl 5") for line in lines] \
        == [True, True], lines


def test_a_bug_is_one_error_line(cli_env: dict[str, str], tmp_path: Path) -> None:
    """Any exception that is not an OSError (here planted in `map show`) ends as one line and
    status 255; BPFFS_DEBUG=1 shows the traceback to whoever debugs it."""
    planted = ("import sys; from bpffs.client import cli\n"
               "def broken(*a): raise ValueError('planted')\n"
               "cli.map_cmd.run = broken\n"
               "sys.exit(cli.main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", planted, "map", "show"], env=cli_env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 255
    assert done.stderr.startswith("Error: internal error in bpffs: ValueError: planted")
    assert done.stderr.count("\n") == 1
    debug = subprocess.run([sys.executable, "-c", planted, "map", "show"],
                           env={**cli_env, "BPFFS_DEBUG": "1"}, capture_output=True,
                           text=True, timeout=60)
    assert "Traceback" in debug.stderr and debug.returncode == 255
