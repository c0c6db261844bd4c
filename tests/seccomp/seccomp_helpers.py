"""Helpers of the `bpffs exec` tests: whether seccomp user notification and bpftool are
here, and what differs by design between bpffsd's answers and the kernel's."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from bpffs.client.seccomp.abi import Nr
from bpffs.vm.uapi import Cmd

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# seccomp: NEW_LISTENER 5.0, ADDFD 5.9, ADDFD_FLAG_SEND 5.14
MIN_KERNEL = (5, 14)
# `bpffs exec` from this checkout. Not `-m bpffs.client.cli.exec`: the cli package imports
# its exec module, and runpy then warns on stderr, which the comparisons with the kernel see.
BPFFS_EXEC = [sys.executable, "-c",
              "import sys; from bpffs.client.cli.exec import main; sys.exit(main())"]


# The start of every small ctypes target: raw bpf() through libc.syscall, as a static or Go
# binary makes it (no libbpf in the way), and obj_get(path) -> fd (or -1, errno in libc).
RAW_BPF = textwrap.dedent(f"""
    import ctypes, json, os, struct, sys, threading
    NR_BPF = {Nr.bpf}
    MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, OBJ_GET = \\
        {Cmd.MAP_CREATE}, {Cmd.MAP_LOOKUP_ELEM}, {Cmd.MAP_UPDATE_ELEM}, {Cmd.OBJ_GET}
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.syscall.argtypes = [ctypes.c_long] * 4

    def obj_get(path):
        pin = ctypes.create_string_buffer(path.encode() + b"\\0")
        attr = ctypes.create_string_buffer(struct.pack("<QII", ctypes.addressof(pin), 0, 0))
        return libc.syscall(NR_BPF, OBJ_GET, ctypes.addressof(attr), 16)
""")


def _kernel_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def seccomp_unavailable() -> str | None:
    """Why seccomp user notification cannot be used here (None when it can): a filter is
    installed in a forked child, as `bpffs exec` does."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return "bpffs exec supports x86_64 Linux only"
    if _kernel_version() < MIN_KERNEL:
        return f"seccomp ADDFD with SEND needs Linux 5.14 (this is {os.uname().release})"
    from bpffs.client.seccomp import filter as seccomp_filter
    from bpffs.client.seccomp.notify import install_filter

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            install_filter(seccomp_filter.build())
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return "this kernel refuses a seccomp filter with a user-notification listener"
    return None


def bpftool_path() -> str | None:
    return shutil.which("bpftool") or next(
        (p for p in ("/usr/sbin/bpftool", "/sbin/bpftool") if os.access(p, os.X_OK)), None)


Run = Callable[..., subprocess.CompletedProcess]


def normalise(text: str, *roots: Path) -> str:
    """What differs by design between bpffsd and the kernel: object ids, memlock (the kernel
    charges its own allocation sizes, bpffsd whole pages), and the directory names."""
    for root in roots:
        text = text.replace(str(root), "B")
    text = re.sub(r"^\d+: ", "ID: ", text, flags=re.M)
    text = re.sub(r'"id":\d+', '"id":ID', text)
    text = re.sub(r"memlock \d+B", "memlock NB", text)
    return re.sub(r'"bytes_memlock":\d+', '"bytes_memlock":N', text)
