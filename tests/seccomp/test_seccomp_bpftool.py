"""Debian's bpftool, unmodified, under `bpffs exec` against a bpffsd mount: its output must be
the kernel's for the same commands on a kernel bpffs (ids and memlock normalised)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import DaemonProcess
from seccomp_helpers import BPFFS_EXEC, REPO, Run, normalise
from seccomp_programs import PROG, build_bpf_object

from bpffs.vm.uapi import MapType

pytestmark = pytest.mark.fuse


def _sequence(run: Run, bpftool: str, root: Path) -> list[tuple[str, int, str]]:
    """The map commands of the issue, in order: (command, status, output)."""
    y, z = root / "y", root / "z"
    steps = [
        ["map", "create", str(y), "type", "hash", "key", "4", "value", "4", "entries", "8",
         "name", "y"],
        ["map", "update", "pinned", str(y), "key", "1", "0", "0", "0", "value", "2", "0", "0",
         "0"],
        ["map", "update", "pinned", str(y), "key", "3", "0", "0", "0", "value", "4", "0", "0",
         "0"],
        ["map", "lookup", "pinned", str(y), "key", "1", "0", "0", "0"],
        ["map", "lookup", "pinned", str(y), "key", "9", "0", "0", "0"],
        ["map", "dump", "pinned", str(y)],
        ["map", "show", "pinned", str(y)],
        ["-j", "map", "show", "pinned", str(y)],
        ["map", "update", "pinned", str(y), "key", "1", "0", "0", "0", "value", "5", "0", "0",
         "0", "noexist"],
        ["map", "delete", "pinned", str(y), "key", "1", "0", "0", "0"],
        ["map", "delete", "pinned", str(y), "key", "1", "0", "0", "0"],
        ["map", "getnext", "pinned", str(y)],  # one element left: no hash order to differ
        ["map", "getnext", "pinned", str(y), "key", "3", "0", "0", "0"],
        ["-p", "map", "dump", "pinned", str(y)],
        ["map", "pin", "pinned", str(y), str(z)],
        ["-j", "map", "dump", "pinned", str(z)],
        ["map", "show", "pinned", str(root / "missing")],
    ]
    out = []
    for step in steps:
        done = run(bpftool, *step)
        text = normalise(done.stdout + done.stderr, root)
        if "dump" in step and "-j" not in step and "-p" not in step:
            text = "".join(sorted(text.splitlines(keepends=True)))  # hash order is the kernel's
        out.append((" ".join(step), done.returncode, text))
    return out


def test_map_commands_match_the_kernel(bpftool: str, under_exec: Run, plain: Run,
                                       bpf_dir: Path, kernel_bpffs: Path) -> None:
    ours = _sequence(under_exec, bpftool, bpf_dir)
    kernels = _sequence(plain, bpftool, kernel_bpffs)
    for (cmd, status, text), (_, k_status, k_text) in zip(ours, kernels, strict=True):
        assert (status, text) == (k_status, k_text), f"bpftool {cmd}"
    assert sorted(p.name for p in bpf_dir.iterdir()) == ["y", "z"]


def _mounts(under: Path) -> list[bytes]:
    """Mount points at or below a directory (other tests mount elsewhere meanwhile)."""
    root = os.fsencode(under)
    with open("/proc/self/mountinfo", "rb") as f:
        return [point for point in (line.split()[4] for line in f)
                if point == root or point.startswith(root + b"/")]


def test_map_create_makes_the_map_in_bpffsd_without_mounting(
        bpftool: str, under_exec: Run, bpf_dir: Path, daemon: DaemonProcess) -> None:
    """Without the supervisor, bpftool mounts a kernel bpffs over a directory whose statfs
    is not BPF_FS_MAGIC, hiding every pin of ours."""
    before = _mounts(bpf_dir)
    done = under_exec(bpftool, "map", "create", str(bpf_dir / "y"), "type", "hash", "key", "4",
                      "value", "4", "entries", "8", "name", "y")
    assert done.returncode == 0, done.stderr
    assert _mounts(bpf_dir) == before
    with daemon.client() as c:
        fd = c.obj_get(str(bpf_dir / "y"))
        info = c.obj_get_info_by_fd(fd)
    assert (info["type"], info["name"], info["bytes_key"], info["bytes_value"],
            info["max_entries"]) == ("hash", "y", 4, 4, 8)


def test_pins_of_our_client_are_bpftools(bpftool: str, under_exec: Run, bpf_dir: Path,
                                         daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        fd = c.map_create(MapType.ARRAY, 4, 8, 2, name="arr")
        c.map_update_elem(fd, b"\1\0\0\0", (42).to_bytes(8, "little"))
        c.obj_pin(fd, str(bpf_dir / "arr"))
    done = under_exec(bpftool, "map", "dump", "pinned", str(bpf_dir / "arr"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ("key: 00 00 00 00  value: 00 00 00 00 00 00 00 00\n"
                           "key: 01 00 00 00  value: 2a 00 00 00 00 00 00 00\n"
                           "Found 2 elements\n")
    shown = under_exec(bpftool, "map", "show", "pinned", str(bpf_dir / "arr"))
    assert shown.stdout.split(":", 1)[1] == (
        " array  name arr  flags 0x0\n\tkey 4B  value 8B  max_entries 2  memlock 4096B\n")


def test_prog_load_show_and_dump(bpftool: str, under_exec: Run, bpf_dir: Path,
                                 tmp_path: Path, daemon: DaemonProcess) -> None:
    """bpftool prog load (libbpf: probes, BTF refused, map created, pins), then prog show
    and dump xlated of the pin: the fields bpftool prints come from bpffsd."""
    obj = build_bpf_object(PROG, tmp_path)
    done = under_exec(bpftool, "prog", "load", str(obj), str(bpf_dir / "p"), "type", "socket",
                      "pinmaps", str(bpf_dir / "maps"))
    assert done.returncode == 0, done.stderr
    with daemon.client() as c:
        info = c.obj_get_info_by_fd(c.obj_get(str(bpf_dir / "p")))
        map_id = c.obj_get_info_by_fd(c.obj_get(str(bpf_dir / "maps" / "counts")))["id"]
    shown = under_exec(bpftool, "-j", "prog", "show", "pinned", str(bpf_dir / "p"))
    assert shown.returncode == 0, shown.stderr
    j = json.loads(shown.stdout)
    assert (j["id"], j["type"], j["name"], j["tag"], j["gpl_compatible"], j["jited"],
            j["map_ids"], j["bytes_xlated"]) == (
        info["id"], "socket_filter", "count_pkt", info["tag"], True, False, [map_id],
        info["bytes_xlated"])
    text = under_exec(bpftool, "prog", "show", "pinned", str(bpf_dir / "p")).stdout
    assert f"{info['id']}: socket_filter  name count_pkt  tag {info['tag']}  gpl\n" in text
    assert f"not jited  memlock 4096B  map_ids {map_id}\n" in text
    dump = under_exec(bpftool, "prog", "dump", "xlated", "pinned", str(bpf_dir / "p")).stdout
    assert f"r1 = map[id:{map_id}]" in dump
    assert dump.rstrip().endswith("exit")
    listed = under_exec(bpftool, "-j", "prog", "show")  # PROG_GET_NEXT_ID / GET_FD_BY_ID
    assert info["id"] in [p["id"] for p in json.loads(listed.stdout)], listed.stderr
    listed = under_exec(bpftool, "-j", "map", "show")
    assert map_id in [m["id"] for m in json.loads(listed.stdout)], listed.stderr
    packet, out = tmp_path / "packet", tmp_path / "out"
    packet.write_bytes(bytes(64))
    ran = under_exec(bpftool, "prog", "run", "pinned", str(bpf_dir / "p"), "data_in",
                     str(packet), "data_out", str(out), "repeat", "3")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("Return value: 0, duration (average): ")
    assert out.read_bytes() == bytes(64)  # a socket filter leaves the packet as it was
    with daemon.client() as c:  # three runs counted on skb->len & 15 = (64 - 14) & 15 = 2
        counts = c.obj_get(str(bpf_dir / "maps" / "counts"))
        assert c.map_lookup_elem(counts, b"\2\0\0\0") == (3).to_bytes(8, "little")


def test_exit_status_and_missing_command(under_exec: Run) -> None:
    assert under_exec("sh", "-c", "exit 7").returncode == 7
    missing = under_exec("/nonexistent/tool")
    assert missing.returncode == 127
    assert "/nonexistent/tool: No such file or directory" in missing.stderr
    assert under_exec("sh", "-c", "kill -TERM $$").returncode == 128 + 15


def test_no_daemon_is_an_error_before_the_command_runs(tmp_path: Path, seccomp_ok: None
                                                      ) -> None:
    marker = tmp_path / "ran"
    done = subprocess.run([*BPFFS_EXEC, "--socket", str(tmp_path / "none.sock"), "--",
                           "touch", str(marker)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 255
    assert "cannot reach bpffsd" in done.stderr
    assert not marker.exists()
    usage = subprocess.run(BPFFS_EXEC, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "Usage: bpffs exec" in usage.stderr


def test_our_mount_looks_like_bpffs_and_cannot_be_hidden(under_exec: Run, bpf_dir: Path,
                                                         seccomp_ok: None) -> None:
    """statfs answers BPF_FS_MAGIC on a bpffsd mount (and only there); `mount -t bpf` onto it
    answers 0 without mounting, so no tool can hide our tree behind a kernel bpffs."""
    done = under_exec("stat", "-f", "-c", "%t", str(bpf_dir), str(bpf_dir.parent), "/")
    assert done.stdout.split()[:2] == ["cafe4a11", "cafe4a11"], done.stderr
    assert done.stdout.split()[2] != "cafe4a11"
    if os.geteuid() != 0:
        pytest.skip("mount(2) needs root")
    before = _mounts(bpf_dir)
    done = under_exec("mount", "-t", "bpf", "bpf", str(bpf_dir))
    assert done.returncode == 0, done.stderr
    assert _mounts(bpf_dir) == before
