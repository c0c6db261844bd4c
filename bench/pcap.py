"""pcap replay throughput: the 4.4 protocol classifier (examples/tc_classifier.c, section
`classifier`) over a synthetic capture (default 1,000,000 packets), side by side with the
running kernel's BPF_PROG_TEST_RUN on the same packets, in the same run.

    python3 bench/pcap.py [--packets N] [--tier native|auto|compiled|interpreter] [--profile]

Reports packets/s for: bpffs replay end to end (capture indexed, packets sent in a memfd,
test runs in the daemon, verdict accounting from result columns), the VM alone in this
process (the capture indexed and run in buffers as the daemon runs them, without the
socket), and the kernel (one BPF_PROG_TEST_RUN syscall per packet through ctypes), with
ratios. The machine is shared and has 2 cores: numbers are noisy, run
it twice.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import DaemonProcess  # noqa: E402

from bpffs import vm  # noqa: E402
from bpffs.client import Client, pcap_index  # noqa: E402
from bpffs.client.loader import read_object  # noqa: E402
from bpffs.client.loader.load import LoadOptions, load_object  # noqa: E402
from bpffs.client.replay import SPAN, Replay, open_capture  # noqa: E402
from bpffs.vm import kernel  # noqa: E402
from bpffs.vm.uapi import ProgType, TcAct  # noqa: E402

ETHERTYPES = [b"\x08\x06", b"\x08\x00", b"\x08\x00", b"\x86\xdd", b"\x88\xcc"]


def build_classifier(out: Path) -> Path:
    obj = out / "tc_classifier.o"
    subprocess.run(["clang", "-O2", "-target", "bpf", f"-I{ROOT / 'examples/include'}", "-c",
                    str(ROOT / "examples/tc_classifier.c"), "-o", str(obj)], check=True)
    return obj


def write_capture(path: Path, count: int, seed: int = 4) -> None:
    """count Ethernet frames of 60-1514 bytes, a mix of ARP, IPv4 (twice as many), IPv6 and
    LLDP, from a fixed pool of 4096 distinct frames (the content does not change the work)."""
    rng = random.Random(seed)
    pool = []
    for _ in range(4096):
        size = rng.choice([60, 60, 74, 128, 576, 1514])
        pool.append(rng.randbytes(12) + rng.choice(ETHERTYPES) + rng.randbytes(size - 14))
    record = struct.Struct("<IIII")
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        chunk = []
        for i in range(count):
            frame = pool[i & 4095]
            chunk.append(record.pack(i // 1000000, i % 1000000, len(frame), len(frame)) + frame)
            if len(chunk) == 65536:
                f.write(b"".join(chunk))
                chunk.clear()
        f.write(b"".join(chunk))


def read_packets(path: Path) -> list[bytes]:
    with open(path, "rb") as f:
        return [data for _, data, _ in open_capture(f).packets()]


def bench_replay(client: Client, fd: int, capture: Path, tier: str) -> tuple[float, dict]:
    started = time.perf_counter()
    with open(capture, "rb") as f:
        cap = open_capture(f)
        summary = Replay(client, fd, ProgType.SCHED_CLS, tier=tier).replay(cap)
    return time.perf_counter() - started, summary.as_dict()


def index_capture(path: Path) -> tuple[mmap.mmap, list[pcap_index.Index]]:
    """The capture mapped and indexed, SPAN packets at a time, as pcap replay reads it
    (offsets from the start of the file)."""
    with open(path, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    spans, pos = [], 24
    while True:
        index = pcap_index.index(data, pos, 0, SPAN, False)
        spans.append(index)
        if len(index.offsets) < SPAN:
            return data, spans
        pos = index.end


def bench_vm_in_process(insns: bytes, capture: Path, tier: str) -> tuple[float, dict]:
    """The daemon's part of a replay without the socket: the capture indexed and run in
    buffers as prog_test_run_buffer runs them (PacketBatch.feed_buffer)."""
    prog, _ = vm.load_program(ProgType.SCHED_CLS, insns, license="GPL",
                              resolve_map=lambda fd: None)
    env = vm.RunEnv.from_options({}, pid=os.getpid(), uid=0, gid=0, trace=None)
    prog.entry(tier)
    started = time.perf_counter()
    data, spans = index_capture(capture)
    batch = prog.test_run_batch(env, tier)
    for index in spans:
        batch.feed_buffer(data, index.offsets, index.lengths)
    return time.perf_counter() - started, dict(Counter(batch.retvals))


def vm_phases(insns: bytes, packets: list[bytes], tier: str) -> dict[str, float]:
    """Where a test run's time goes, per packet (us): starting over on the next packet (skb,
    context) and executing the program, timed one step at a time with Run's methods (the
    batch runs the same steps inline; the rest of its time is recording the result)."""
    from bpffs.vm.run import Run

    prog, _ = vm.load_program(ProgType.SCHED_CLS, insns, license="GPL",
                              resolve_map=lambda fd: None)
    prog.entry(tier)
    run = Run.for_test(prog, packets[0], None, vm.RunEnv())
    clock = time.perf_counter_ns
    build = execute = 0
    for data in packets:
        t0 = clock()
        run.next_packet(data)
        t1 = clock()
        prog.execute(run, tier)
        t2 = clock()
        build, execute = build + t1 - t0, execute + t2 - t1
    return {"next packet": build / len(packets) / 1e3,
            "execute": execute / len(packets) / 1e3}


def bench_kernel(insns: bytes, packets: list[bytes]) -> tuple[float, dict, float]:
    """One BPF_PROG_TEST_RUN per packet; also the kernel's own reported run time (the sum
    of `duration`), which leaves out the syscall and ctypes costs."""
    fd, _ = kernel.prog_load(ProgType.SCHED_CLS, insns, "GPL")
    verdicts: dict[int, int] = {}
    inside_ns = 0
    try:
        started = time.perf_counter()
        for data in packets:
            r, _, duration, _ = kernel.prog_test_run(fd, data)
            verdicts[r] = verdicts.get(r, 0) + 1
            inside_ns += duration
        return time.perf_counter() - started, verdicts, inside_ns / 1e9
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=1_000_000)
    parser.add_argument("--tier", default="native")
    parser.add_argument("--profile", action="store_true",
                        help="profile the client side of the replay with pyinstrument")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = read_object(build_classifier(work))
        insns = spec.program("classifier").insns
        capture = work / "capture.pcap"
        t = time.perf_counter()
        write_capture(capture, args.packets)
        print(f"capture: {args.packets:,} packets, {capture.stat().st_size / 1e6:.0f} MB"
              f" (written in {time.perf_counter() - t:.1f}s)")
        t = time.perf_counter()
        packets = read_packets(capture)
        read_s = time.perf_counter() - t
        print(f"{'read capture into bytes objects':<34} {len(packets) / read_s:>12,.0f}"
              " packets/s")
        t = time.perf_counter()
        index_capture(capture)
        print(f"{'index capture (what replay reads)':<34}"
              f" {len(packets) / (time.perf_counter() - t):>12,.0f} packets/s"
              f" ({'native' if pcap_index._native() else 'Python'} walk)")

        daemon = DaemonProcess(work / "daemon", mount=False).start()
        rows = []
        try:
            with daemon.client() as client, load_object(client, spec, LoadOptions(
                    mount=str(work), sections=["classifier"])) as loaded:
                fd = loaded.programs["cls_main"]
                if args.profile:
                    from pyinstrument import Profiler

                    with Profiler() as profiler:
                        seconds, summary = bench_replay(client, fd, capture, args.tier)
                    profiler.print()
                else:
                    seconds, summary = bench_replay(client, fd, capture, args.tier)
                rows.append(("bpffs pcap replay (end to end)", seconds, summary["verdicts"]))
        finally:
            daemon.stop()
        seconds, verdicts = bench_vm_in_process(insns, capture, args.tier)
        rows.append((f"VM batch in process ({args.tier})", seconds, verdicts))
        # (one packet at a time through Run: what the Python tiers' batches do)
        phases = vm_phases(insns, packets[:100_000], args.tier) \
            if args.tier in ("compiled", "interpreter") else None
        inside = None
        if kernel.available():
            seconds, verdicts, inside = bench_kernel(insns, packets)
            rows.append(("kernel BPF_PROG_TEST_RUN", seconds, verdicts))
        else:
            print("kernel: bpf(2) unavailable here (needs root); no baseline")
        for name, seconds, verdicts in rows:
            print(f"{name:<34} {len(packets) / seconds:>12,.0f} packets/s  ({seconds:.2f}s)"
                  f"  verdicts {verdicts}")
        if phases:
            per_run = 1e6 * rows[1][1] / len(packets)
            print("VM batch, us per packet: " + ", ".join(
                f"{name} {us:.1f}" for name, us in phases.items()) + f" (of {per_run:.1f})")
        if inside:
            print(f"{'(kernel: inside the test runs)':<34} {len(packets) / inside:>12,.0f}"
                  f" packets/s  ({inside:.2f}s)")
        if len(rows) == 3:
            replayed = {int(TcAct[name[len("TC_ACT_"):]]): n for name, n in rows[0][2].items()}
            same = replayed == rows[1][2] == rows[2][2]
            print("verdicts agree with the kernel" if same else "VERDICTS DIFFER FROM THE KERNEL")
            print(f"replay / kernel: {rows[2][1] / rows[0][1]:.2f}x;"
                  f" VM alone / kernel: {rows[2][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()
