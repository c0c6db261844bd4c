"""Programs through a real daemon: load, test-run with run options, faults reported to the
client, perf events delivered to event fds and `bpffs map event-pipe`, trace_printk in
`bpffs prog tracelog`, `bpffs prog run` and `cat` of a pinned program."""

from __future__ import annotations

import errno
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from helpers import in_child, raises_errno

from bpffs.client import Client, read_perf_sample
from bpffs.vm import asm
from bpffs.vm.errors import VerifierError
from bpffs.vm.isa import R0, R1, R2, R3, R4, R5, R10
from bpffs.vm.uapi import BPF_F_CURRENT_CPU, Helper, MapType, ProgType

FRAME = bytes(12) + b"\x08\x00" + bytes(46)


def output_program(map_fd: int) -> bytes:
    return asm.program(asm.ld_imm64(R2, 0x0807060504030201), asm.stx(8, R10, R2, -8),
                       asm.ld_map_fd(R2, map_fd), asm.ld_imm64(R3, BPF_F_CURRENT_CPU),
                       asm.mov64_reg(R4, R10), asm.add64_imm(R4, -8), asm.mov64_imm(R5, 8),
                       asm.call(Helper.perf_event_output), asm.exit())


def test_test_run_through_the_daemon_with_run_options(client) -> None:
    code = asm.program(asm.call(Helper.get_route_realm), asm.exit())
    fd = client.prog_load(ProgType.SCHED_CLS, code)
    try:
        result = client.prog_test_run(fd, FRAME, repeat=5, route_realm=77)
        assert result.retval == 77
        assert result.data_out == FRAME
        info = client.obj_get_info_by_fd(fd)
        assert info["run_cnt"] == 5 and info["type"] == "sched_cls"
        with raises_errno(errno.EINVAL):
            client.prog_test_run(fd, FRAME, no_such_option=1)
        with raises_errno(errno.EINVAL):
            client.prog_test_run(fd, b"short")  # shorter than an Ethernet header
    finally:
        os.close(fd)


def test_an_unsafe_program_is_refused_with_the_log_and_the_daemon_carries_on(client) -> None:
    code = asm.program(asm.ldx(8, R0, R1, 4096), asm.exit())
    with raises_errno(errno.EACCES):
        client.prog_load(ProgType.SCHED_CLS, code)
    with pytest.raises(VerifierError) as info:
        client.prog_load(ProgType.SCHED_CLS, code, log_level=1)
    assert info.value.errno == errno.EACCES
    assert "0: (79) r0 = *(u64 *)(r1 +4096)" in info.value.log
    assert "invalid bpf_context access off=4096 size=8" in info.value.log
    after = client.map_create(MapType.ARRAY, 4, 4, 1)  # the daemon still serves requests
    client.map_update_elem(after, bytes(4), b"live")
    assert client.map_lookup_elem(after, bytes(4)) == b"live"
    os.close(after)


def test_perf_events_reach_the_event_fd(client) -> None:
    array = client.map_create(MapType.PERF_EVENT_ARRAY, 4, 4, 1)
    event = client.perf_event_open(0)
    client.map_update_elem(array, bytes(4), event.to_bytes(4, "little"))
    prog = client.prog_load(ProgType.SCHED_CLS, output_program(array))
    try:
        assert client.prog_test_run(prog, FRAME).retval == 0
        assert select.select([event], [], [], 10)[0], "no sample arrived"
        cpu, timestamp, data = read_perf_sample(event)
        assert (cpu, data) == (0, bytes(range(1, 9)))
        assert abs(timestamp - time.time_ns()) < 60e9
    finally:
        for fd in (prog, event, array):
            os.close(fd)


@pytest.mark.fuse  # the CLI reads the map from its pin on the mount
def test_event_pipe_and_tracelog_cli(daemon, client, bpf_dir) -> None:
    array = client.map_create(MapType.PERF_EVENT_ARRAY, 4, 4, 1)
    client.obj_pin(array, str(bpf_dir / "events"))
    pipe = subprocess.Popen(["bpffs", "map", "event_pipe", "pinned", str(bpf_dir / "events")],
                            env=daemon.env, stdout=subprocess.PIPE, text=True)
    trace = subprocess.Popen(["bpffs", "prog", "tracelog"], env=daemon.env,
                             stdout=subprocess.PIPE, text=True)
    printk = asm.program(asm.ld_imm64(R1, int.from_bytes(b"pkt %d\0\0", "little")),
                         asm.stx(8, R10, R1, -8), asm.mov64_reg(R1, R10),
                         asm.add64_imm(R1, -8), asm.mov64_imm(R2, 7), asm.mov64_imm(R3, 5),
                         asm.call(Helper.trace_printk), asm.exit())
    try:
        out_prog = client.prog_load(ProgType.SCHED_CLS, output_program(array))
        trace_prog = client.prog_load(ProgType.SOCKET_FILTER, printk)
        for _ in range(100):  # until the CLI has put its event into the array
            if client.prog_test_run(out_prog, FRAME).retval == 0:
                break
            time.sleep(0.1)
        client.prog_test_run(trace_prog, FRAME)
        header = pipe.stdout.readline()
        assert "CPU: 0 index: 0" in header
        assert pipe.stdout.readline().split() == [f"{b:02x}" for b in range(1, 9)]
        assert trace.stdout.readline().rstrip().endswith("bpf_trace_printk: pkt 5")
    finally:
        pipe.terminate()
        trace.terminate()
        pipe.wait(10)
        trace.wait(10)
        os.close(array)


@pytest.mark.fuse  # cat of a pin on the mount
def test_prog_run_cli_and_cat_of_a_pinned_program(daemon, client, bpf_dir, tmp_path) -> None:
    prog = client.prog_load(ProgType.SCHED_CLS, asm.program(asm.mov64_imm(R0, 2), asm.exit()),
                            name="two")
    client.obj_pin(prog, str(bpf_dir / "two"))
    os.close(prog)
    (tmp_path / "in").write_bytes(FRAME)
    out = subprocess.run(["bpffs", "prog", "run", "pinned", str(bpf_dir / "two"), "data_in",
                          str(tmp_path / "in"), "data_out", str(tmp_path / "out"), "repeat",
                          "3"], env=daemon.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Return value: 2, duration (average): ")
    assert (tmp_path / "out").read_bytes() == FRAME
    text = (bpf_dir / "two").read_text()
    assert "sched_cls" in text and "0: (b7) r0 = 2" in text and "1: (95) exit" in text


@pytest.mark.parametrize("prog_type", [ProgType.KPROBE, ProgType.SCHED_CLS])
def test_unprivileged_callers_load_socket_filters_only(start_daemon, prog_type: int) -> None:
    code = asm.program(asm.mov64_imm(R0, 0), asm.exit())
    public = Path(tempfile.mkdtemp(prefix="bpffs-public-"))  # pytest's tmp dirs are 0700
    public.chmod(0o755)
    daemon = start_daemon(mount=False, root=public / "d")

    def load(kind: int) -> int:
        with Client(str(daemon.socket)) as c:
            fd = c.prog_load(kind, code)
            os.close(fd)
            return kind

    assert in_child(load, ProgType.SOCKET_FILTER, user=(65534, 65534)) == 1
    with raises_errno(errno.EPERM):
        in_child(load, prog_type, user=(65534, 65534))
    shutil.rmtree(public, ignore_errors=True)
