"""bpffs over FUSE against the kernel's bpffs, on this machine, in one run.

    python3 bench/fs.py [--pins 10000]

pin+get latency (client obj_pin/obj_get vs the kernel's BPF_OBJ_PIN/GET through ctypes),
`ls -l` of a directory of N pins (median of LS_RUNS, and the first), stat and unlink
throughput. Starts its own bpffsd (temp socket, mount and state directory) and mounts a kernel
bpffs (needs root). Wall-clock on a shared machine: expect 10-20 % noise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bpffs.client import Client
from bpffs.vm import kernel
from bpffs.vm.uapi import MapType

LS_RUNS = 5  # the first `ls -l` also fills the kernel's dentry cache; the median is reported


def start_daemon(root: Path, persist: bool) -> subprocess.Popen:
    (root / "bpf").mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-m", "bpffs.daemon.main", "--socket",
                             str(root / "s.sock"), "--mount", str(root / "bpf"), "--state-dir",
                             str(root / "state"), *([] if persist else ["--no-persist"])],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not os.path.ismount(root / "bpf"):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit("bpffsd did not start")
        time.sleep(0.05)
    return proc


def timed(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) / n


def bench(label: str, pin, get, map_fd: int, mount: Path, n: int) -> dict:
    d = mount / "many"
    d.mkdir()
    def pin_and_get(k: int) -> None:
        pin(map_fd, str(mount / f"p{k}"))
        os.close(get(str(mount / f"p{k}")))

    pin_get = timed(lambda: [pin_and_get(k) for k in range(200)], 200)
    for k in range(n):
        pin(map_fd, str(d / f"m{k}"))
    ls = [timed(lambda: subprocess.run(["ls", "-l", str(d)], stdout=subprocess.DEVNULL,
                                       check=True), 1) for _ in range(LS_RUNS)]
    names = [str(d / f"m{k}") for k in range(n)]
    stat = timed(lambda: [os.stat(p) for p in names], n)
    unlink = timed(lambda: [os.unlink(p) for p in names], n)
    return {"pin+get": pin_get * 1e6, "ls -l first": ls[0] * 1e3,
            "ls -l": statistics.median(ls) * 1e3, "stat": 1 / stat, "unlink": 1 / unlink}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pins", type=int, default=10_000)
    parser.add_argument("--no-persist", action="store_true",
                        help="run bpffsd without its journal (no fsync per change)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bpffs-bench-"))
    proc = start_daemon(root, not args.no_persist)
    results = {}
    try:
        with Client(str(root / "s.sock")) as client:
            fd = client.map_create(MapType.ARRAY, 4, 4, 1)
            results["bpffsd"] = bench("bpffsd", client.obj_pin, client.obj_get, fd,
                                      root / "bpf", args.pins)
        kdir = root / "kernel"
        kdir.mkdir()
        if kernel.available() and subprocess.run(["mount", "-t", "bpf", "bpf", str(kdir)],
                                                 capture_output=True).returncode == 0:
            try:
                kfd = kernel.map_create(MapType.ARRAY, 4, 4, 1)
                results["kernel"] = bench("kernel", kernel.obj_pin, kernel.obj_get, kfd, kdir,
                                          args.pins)
                os.close(kfd)
            finally:
                subprocess.run(["umount", "-l", str(kdir)], check=False)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)
    ours, theirs = results["bpffsd"], results.get("kernel")
    print(f"{'operation':24} {'bpffsd':>12} {'kernel':>12} {'ratio':>8}")
    for key, unit, higher_better in (("pin+get", "us", False), ("ls -l", "ms", False),
                                     ("ls -l first", "ms", False), ("stat", "ops/s", True),
                                     ("unlink", "ops/s", True)):
        k = theirs[key] if theirs else None
        slower = (k / ours[key]) if higher_better else (ours[key] / k) if k else None
        ratio = "" if slower is None else f"{slower:7.1f}x"
        label = {"ls -l": f"ls -l {args.pins} pins (ms)",
                 "ls -l first": f"  first of {LS_RUNS} (ms)"}.get(key, f"{key} ({unit})")
        print(f"{label:24} {ours[key]:12.1f} {k if k is not None else float('nan'):12.1f}"
              f" {ratio:>8}")
    print("ratio: how many times slower bpffsd is than the kernel;"
          f" persistence {'off' if args.no_persist else 'on (each change fsynced)'}")


if __name__ == "__main__":
    main()
