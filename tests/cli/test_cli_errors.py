"""Every way `bpffs` fails says so in bpftool's style: one `Error: ...` line (or {"error": ...}
with --json), a non-zero status, never a Python traceback. bpftool on a kernel bpffs is the
oracle for the statuses it shares (range errors, a closed pipe, a CPU that does not exist)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_helpers import bpftool, needs_bpftool

from bpffs.client import Client, MapType
from bpffs.vm import asm
from bpffs.vm.isa import R0
from bpffs.vm.uapi import ProgType

Run = Callable[..., subprocess.CompletedProcess]
BIG = "99999999999999999999"  # more than a u64: msgpack's OverflowError, before
U32_OVER = str(2**32)


@pytest.fixture
def objects(client: Client, bpf_dir: Path) -> dict[str, str]:
    """A hash map, a perf_event_array of 2 slots and a program, pinned in bpf_dir."""
    paths = {name: str(bpf_dir / name) for name in ("hash", "events", "prog")}
    for name, fd in (("hash", client.map_create(MapType.HASH, 4, 4, 16)),
                     ("events", client.map_create(MapType.PERF_EVENT_ARRAY, 4, 4, 2)),
                     ("prog", client.prog_load(ProgType.SCHED_CLS,
                                               asm.program(asm.mov64_imm(R0, 0), asm.exit())))):
        client.obj_pin(fd, paths[name])
        os.close(fd)
    paths["dir"] = str(bpf_dir)
    return paths


def bad_invocations(o: dict[str, str], tmp: Path) -> list[tuple[str, ...]]:
    """Wrong words, numbers out of range, missing files, wrong objects: each must fail."""
    h, ev, p, d = o["hash"], o["events"], o["prog"], o["dir"]
    key = ("key", "1", "0", "0", "0")
    return [
        ("frobnicate",),
        ("--frobnicate", "map"),
        ("--socket",),
        ("map", "frobnicate"),
        ("map", "show", "id", BIG),
        ("map", "show", "id", U32_OVER),
        ("map", "show", "id", "-1"),
        ("map", "show", "id", "abc"),
        ("map", "show", "id"),
        ("map", "show", "pinned", f"{d}/missing"),
        ("map", "show", "pinned", p),
        ("map", "show", "name", "no_such_map"),
        ("map", "create", f"{d}/x", "type", "hash", "key", "4", "value", "8", "entries", BIG,
         "name", "x"),
        ("map", "create", f"{d}/x", "type", "hash", "key", U32_OVER, "value", "8", "entries",
         "4", "name", "x"),
        ("map", "create", f"{d}/x", "type", "hash", "key", "4", "value", "8", "entries", "4",
         "flags", BIG),
        ("map", "create", f"{d}/x", "type", "hash", "key", "-4", "value", "8", "entries", "4"),
        ("map", "create", f"{d}/x", "type", "hash", "key", "0", "value", "8", "entries", "4"),
        ("map", "create", f"{d}/x", "type", "frob", "key", "4", "value", "8", "entries", "4"),
        ("map", "create", f"{d}/x"),
        ("map", "create", h, "type", "hash", "key", "4", "value", "4", "entries", "4"),
        ("map", "create", f"{tmp}/offmount", "type", "hash", "key", "4", "value", "4",
         "entries", "4"),
        ("map", "create", f"{d}/a.b", "type", "hash", "key", "4", "value", "4", "entries", "4"),
        ("map", "update", "pinned", h, *key, "value", "1"),
        ("map", "update", "pinned", h, *key, "value", "1", "0", "0", "0", "sometimes"),
        ("map", "update", "pinned", h, "key", "1000", "0", "0", "0", "value", "0", "0", "0", "0"),
        ("map", "update", "pinned", h, "key", "hex", "zz", "0", "0", "0", "value", "0", "0",
         "0", "0"),
        ("map", "lookup", "pinned", h),
        ("map", "delete", "pinned", h, *key),
        ("map", "getnext", "pinned", h, "key", BIG, "0", "0", "0"),
        ("map", "dump", "pinned", ev),
        ("map", "dump", "pinned", h, "extra"),
        ("map", "dump", "pinned", h, "--", "--json"),
        ("map", "pin", "pinned", h, h),
        ("map", "pin", "pinned", h),
        ("map", "event_pipe", "pinned", h),
        ("map", "event_pipe", "pinned", ev, "cpu", "99", "index", "0"),
        ("map", "event_pipe", "pinned", ev, "cpu", BIG, "index", "0"),
        ("map", "event_pipe", "pinned", ev, "cpu", "0", "index", "5"),
        ("map", "event_pipe", "pinned", ev, "cpu", "0"),
        ("prog", "show", "id", BIG),
        ("prog", "show", "pinned", h),
        ("prog", "dump", "jited", "pinned", p),
        ("prog", "run", "pinned", p),
        ("prog", "run", "pinned", p, "data_in", f"{tmp}/missing.bin"),
        ("prog", "run", "pinned", p, "data_in", "/dev/null", "repeat", BIG),
        ("prog", "run", "pinned", p, "data_in", "/dev/null", "data_size_out", "-1"),
        ("prog", "run", "pinned", p, "data_in", "/dev/null", "repeat", "many"),
        ("prog", "load", f"{tmp}/missing.o", f"{d}/p2"),
        ("prog", "load", "/etc/hostname", f"{d}/p2"),
        ("prog", "load", f"{tmp}/missing.o", f"{d}/p2", "type", "frob"),
        ("prog", "loadall", f"{tmp}/missing.o", f"{d}/p3", "section", "x"),
        ("pcap", "run", "pinned", p),
        ("pcap", "run", "pinned", p, "--pcap", f"{tmp}/missing.pcap"),
        ("pcap", "run", "pinned", p, "--pcap", "/etc/hostname"),
        ("pcap", "run", "pinned", p, "--pcap", f"{tmp}/in.pcap", "--tier", "foo"),
        ("pcap", "run", "pinned", p, "--pcap", f"{tmp}/in.pcap", "--interfaces", BIG),
        ("pcap", "run", "pinned", p, "--pcap", f"{tmp}/in.pcap", "--out", "/nonexistent/o"),
        ("pcap", "run", "pinned", p, "--frob"),
        ("mount",),
        ("mount", f"{tmp}/nonexistent/dir/deeper", "--target-pid", BIG),
        ("mount", str(tmp), "--target-pid", "0"),
        ("mount", str(tmp), "--frob"),
        ("status", "extra"),
    ]


def write_pcap(path: Path) -> None:
    """One Ethernet frame in a classic pcap."""
    frame = bytes(12) + b"\x08\x00" + bytes(20)
    path.write_bytes((0xA1B2C3D4).to_bytes(4, "little") + b"\x02\x00\x04\x00" + bytes(8)
                     + (262144).to_bytes(4, "little") + (1).to_bytes(4, "little")
                     + bytes(8) + len(frame).to_bytes(4, "little") * 2 + frame)


@pytest.mark.fuse
def test_every_error_is_one_line_never_a_traceback(bpffs: Run, objects: dict[str, str],
                                                   tmp_path: Path) -> None:
    write_pcap(tmp_path / "in.pcap")
    for words in bad_invocations(objects, tmp_path):
        for json_mode in (False, True):
            argv = ("-j", *words) if json_mode else words
            done = bpffs(*argv, timeout=30)
            what = f"bpffs {' '.join(argv)} -> {done.returncode}\n{done.stderr}{done.stdout}"
            assert done.returncode not in (0, 1), what  # 1: Python's status for a traceback
            assert "Traceback" not in done.stderr + done.stdout, what
            if json_mode:
                assert "error" in json.loads(done.stdout.splitlines()[-1]), what
            else:
                assert done.stderr.startswith("Error: "), what
                assert done.stderr.count("Error: ") == 1, what


@pytest.mark.fuse
def test_numbers_are_range_checked_as_the_kernels_fields(bpffs: Run, bpf_dir: Path) -> None:
    """u32 attr fields (ids, sizes, max_entries, flags, repeat): a message that names the
    field, EINVAL's status, nothing sent to the daemon."""
    done = bpffs("map", "create", str(bpf_dir / "x"), "type", "hash", "key", "4", "value", "8",
                 "entries", BIG, "name", "x")
    assert (done.returncode, done.stderr) == (
        234, f"Error: EINVAL: can't parse max entries '{BIG}': out of range (0 to 4294967295)\n")
    done = bpffs("map", "show", "id", BIG)
    assert (done.returncode, done.stderr) == (
        234, f"Error: EINVAL: can't parse map id '{BIG}': out of range (0 to 4294967295)\n")
    done = bpffs("prog", "show", "id", "abc")
    assert done.stderr == "Error: EINVAL: can't parse prog id 'abc': not a number\n"
    assert not (bpf_dir / "x").exists()


@pytest.mark.fuse
def test_files_are_named_in_errors(bpffs: Run, objects: dict[str, str], tmp_path: Path) -> None:
    p = objects["prog"]
    missing = tmp_path / "nosuch.pcap"
    done = bpffs("pcap", "run", "pinned", p, "--pcap", str(missing))
    assert done.stderr == f"Error: ENOENT: {missing}: No such file or directory\n"
    write_pcap(tmp_path / "in.pcap")
    done = bpffs("pcap", "run", "pinned", p, "--pcap", str(tmp_path / "in.pcap"), "--out",
                 "/nonexistent/out.pcap")
    assert done.stderr == "Error: ENOENT: /nonexistent/out.pcap: No such file or directory\n"
    text = tmp_path / "notes.txt"
    text.write_text("not a capture at all\n" * 10)
    done = bpffs("pcap", "run", "pinned", p, "--pcap", str(text))
    assert done.stderr.startswith(f"Error: EINVAL: {text}: not a pcap")
    frame = tmp_path / "pkt.bin"
    frame.write_bytes(bytes(12) + b"\x08\x00" + bytes(20))
    done = bpffs("prog", "run", "pinned", p, "data_in", str(frame), "data_out",
                 "/nonexistent/x")
    assert done.stderr == "Error: ENOENT: /nonexistent/x: No such file or directory\n"


@pytest.mark.fuse
def test_event_pipe_refuses_a_cpu_that_does_not_exist(bpffs: Run,
                                                      objects: dict[str, str]) -> None:
    """It used to wait forever for samples from CPU 99."""
    ev = objects["events"]
    started = time.monotonic()
    done = bpffs("map", "event_pipe", "pinned", ev, "cpu", "99", "index", "0", timeout=20)
    assert done.returncode == 234, done.stderr
    assert done.stderr.startswith("Error: EINVAL: failed to open perf buffer event on cpu #99")
    assert time.monotonic() - started < 20
    done = bpffs("map", "event_pipe", "pinned", ev, "cpu", "0", "index", "5", timeout=20)
    assert done.returncode == 256 - 7 and "E2BIG" in done.stderr  # as the kernel's map update
    done = bpffs("map", "event_pipe", "pinned", ev, "cpu", "0", timeout=20)
    assert done.stderr == "Error: EINVAL: cpu and index must be specified together\n"


@needs_bpftool
@pytest.mark.kernel
def test_event_pipe_errors_as_bpftool(kernel_bpffs: Path) -> None:
    """The oracle: the same three refusals, at once (perf_event_open: EINVAL; E2BIG)."""
    ev = str(kernel_bpffs / "events")
    assert bpftool("map", "create", ev, "type", "perf_event_array", "key", "4", "value", "4",
                   "entries", "2", "name", "events").returncode == 0
    cpu_99 = bpftool("map", "event_pipe", "pinned", ev, "cpu", "99", "index", "0")
    assert cpu_99.returncode == 255 and "Invalid argument" in cpu_99.stderr
    index_5 = bpftool("map", "event_pipe", "pinned", ev, "cpu", "0", "index", "5")
    assert index_5.returncode == 255 and "Argument list too long" in index_5.stderr
    alone = bpftool("map", "event_pipe", "pinned", ev, "cpu", "0")
    assert "cpu and index must be specified together" in alone.stderr


def fill(client: Client, path: str, count: int = 3000) -> None:
    fd = client.map_create(MapType.HASH, 4, 4, count)
    keys = [i.to_bytes(4, "little") for i in range(count)]
    client.map_update_batch(fd, keys, keys)
    client.obj_pin(fd, path)
    os.close(fd)


def closed_early(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run argv, read 100 bytes, close the pipe (as `| head -c 100`): status and stderr."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(100)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    return proc.wait(timeout=60), err


@pytest.mark.fuse
@pytest.mark.parametrize("json_mode", [False, True])
def test_closed_pipe_exits_quietly(client: Client, cli_env: dict[str, str], bpf_dir: Path,
                                   json_mode: bool) -> None:
    """`bpffs map dump ... | head -1`: no "Error: Broken pipe", no BrokenPipeError traceback;
    status 141 as bpftool killed by SIGPIPE."""
    fill(client, str(bpf_dir / "big"))
    argv = ["bpffs", *(["-j"] if json_mode else []), "map", "dump", "pinned",
            str(bpf_dir / "big")]
    status, err = closed_early(argv, cli_env)
    assert (status, err) == (141, "")


@needs_bpftool
@pytest.mark.kernel
def test_closed_pipe_as_bpftool(kernel_bpffs: Path) -> None:
    """The oracle: bpftool dies of SIGPIPE, silently (a shell shows 141)."""
    big = str(kernel_bpffs / "big")
    assert bpftool("map", "create", big, "type", "hash", "key", "4", "value", "4", "entries",
                   "3000", "name", "big").returncode == 0
    batch = kernel_bpffs.parent / "batch"
    batch.write_text("".join(
        f"map update pinned {big} key {' '.join(map(str, i.to_bytes(4, 'little')))}"
        f" value 0 0 0 0\n" for i in range(3000)))
    assert bpftool("batch", "file", str(batch)).returncode == 0
    status, err = closed_early(["bpftool", "map", "dump", "pinned", big])
    assert (status, err) == (-13, "")  # killed by SIGPIPE: 128 + 13 in a shell
