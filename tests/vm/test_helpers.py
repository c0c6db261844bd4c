"""Helpers whose kernel state comes from the RunEnv, and their effects in a test run's result
(what BPF_PROG_TEST_RUN cannot show): redirects, clones, tunnel keys, trace output, events."""

from __future__ import annotations

import errno

import pytest
from progs import ETH_IPV4
from tiers import TIERS

from bpffs.vm import PerfEvent, RunEnv, asm, load_program
from bpffs.vm.helpers.tracing import format_trace
from bpffs.vm.isa import R0, R1, R2, R3, R4, R5, R6, R7, R10, Alu
from bpffs.vm.maps import create_map
from bpffs.vm.uapi import (
    BPF_F_CURRENT_CPU,
    BPF_F_INGRESS,
    Helper,
    MapType,
    ProgType,
    TcAct,
)

PACKET = ETH_IPV4 + bytes(range(40))
NEG = {e: (-e) & 0xFFFFFFFF for e in (errno.EINVAL, errno.ENOENT, errno.E2BIG, errno.EFAULT,
                                      errno.EOPNOTSUPP)}


def run(code: bytes, prog_type: int = ProgType.SCHED_CLS, maps: dict | None = None,
        env: RunEnv | None = None, tier: str = "compiled", ctx_in: bytes | None = None):
    prog, _ = load_program(prog_type, code, license="GPL", resolve_map=(maps or {}).__getitem__)
    return prog.test_run(PACKET, ctx_in=ctx_in, env=env or RunEnv(), tier=tier)


def call(helper: Helper, *args: int) -> bytes:
    regs = (R1, R2, R3, R4, R5)
    return asm.program(*[asm.ld_imm64(regs[n], a) for n, a in enumerate(args)],
                       asm.call(helper), asm.exit())


@pytest.mark.parametrize("tier", TIERS)
def test_redirect_records_the_target_and_returns_tc_act_redirect(tier: str) -> None:
    r = run(call(Helper.redirect, 4, BPF_F_INGRESS), tier=tier)
    assert r.retval == TcAct.REDIRECT
    assert r.effects["redirect"] == {"ifindex": 4, "ingress": True}
    assert run(call(Helper.redirect, 4, 2), tier=tier).retval == TcAct.SHOT


def test_clone_redirect_needs_an_existing_interface() -> None:
    ctx_call = asm.program(asm.mov64_imm(R2, 3), asm.mov64_imm(R3, 0),
                           asm.call(Helper.clone_redirect), asm.exit())
    assert run(ctx_call).retval == NEG[errno.EINVAL]
    r = run(ctx_call, env=RunEnv(interfaces=[1, 3]))
    assert r.retval == 0
    assert r.effects["clone_redirects"] == [{"ifindex": 3, "ingress": False, "data": PACKET}]


def test_tunnel_key_set_then_get() -> None:
    code = asm.program(
        asm.mov64_reg(R6, R1),
        asm.st(4, R10, -8, 42), asm.st(4, R10, -4, 0x0A000001),
        asm.mov64_reg(R2, R10), asm.add64_imm(R2, -8), asm.mov64_imm(R3, 8),
        asm.mov64_imm(R4, 0), asm.call(Helper.skb_set_tunnel_key),
        asm.mov64_reg(R1, R6), asm.mov64_reg(R2, R10), asm.add64_imm(R2, -16),
        asm.mov64_imm(R3, 8), asm.mov64_imm(R4, 0), asm.call(Helper.skb_get_tunnel_key),
        asm.ldx(4, R0, R10, -16), asm.exit())
    r = run(code)
    assert r.retval == 42
    assert r.effects["tunnel_key"] == {"tunnel_id": 42, "remote_ipv4": 0x0A000001}


def test_get_tunnel_key_without_metadata_fails_and_env_provides_it() -> None:
    code = asm.program(asm.mov64_reg(R2, R10), asm.add64_imm(R2, -8), asm.mov64_imm(R3, 8),
                       asm.mov64_imm(R4, 0), asm.call(Helper.skb_get_tunnel_key),
                       asm.jmp_imm(0x50, R0, 0, 1), asm.ldx(4, R0, R10, -4), asm.exit())
    assert run(code).retval == NEG[errno.EINVAL]
    env = RunEnv(tunnel_key={"tunnel_id": 9, "remote_ipv4": 0xC0A80001})
    assert run(code, env=env).retval == 0xC0A80001


def test_route_realm_and_cgroup_classid_come_from_the_env() -> None:
    env = RunEnv(route_realm=0x20003, cgroup_classid=0x10001)
    code = asm.program(asm.mov64_reg(R6, R1), asm.call(Helper.get_route_realm),
                       asm.mov64_reg(R7, R0), asm.mov64_reg(R1, R6),
                       asm.call(Helper.get_cgroup_classid),
                       asm.alu64(Alu.XOR, R0, R7, reg=True), asm.exit())
    assert run(code, env=env).retval == 0x20003 ^ 0x10001


def test_current_task_helpers_in_kprobes() -> None:
    env = RunEnv(pid=100, tgid=90, uid=1000, gid=2000, comm="bash")
    assert run(call(Helper.get_current_pid_tgid), ProgType.KPROBE, env=env).retval == 100
    pid_tgid = asm.program(asm.call(Helper.get_current_pid_tgid),
                           asm.alu64(Alu.RSH, R0, imm=32, reg=False), asm.exit())
    assert run(pid_tgid, ProgType.KPROBE, env=env).retval == 90
    assert run(call(Helper.get_current_uid_gid), ProgType.KPROBE, env=env).retval == 1000
    comm = asm.program(asm.mov64_reg(R1, R10), asm.add64_imm(R1, -16), asm.mov64_imm(R2, 16),
                       asm.call(Helper.get_current_comm), asm.ldx(4, R0, R10, -16),
                       asm.exit())
    assert run(comm, ProgType.KPROBE, env=env).retval == int.from_bytes(b"bash", "little")


def test_probe_read_faults_zero_the_destination() -> None:
    code = asm.program(asm.st(8, R10, -8, -1), asm.mov64_reg(R1, R10), asm.add64_imm(R1, -8),
                       asm.mov64_imm(R2, 8), asm.mov64_imm(R3, 0x1234),
                       asm.call(Helper.probe_read), asm.ldx(8, R1, R10, -8),
                       asm.alu64(Alu.OR, R0, R1, reg=True), asm.exit())
    assert run(code, ProgType.KPROBE).retval == NEG[errno.EFAULT]
    env = RunEnv(kernel_memory={0x1230: bytes(range(16))})
    assert run(code, ProgType.KPROBE, env=env).retval == int.from_bytes(bytes(range(4, 8)),
                                                                        "little")


@pytest.mark.parametrize("fmt,args,expected", [
    (b"hello\0", (), "hello"),
    (b"%d %u %x\0", (-1 & (2**64 - 1), 7, 255), "-1 7 ff"),
    (b"%lld %llx\0", (-5 & (2**64 - 1), 1 << 40), "-5 10000000000"),
    (b"%p\0", (0xFFFF8800,), "00000000ffff8800"),
    (b"%s\0", (0,), None),
    (b"no nul", (), None),
    (b"%d %d %d %d\0", (1, 2, 3), None),
    (b"\x01\0", (), None),
])
def test_trace_printk_formats_like_the_4_4_kernel(fmt, args, expected) -> None:
    assert format_trace(fmt, (*args, 0, 0, 0)[:3]) == expected


def test_trace_printk_writes_a_trace_pipe_line_and_returns_its_length() -> None:
    lines: list[str] = []
    code = asm.program(asm.ld_imm64(R1, int.from_bytes(b"n=%d\n\0\0\0", "little")),
                       asm.stx(8, R10, R1, -8), asm.mov64_reg(R1, R10), asm.add64_imm(R1, -8),
                       asm.mov64_imm(R2, 6), asm.mov64_imm(R3, 42),
                       asm.call(Helper.trace_printk), asm.exit())
    r = run(code, ProgType.SOCKET_FILTER, env=RunEnv(trace=lines.append, comm="tc"))
    assert r.retval == len("n=42\n")
    assert r.effects["trace"] == ["n=42\n"]
    assert lines and lines[0].endswith("bpf_trace_printk: n=42\n") and "tc-" in lines[0]


def perf_output(flags: int, size: int = 8) -> bytes:
    return asm.program(asm.ld_imm64(R2, 0x1122334455667788), asm.stx(8, R10, R2, -8),
                       asm.ld_map_fd(R2, 5), asm.ld_imm64(R3, flags),
                       asm.mov64_reg(R4, R10), asm.add64_imm(R4, -8), asm.mov64_imm(R5, size),
                       asm.call(Helper.perf_event_output), asm.exit())


def test_perf_event_output_reaches_the_event_of_the_current_cpu() -> None:
    array = create_map(MapType.PERF_EVENT_ARRAY, 4, 4, 2)
    received: list[tuple[int, bytes]] = []
    event = PerfEvent(cpu=1)
    event.on_output = lambda cpu, data: received.append((cpu, data))
    array.put((1).to_bytes(4, "little"), event)
    r = run(perf_output(BPF_F_CURRENT_CPU), maps={5: array}, env=RunEnv(cpu=1))
    assert r.retval == 0
    assert received == [(1, (0x1122334455667788).to_bytes(8, "little"))]
    assert r.effects["events"][0]["index"] == 1


@pytest.mark.parametrize("flags,cpu,expected", [
    (0, 0, errno.ENOENT),          # slot 0 is empty
    (7, 0, errno.E2BIG),           # beyond max_entries
    (1, 0, errno.EOPNOTSUPP),      # the event of slot 1 is on another CPU
    (1 | (1000 << 32), 1, errno.EFAULT),  # more packet bytes than the packet has
    (1 | (1 << 60), 1, errno.EINVAL),    # a flag bit outside index and ctx length
])
def test_perf_event_output_errors(flags: int, cpu: int, expected: int) -> None:
    array = create_map(MapType.PERF_EVENT_ARRAY, 4, 4, 2)
    array.put((1).to_bytes(4, "little"), PerfEvent(cpu=1))
    assert run(perf_output(flags), maps={5: array}, env=RunEnv(cpu=cpu)).retval == \
        NEG[expected]


def test_perf_event_read_returns_the_counter() -> None:
    array = create_map(MapType.PERF_EVENT_ARRAY, 4, 4, 2)
    array.put(bytes(4), PerfEvent(cpu=0))
    code = asm.program(asm.ld_map_fd(R1, 5), asm.mov64_imm(R2, 0),
                       asm.call(Helper.perf_event_read), asm.exit())
    assert run(code, ProgType.KPROBE, maps={5: array},
               env=RunEnv(perf_counters={0: 12345})).retval == 12345


def test_unknown_run_options_are_einval() -> None:
    with pytest.raises(OSError) as info:
        RunEnv.from_options({"cpus": 1}, pid=1, uid=0, gid=0)
    assert info.value.errno == errno.EINVAL and "cpus" in str(info.value)
