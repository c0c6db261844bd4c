"""Map operations through bpffsd, side by side with the kernel's bpf(2) on this machine.

    python3 bench/core.py [--quick] [--persist] [--socket PATH]

Single-operation lookup and update through the synchronous client (one round trip each, with
reads in place turned off: bench/direct.py measures those; p50/p99 latency and throughput),
and batched updates (BPF_MAP_UPDATE_BATCH-like, 8192 elements
per request), against the same operations on a kernel hash map through ctypes (root). Starts a
private daemon (no mount; no persistence unless --persist, which adds the journal's cost to
updates) unless --socket names a running one. Numbers are
wall-clock on a shared 2-core machine: expect noise of 10-30 %, more while other work runs.
Client and daemon spin briefly for each other's messages (client/sync.py REPLY_SPIN_NS,
bpffsd/server.py SPIN_NS), which pays off with two idle cores and costs 3-4x in latency when
another process keeps one busy; so the run prints the load average, and the CPU time per
operation of client and daemon (user+sys, spinning included), which contention moves less.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bpffs.client import Client
from bpffs.vm import kernel
from bpffs.vm.uapi import MapType

KEY_SIZE, VALUE_SIZE, ENTRIES = 4, 8, 1 << 17
Row = tuple[str, ...]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """Seconds of CPU (user + system) the process has used, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def start_daemon(root: Path, persist: bool) -> tuple[subprocess.Popen, str]:
    path = str(root / "control.sock")
    state = ["--state-dir", str(root / "state")] if persist else ["--no-persist"]
    proc = subprocess.Popen([sys.executable, "-m", "bpffs.daemon.main", "--socket", path,
                             "--no-mount", *state], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.connect(path)
            return proc, path
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("bpffsd did not start") from None
            time.sleep(0.05)


def keys(n: int) -> list[bytes]:
    return [i.to_bytes(KEY_SIZE, "little") for i in range(n)]


def timed(op: Callable[[bytes], object], ks: list[bytes]) -> tuple[list[int], float]:
    """Per-call latencies (ns) and calls per second over the whole run."""
    samples = []
    clock = time.perf_counter_ns
    start = clock()
    for k in ks:
        t = clock()
        op(k)
        samples.append(clock() - t)
    return samples, len(ks) / ((clock() - start) / 1e9)


def percentile(samples: list[int], q: float) -> float:
    return statistics.quantiles(samples, n=100)[int(q) - 1] / 1000 if q < 100 else 0.0


def single_ops(c: Client, n: int, daemon_pid: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    value = bytes(VALUE_SIZE)
    ks = keys(n)
    fd = c.map_create(MapType.HASH, KEY_SIZE, VALUE_SIZE, ENTRIES)
    c.map_update_batch(fd, ks, [value] * n)
    ops = {"lookup": lambda k: c.map_lookup_elem(fd, k),
           "update": lambda k: c.map_update_elem(fd, k, value)}
    kfd = kernel.map_create(MapType.HASH, KEY_SIZE, VALUE_SIZE, ENTRIES) if kernel.available() \
        else None
    kops = None
    if kfd is not None:
        mo = kernel.MapOps(kfd, KEY_SIZE, VALUE_SIZE)
        for k in ks:
            mo.update(k, value)
        kops = {"lookup": mo.lookup, "update": lambda k: mo.update(k, value)}
    for name, op in ops.items():
        timed(op, ks[: n // 10])  # warm up
        cpu, daemon_cpu = own_cpu(), process_cpu(daemon_pid)
        samples, rate = timed(op, ks)
        results[f"bpffsd {name}"] = {"p50": percentile(samples, 50),
                                     "p99": percentile(samples, 99), "rate": rate,
                                     "client_cpu": (own_cpu() - cpu) / n * 1e6,
                                     "daemon_cpu": (process_cpu(daemon_pid) - daemon_cpu) / n
                                     * 1e6}
        if kops:
            timed(kops[name], ks[: n // 10])
            samples, rate = timed(kops[name], ks)
            results[f"kernel {name}"] = {"p50": percentile(samples, 50),
                                         "p99": percentile(samples, 99), "rate": rate}
    os.close(fd)
    if kfd is not None:
        os.close(kfd)
    return results


def batched(c: Client, n: int, rounds: int) -> dict[str, float]:
    ks = keys(n)
    values = [i.to_bytes(VALUE_SIZE, "little") for i in range(n)]
    fd = c.map_create(MapType.HASH, KEY_SIZE, VALUE_SIZE, ENTRIES)
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        c.map_update_batch(fd, ks, values)
        best = max(best, n / (time.perf_counter() - start))
    os.close(fd)
    out = {"bpffsd": best}
    if kernel.available():
        kfd = kernel.map_create(MapType.HASH, KEY_SIZE, VALUE_SIZE, ENTRIES)
        packed_k, packed_v = b"".join(ks), b"".join(values)
        kbest = 0.0
        for _ in range(rounds):
            start = time.perf_counter()
            kernel.map_update_batch(kfd, packed_k, packed_v, n)
            kbest = max(kbest, n / (time.perf_counter() - start))
        os.close(kfd)
        out["kernel"] = kbest
    return out


def table(rows: list[Row]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
                     for r in rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer operations (a smoke run)")
    p.add_argument("--socket", help="a running bpffsd (default: start a private one)")
    p.add_argument("--persist", action="store_true",
                   help="give the private daemon a state directory (journal on every update)")
    args = p.parse_args()
    n, batch_n, rounds = (2000, 20_000, 2) if args.quick else (20_000, 100_000, 5)
    proc = None
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-core-") as tmp:
        if args.socket:
            path = args.socket
        else:
            proc, path = start_daemon(Path(tmp), args.persist)
        try:
            with Client(path) as c:
                c.session.direct = False  # round trips: bench/direct.py times reads in place
                single = single_ops(c, n, c.status()["pid"])
                batch = batched(c, batch_n, rounds)
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait()
    rows: list[Row] = [("operation", "p50 us", "p99 us", "ops/s", "client CPU us/op",
                        "daemon CPU us/op")]
    for name, r in single.items():
        cpu = (f"{r['client_cpu']:.1f}", f"{r['daemon_cpu']:.1f}") if "client_cpu" in r \
            else ("", "")
        rows.append((name, f"{r['p50']:.1f}", f"{r['p99']:.1f}", f"{r['rate']:,.0f}", *cpu))
    for name, rate in batch.items():
        rows.append((f"{name} update batch ({batch_n})", "", "", f"{rate:,.0f}", "", ""))
    print(f"load average before the run: {load[0]:.2f} (2 cores; above ~0.5 other work"
          " competes and single-op latency suffers)\n")
    print(table(rows))
    if "kernel lookup" in single:
        print("\nbpffsd / kernel:")
        for op in ("lookup", "update"):
            ours, theirs = single[f"bpffsd {op}"], single[f"kernel {op}"]
            print(f"  {op}: p50 x{ours['p50'] / theirs['p50']:.0f},"
                  f" throughput x{theirs['rate'] / ours['rate']:.0f} lower")
        print(f"  update batch: throughput x{batch['kernel'] / batch['bpffsd']:.1f} lower")
    else:
        print("\n(kernel baseline skipped: bpf(2) needs root on a bpf-capable kernel)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
