"""VM speed, side by side with the kernel's BPF_PROG_TEST_RUN on this machine.

    python3 bench/vm.py [--quick]

Reports ns per instruction on a 1000-instruction straight-line ALU program, and ns per run of
three classifiers (a protocol classifier setting tc_classid, a hash-map counter, an LD_ABS
header parser), in a test run's repeat loop, for the reference interpreter, the compiled
tier, the native tier (when llvmlite is installed: its repeat loop is native code too) and
the kernel (when bpf(2) is available, its own `duration`); the native tier per packet of a
batch (the batch driver, a fresh skb each packet); the helpers native code leaves to Python;
then the native tier's compile times and memory. Numbers are wall-clock on a shared machine:
expect noise of 10-20 %.

The ALU program's registers start as constants, so LLVM folds it to one constant: its native
figure means little. The "ALU loop" line runs a 1000-insn body 300 times on inputs read from
the context, which LLVM cannot fold away.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from importlib.util import find_spec

from bpffs.vm import asm, kernel, load_program
from bpffs.vm.context import SKB
from bpffs.vm.env import RunEnv
from bpffs.vm.isa import R0, R1, R2, R3, R4, R5, R6, R7, R10, Alu, Atomic, Jmp
from bpffs.vm.maps import create_map
from bpffs.vm.uapi import BPF_ANY, Helper, MapType, ProgType, TcAct

IPV4_UDP = (bytes(6) + bytes.fromhex("020000000001") + b"\x08\x00"
            + bytes.fromhex("45000020000000004011") + bytes(2) + bytes([10, 0, 0, 1, 10, 0, 0, 2])
            + (1234).to_bytes(2, "big") + (53).to_bytes(2, "big") + bytes(12))
ETH_P_ARP, ETH_P_IP, ETH_P_IPV6 = 0x0806, 0x0800, 0x86DD


def alu_program(n: int = 1000) -> bytes:
    rng = random.Random(1)
    ops = [Alu.ADD, Alu.SUB, Alu.XOR, Alu.OR, Alu.AND, Alu.MUL, Alu.LSH, Alu.RSH]
    body = [asm.mov64_imm(r, r + 1) for r in range(6)]
    while len(body) < n - 1:
        op = rng.choice(ops)
        dst = rng.randrange(6)
        if op in (Alu.LSH, Alu.RSH):
            body.append(asm.alu64(op, dst, imm=rng.randrange(1, 8), reg=False))
        elif rng.random() < 0.5:
            body.append(asm.alu64(op, dst, rng.randrange(6), reg=True))
        else:
            body.append(asm.alu64(op, dst, imm=rng.randrange(1, 1000), reg=False))
    return asm.program(*body, asm.exit())


def alu_loop(n: int = 1000, times: int = 900) -> bytes:
    """An n-insn body of invertible ALU ops (add, sub, xor of registers, multiplication by odd
    constants: no result is dead) run `times` times on registers read from the context."""
    rng = random.Random(2)
    body = [asm.ldx(4, r, R1, 4 * r) for r in (0, 2, 3, 4, 5, 1)]  # r1 (ctx) last
    body.append(asm.mov64_imm(9, times))
    start = len(body)
    while len(body) < n - 8:
        dst = rng.randrange(6)
        src = rng.choice([r for r in range(6) if r != dst])
        kind = rng.random()
        if kind < 0.8:
            body.append(asm.alu64(rng.choice([Alu.ADD, Alu.XOR, Alu.SUB]), dst, src, reg=True))
        else:
            body.append(asm.alu64(Alu.MUL, dst, imm=rng.randrange(1, 1 << 20) | 1, reg=False))
    body.append(asm.alu64(Alu.SUB, 9, imm=1, reg=False))
    body.append(asm.jmp_imm(Jmp.JNE, 9, 0, start - len(body) - 1))
    body += [asm.alu64(Alu.XOR, R0, r, reg=True) for r in range(1, 6)]
    return asm.program(*body, asm.exit())


def executed_insns(code: bytes) -> int:
    """Instructions one run executes (the budget it spends, on the interpreter)."""
    from bpffs.vm.run import Run

    prog, _ = load_program(ProgType.SCHED_CLS, code, license="GPL", resolve_map={}.get,
                           allow_loops=True)
    run = Run.for_test(prog, IPV4_UDP, None, RunEnv())
    run.reset()
    prog.execute(run, "interpreter")
    return RunEnv().budget - run.budget


def protocol_classifier() -> bytes:
    """cls_bpf direct action: ARP/IPv4/IPv6 get classids 1:1..1:3, others are dropped."""
    classid = SKB["tc_classid"]
    return asm.program(
        asm.mov64_reg(R6, R1),
        asm.ld_abs(2, 12),
        asm.jmp_imm(Jmp.JEQ, R0, ETH_P_ARP, 4),
        asm.jmp_imm(Jmp.JEQ, R0, ETH_P_IP, 5),
        asm.jmp_imm(Jmp.JEQ, R0, ETH_P_IPV6, 6),
        asm.mov64_imm(R0, TcAct.SHOT),
        asm.exit(),
        asm.st(4, R6, classid, 0x10001), asm.ja(3),
        asm.st(4, R6, classid, 0x10002), asm.ja(1),
        asm.st(4, R6, classid, 0x10003),
        asm.mov64_imm(R0, TcAct.OK),
        asm.exit())


def map_counter(map_fd: int) -> bytes:
    """Count packets per ethertype in a hash map."""
    return asm.program(
        asm.mov64_reg(R6, R1),
        asm.ld_abs(2, 12),
        asm.stx(4, R10, R0, -4),
        asm.mov64_reg(R2, R10), asm.add64_imm(R2, -4),
        asm.ld_map_fd(R1, map_fd),
        asm.call(Helper.map_lookup_elem),
        asm.jmp_imm(Jmp.JEQ, R0, 0, 3),
        asm.mov64_imm(R1, 1),
        asm.atomic(8, Atomic.ADD, R0, R1, 0),
        asm.ja(9),
        asm.st(8, R10, -16, 1),
        asm.mov64_reg(R2, R10), asm.add64_imm(R2, -4),
        asm.mov64_reg(R3, R10), asm.add64_imm(R3, -16),
        asm.ld_map_fd(R1, map_fd),
        asm.mov64_imm(R4, BPF_ANY),
        asm.call(Helper.map_update_elem),
        asm.mov64_imm(R0, TcAct.OK),
        asm.exit())


def header_parser() -> bytes:
    """IPv4/UDP 5-tuple hash from LD_ABS/LD_IND loads; returns it."""
    return asm.program(
        asm.mov64_reg(R6, R1),
        asm.ld_abs(2, 12),
        asm.jmp_imm(Jmp.JNE, R0, ETH_P_IP, 14),
        asm.ld_abs(1, 14),
        asm.alu64(Alu.AND, R0, imm=0x0F, reg=False),
        asm.alu64(Alu.LSH, R0, imm=2, reg=False),
        asm.mov64_reg(R7, R0),              # r7 = IP header length
        asm.ld_abs(1, 23),
        asm.mov64_reg(8, R0),               # r8 = protocol
        asm.ld_abs(4, 26),
        asm.alu64(Alu.XOR, 8, R0, reg=True),
        asm.ld_abs(4, 30),
        asm.alu64(Alu.XOR, 8, R0, reg=True),
        asm.ld_ind(4, R7, 14),              # both ports
        asm.alu64(Alu.XOR, 8, R0, reg=True),
        asm.mov64_reg(R0, 8),
        asm.exit(),
        asm.mov64_imm(R0, 0),
        asm.exit())


def vm_ns_per_run(code: bytes, prog_type: int, maps: dict, tier: str, repeat: int) -> float:
    prog, _ = load_program(prog_type, code, license="GPL", resolve_map=maps.__getitem__,
                           allow_loops=True)
    prog.test_run(IPV4_UDP, tier=tier)  # compile outside the timing
    start = time.perf_counter_ns()
    prog.test_run(IPV4_UDP, repeat=repeat, tier=tier)
    return (time.perf_counter_ns() - start) / repeat


def native_batch_ns(code: bytes, prog_type: int, maps: dict, packets: int) -> float:
    """ns per packet of a batch on the native tier: one buffer of `packets` copies of the
    packet, run by the native batch driver (what prog_test_run_buffer and pcap replay run),
    the per-packet skb reload and result columns included."""
    from array import array

    prog, _ = load_program(prog_type, code, license="GPL", resolve_map=maps.__getitem__,
                           allow_loops=True)
    prog.test_run(IPV4_UDP, tier="native")
    buffer = IPV4_UDP * packets
    offsets = array("Q", range(0, len(buffer), len(IPV4_UDP)))
    lengths = array("I", [len(IPV4_UDP)]) * packets
    prog.test_run_batch(tier="native").feed_buffer(buffer, offsets[:1], lengths[:1])
    batch = prog.test_run_batch(tier="native")
    start = time.perf_counter_ns()
    batch.feed_buffer(buffer, offsets, lengths)
    return (time.perf_counter_ns() - start) / packets


def helper_programs(map_fd: int) -> dict[str, bytes]:
    """One call of each helper that stays a Python callback on the native tier (see
    vm/native/maps.py and README), in a program that otherwise only returns; "none" is the
    same program without the call."""
    def calling(*setup, helper: Helper) -> bytes:
        return asm.program(asm.mov64_reg(R6, R1), *setup, asm.call(helper),
                           asm.mov64_imm(R0, 0), asm.exit())

    key = [asm.st(4, R10, -4, 5), asm.mov64_reg(R2, R10), asm.add64_imm(R2, -4),
           asm.ld_map_fd(R1, map_fd)]
    return {
        "none": asm.program(asm.mov64_reg(R6, R1), asm.mov64_imm(R0, 0), asm.exit()),
        "bpf_redirect (native)": calling(asm.mov64_imm(R1, 3), asm.mov64_imm(R2, 0),
                                         helper=Helper.redirect),
        "map_lookup_elem (native)": calling(*key, helper=Helper.map_lookup_elem),
        "get_prandom_u32": calling(helper=Helper.get_prandom_u32),
        "ktime_get_ns": calling(helper=Helper.ktime_get_ns),
        "get_cgroup_classid": calling(asm.mov64_reg(R1, R6), helper=Helper.get_cgroup_classid),
        "map_delete_elem (a missing key)": calling(*key, helper=Helper.map_delete_elem),
        "l3_csum_replace": calling(asm.mov64_reg(R1, R6), asm.mov64_imm(R2, 24),
                                   asm.mov64_imm(R3, 0), asm.mov64_imm(R4, 1),
                                   asm.mov64_imm(R5, 2), helper=Helper.l3_csum_replace),
        "skb_store_bytes": calling(asm.st(4, R10, -8, 0x1234), asm.mov64_reg(R1, R6),
                                   asm.mov64_imm(R2, 14), asm.mov64_reg(R3, R10),
                                   asm.add64_imm(R3, -8), asm.mov64_imm(R4, 2),
                                   asm.mov64_imm(R5, 0), helper=Helper.skb_store_bytes),
    }


def helper_costs(packets: int) -> None:
    """ns per packet of a native batch with one call of each helper, and above "none"."""
    vm_map = create_map(MapType.HASH, 4, 8, 64)
    costs = {name: native_batch_ns(code, ProgType.SCHED_CLS, {7: vm_map}, packets)
             for name, code in helper_programs(7).items()}
    base = costs.pop("none")
    print(f"native batch, one helper call a packet (ns/packet; the program alone: {base:.0f}):")
    for name, ns in costs.items():
        print(f"  {name:34} {ns:8.0f}  (+{ns - base:,.0f})")


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def kernel_ns_per_run(code: bytes, prog_type: int, repeat: int) -> float | None:
    if not kernel.available():
        return None
    fd, _ = kernel.prog_load(prog_type, code)
    try:
        return kernel.prog_test_run(fd, IPV4_UDP, repeat=repeat)[2]
    finally:
        os.close(fd)


def python_line_ns() -> float:
    """Calibration: this machine's speed right now, in ns per `r1 ^= 783`-like line."""
    body = "    r1 ^= 783\n    r2 += r1\n" * 500
    src = f"def f():\n    r1 = 1; r2 = 2\n{body}    return r1\n"
    namespace: dict = {}
    exec(src, namespace)
    f = namespace["f"]
    start = time.perf_counter_ns()
    for _ in range(300):
        f()
    return (time.perf_counter_ns() - start) / 300 / 1000


def native_compile_times(scale: float) -> None:
    """Translation plus LLVM at -O0 and -O2, for the ALU programs of 1000 and 4096 insns."""
    from bpffs.vm.native import compile_native

    for n in (1000, 4096):
        code = alu_program(n)
        prog, _ = load_program(ProgType.SCHED_CLS, code, license="GPL", resolve_map={}.get)
        times = []
        for opt in (0, 2):
            best = float("inf")
            for _ in range(max(int(3 * scale), 1)):
                start = time.perf_counter()
                compile_native(prog, opt)
                best = min(best, time.perf_counter() - start)
            times.append(best)
        start = time.perf_counter()
        prog.entry("compiled")
        compiled = time.perf_counter() - start
        print(f"native compile, {n} insns: -O0 {times[0] * 1e3:7.1f} ms, -O2 {times[1] * 1e3:7.1f}"
              f" ms (the compiled tier: {compiled * 1e3:.1f} ms)")
    # Memory: resident growth over 20 programs compiled and kept (their machine code, the
    # LLVM module and engine each keeps).
    for n in (1000, 4096):
        progs = [load_program(ProgType.SCHED_CLS, alu_program(n), license="GPL",
                              resolve_map={}.get)[0] for _ in range(20)]
        kept = [compile_native(progs[0])]  # (LLVM's one-time state outside the measure)
        before = resident_bytes()
        kept += [compile_native(p) for p in progs[1:]]
        per = (resident_bytes() - before) / (len(kept) - 1)
        print(f"native memory, {n} insns: {per / 1024:,.0f} KiB resident per program kept")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0

    vm_map = create_map(MapType.HASH, 4, 8, 64)
    kernel_map = kernel.map_create(MapType.HASH, 4, 8, 64) if kernel.available() else None
    native = find_spec("llvmlite") is not None
    cases = [
        ("ALU straight-line (1000 insns)", lambda fd: alu_program(), 1000, 2000),
        ("ALU loop (1000-insn body x 300)", lambda fd: alu_loop(times=300),
         executed_insns(alu_loop(times=300)), 20),
        ("protocol classifier (tc_classid)", lambda fd: protocol_classifier(), 1, 20000),
        ("hash-map counter", map_counter, 1, 20000),
        ("LD_ABS header parser", lambda fd: header_parser(), 1, 20000),
    ]
    print(f"machine speed: one simple Python statement takes {python_line_ns():.1f} ns now"
          " (compare runs only with this in mind)")
    print(f"{'program':36} {'interp':>12} {'compiled':>12} {'native':>10} {'batch':>10}"
          f" {'kernel':>10} {'speedup':>8} {'VM/kernel':>10} {'batch/k':>8}  (per run of a test"
          " run's repeat loop; speedup, VM: the faster VM tier; batch: native, per packet of a"
          " buffer)")
    for name, build, per, runs in cases:
        runs = max(int(runs * scale), 10)
        vm_code = build(7)
        interp = vm_ns_per_run(vm_code, ProgType.SCHED_CLS, {7: vm_map}, "interpreter",
                               max(runs // 20, 2 if per > 1000 else 5)) / per
        compiled = vm_ns_per_run(vm_code, ProgType.SCHED_CLS, {7: vm_map}, "compiled",
                                 runs) / per
        fastest = compiled
        native_text = batch_text = f"{'n/a':>10}"
        batch = None
        if native:
            native_ns = vm_ns_per_run(vm_code, ProgType.SCHED_CLS, {7: vm_map}, "native",
                                      runs * 10) / per
            native_text = f"{native_ns:10.2f}"
            fastest = min(compiled, native_ns)
            batch = native_batch_ns(vm_code, ProgType.SCHED_CLS, {7: vm_map}, runs * 10) / per
            batch_text = f"{batch:10.2f}"
        k = None
        if kernel_map is not None:
            try:
                k = kernel_ns_per_run(build(kernel_map), ProgType.SCHED_CLS, runs * 10)
            except OSError:  # (the ALU loop needs bounded loops: kernel 5.3)
                k = None
            k = k / per if k is not None else None
        unit = "ns/insn" if per > 1 else "ns/run"
        ratio = f"{fastest / k:10.1f}x" if k else f"{'-':>10}"
        batch_ratio = f"{batch / k:8.2f}x" if k and batch else f"{'-':>8}"
        kernel_text = f"{k:10.1f}" if k is not None else f"{'n/a':>10}"
        print(f"{name:36} {interp:12.1f} {compiled:12.1f} {native_text} {batch_text}"
              f" {kernel_text} {interp / fastest:7.1f}x {ratio} {batch_ratio}  ({unit})")
        sys.stdout.flush()
    if native:
        helper_costs(max(int(20000 * scale), 1000))
        native_compile_times(scale)


if __name__ == "__main__":
    main()
