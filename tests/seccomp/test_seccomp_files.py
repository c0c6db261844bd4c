"""What a tool reads about an object fd outside bpf(): readlink of /proc/self/fd/N and the lines
of /proc/self/fdinfo/N (opened as fopen "r" opens it), compared with a kernel map's."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import DaemonProcess
from seccomp_helpers import RAW_BPF, Run

from bpffs.vm.uapi import MapType

pytestmark = pytest.mark.fuse

# what the kernel prints and bpffsd matches; pos/flags/mnt_id/ino are the fd's own, memlock
# and map_id differ by design
COMPARED = ("map_type", "key_size", "value_size", "max_entries", "map_flags", "map_extra",
            "frozen")

READER = RAW_BPF + textwrap.dedent("""
    fd = obj_get(sys.argv[1])
    link = os.readlink(f"/proc/self/fd/{fd}")
    short = os.readlink(f"/proc/{os.getpid()}/fd/{fd}")
    info = libc.open(f"/proc/self/fdinfo/{fd}".encode(), os.O_RDONLY)  # fopen "r": no CLOEXEC
    text = os.read(info, 4096).decode()
    lines = dict(line.split(":\\t", 1) for line in text.splitlines())
    print(json.dumps({"link": link, "link by pid": short, "fdinfo": lines}))
""")


def test_readlink_and_fdinfo_of_a_map_fd(under_exec: Run, plain: Run, bpf_dir: Path,
                                         kernel_bpffs: Path, daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        fd = c.map_create(MapType.HASH, 4, 8, 16, name="m")
        c.obj_pin(fd, str(bpf_dir / "m"))
    made = plain("bpftool", "map", "create", str(kernel_bpffs / "m"), "type", "hash", "key",
                 "4", "value", "8", "entries", "16", "name", "m")
    if made.returncode:
        pytest.skip(f"bpftool cannot create a kernel map here: {made.stderr}")
    ours = under_exec(sys.executable, "-c", READER, str(bpf_dir / "m"))
    kernels = plain(sys.executable, "-c", READER, str(kernel_bpffs / "m"))
    assert ours.returncode == 0, ours.stderr
    got, want = json.loads(ours.stdout), json.loads(kernels.stdout)
    assert got["link"] == want["link"] == "anon_inode:bpf-map"
    assert got["link by pid"] == want["link by pid"]
    assert list(got["fdinfo"]) == list(want["fdinfo"])  # the same lines, in the same order
    assert {k: got["fdinfo"][k] for k in COMPARED} == {k: want["fdinfo"][k] for k in COMPARED}
    assert got["fdinfo"]["flags"] == want["fdinfo"]["flags"]
    with daemon.client() as c:
        assert int(got["fdinfo"]["map_id"]) == c.obj_get_info_by_fd(
            c.obj_get(str(bpf_dir / "m")))["id"]
