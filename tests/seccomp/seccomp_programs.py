"""BPF programs the `bpffs exec` tests build with clang (and the C programs linked with
libbpf): sources and builders, skipping where the toolchain is missing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

PROG = """
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u64);
} counts SEC(".maps");
SEC("socket")
int count_pkt(struct __sk_buff *skb)
{
	__u32 key = skb->len & 15;
	__u64 one = 1, *v = bpf_map_lookup_elem(&counts, &key);
	if (v)
		__sync_fetch_and_add(v, 1);
	else
		bpf_map_update_elem(&counts, &key, &one, BPF_ANY);
	return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""

PINNED_PROG = PROG.replace("__type(value, __u64);\n",
                           "__type(value, __u64);\n\t__uint(pinning, LIBBPF_PIN_BY_NAME);\n")


def build_bpf_object(source: str, where: Path) -> Path:
    """A clang-built BPF object (skips where clang or the libbpf headers are missing)."""
    if not Path("/usr/include/bpf/bpf_helpers.h").exists():
        pytest.skip("libbpf headers are not installed (Debian: apt-get install libbpf-dev)")
    src, obj = where / "prog.bpf.c", where / "prog.bpf.o"
    src.write_text(source)
    include = f"/usr/include/{os.uname().machine}-linux-gnu"  # Debian's asm/types.h
    try:
        subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I{include}", "-c", str(src),
                        "-o", str(obj)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot build a BPF object with clang: {e}")
    return obj


def build_libbpf_program(source: str, where: Path, name: str) -> Path:
    """A C program linked with Debian's libbpf (skips where clang or libbpf-dev is missing)."""
    if not Path("/usr/include/bpf/libbpf.h").exists():
        pytest.skip("libbpf headers are not installed (Debian: apt-get install libbpf-dev)")
    src, exe = where / f"{name}.c", where / name
    src.write_text(source)
    try:
        subprocess.run(["clang", "-O2", "-o", str(exe), str(src), "-lbpf"], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot build a libbpf program: {e}")
    return exe
