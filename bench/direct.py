"""Map reads in place (shared memory) against the socket and the kernel's bpf(2), in one run.

    python3 bench/direct.py [--entries 100000] [--rounds 2000]

Lookups in an array and a hash map of `entries` elements (key 4 bytes, value 8): each way of
reading is timed in rounds of 100 calls over keys spread through the map, and the p50 and p99
of the rounds' per-call averages are reported (timing single sub-microsecond calls would
mostly time the clock). Ways: `Map[i]` (the mapping API, int keys), client.map_lookup_elem
(bytes, libbpf's call), the same through the socket (reads in place turned off), and the
kernel's BPF_MAP_LOOKUP_ELEM through ctypes with buffers allocated once. Then a walk of every
element: Map.items() in place, the socket's batches, and the kernel's BPF_MAP_LOOKUP_BATCH.
Starts a private daemon (no mount, no persistence). Wall-clock on a shared 2-core machine:
expect 10-30 % noise; the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bpffs.client import Client, Map
from bpffs.vm import kernel
from bpffs.vm.uapi import MapType

ROUND = 100  # calls timed together
VALUE_SIZE = 8


def start_daemon(root: Path) -> tuple[subprocess.Popen, str]:
    path = str(root / "control.sock")
    proc = subprocess.Popen([sys.executable, "-m", "bpffs.daemon.main", "--socket", path,
                             "--no-mount", "--no-persist"], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit("bpffsd did not start")
        time.sleep(0.05)
    time.sleep(0.2)
    return proc, path


def rounds(op: Callable[[object], object], keys: list, n: int) -> tuple[float, float]:
    """p50 and p99 (us) of per-call averages over n rounds of ROUND calls."""
    clock = time.perf_counter_ns
    averages = []
    for r in range(n):
        batch = keys[(r * ROUND) % (len(keys) - ROUND):][:ROUND]
        start = clock()
        for k in batch:
            op(k)
        averages.append((clock() - start) / ROUND / 1000)
    cuts = statistics.quantiles(averages, n=100)
    return cuts[49], cuts[98]


def walk_rate(walk: Callable[[], int]) -> float:
    start = time.perf_counter()
    n = walk()
    return n / (time.perf_counter() - start)


def lookups(c: Client, socket_client: Client, map_type: MapType, entries: int, n: int
            ) -> list[tuple[str, float, float]]:
    spread = list(range(0, entries, max(1, entries // 5000)))
    raw = [struct.pack("<I", i) for i in spread]
    m = Map.create(map_type, 4, VALUE_SIZE, entries, key=int, client=c)
    m.update_batch({i: struct.pack("<Q", i) for i in range(entries)})
    assert m.direct is not None, m.direct_reason
    rows = [("Map[i] in place", *rounds(m.__getitem__, spread, n)),
            ("map_lookup_elem in place", *rounds(lambda k: c.map_lookup_elem(m.fd, k), raw, n)),
            ("map_lookup_elem socket",
             *rounds(lambda k: socket_client.map_lookup_elem(m.fd, k), raw, n // 10))]
    if kernel.available():
        kfd = kernel.map_create(map_type, 4, VALUE_SIZE, entries)
        ops = kernel.MapOps(kfd, 4, VALUE_SIZE)
        for i in range(entries):
            ops.update(struct.pack("<I", i), struct.pack("<Q", i))
        rows.append(("kernel bpf() lookup", *rounds(ops.lookup, raw, n)))
        os.close(kfd)
    m.close()
    return rows


def walks(c: Client, socket_client: Client, entries: int) -> list[tuple[str, float]]:
    m = Map.create(MapType.HASH, 4, VALUE_SIZE, entries, client=c)
    m.update_batch({struct.pack("<I", i): struct.pack("<Q", i) for i in range(entries)})
    socket_map = Map(m.fd, client=socket_client, owned=False)
    rows = [("Map.items() in place", walk_rate(lambda: sum(1 for _ in m.items()))),
            ("Map.items() socket batches", walk_rate(lambda: sum(1 for _ in socket_map.items())))]
    if kernel.available():
        kfd = kernel.map_create(MapType.HASH, 4, VALUE_SIZE, entries)
        kernel.map_update_batch(kfd, b"".join(struct.pack("<I", i) for i in range(entries)),
                                b"".join(struct.pack("<Q", i) for i in range(entries)),
                                entries)
        rows.append(("kernel BPF_MAP_LOOKUP_BATCH (4096)", walk_rate(
            lambda: sum(1 for _ in kernel.map_lookup_batch(kfd, 4, VALUE_SIZE, 4096)))))
        os.close(kfd)
    m.close()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=2000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, path = start_daemon(Path(tmp))
        try:
            c, socket_client = Client(path), Client(path)
            socket_client.session.direct = False  # its reads all go through the socket
            print(f"load average {os.getloadavg()[0]:.2f}; kernel baseline:"
                  f" {'yes' if kernel.available() else 'no (not root?)'}")
            for map_type in (MapType.ARRAY, MapType.HASH):
                rows = lookups(c, socket_client, map_type, args.entries, args.rounds)
                kernel_p50 = next((r[1] for r in rows if r[0].startswith("kernel")), None)
                print(f"\n{map_type.name.lower()} lookup, {args.entries} entries   p50 us"
                      "   p99 us   vs kernel p50")
                for name, p50, p99 in rows:
                    ratio = f"{p50 / kernel_p50:6.2f}x" if kernel_p50 else ""
                    print(f"  {name:34} {p50:7.3f} {p99:8.3f}   {ratio}")
            print(f"\nwalk of a {args.entries}-entry hash map     elements/s   vs kernel")
            rows2 = walks(c, socket_client, args.entries)
            kernel_rate = next((r[1] for r in rows2 if r[0].startswith("kernel")), None)
            for name, rate in rows2:
                ratio = f"{rate / kernel_rate:6.2f}x" if kernel_rate else ""
                print(f"  {name:34} {rate:12,.0f}   {ratio}")
            print(f"\nload average {os.getloadavg()[0]:.2f}")
        finally:
            proc.terminate()
            proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
