"""`bpffs-vm-plugin` run as the BPF conformance suite's runner runs it: a subprocess taking
the program in hex on stdin (or --program) and the memory in hex as its last argument."""

from __future__ import annotations

import shutil
import subprocess
import sys

PLUGIN = [shutil.which("bpffs-vm-plugin")] if shutil.which("bpffs-vm-plugin") else \
    [sys.executable, "-m", "bpffs.vm.conformance_plugin"]


def plugin(program: bytes, memory: bytes = b"", *extra: str, stdin: bool = True
           ) -> subprocess.CompletedProcess:
    args = [*PLUGIN, *extra, " ".join(f"{b:02x}" for b in memory)]
    text = " ".join(f"{b:02x}" for b in program)
    if not stdin:
        args += ["--program", text]
    return subprocess.run(args, input=text if stdin else "", capture_output=True, text=True,
                          timeout=60)
