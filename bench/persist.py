"""Persistence: the cost of the journal, and a crash test.

    python3 bench/persist.py [--kills 20] [--clients 10] [--only latency|throughput|crash]

0. Durable single update latency (issue 16): p50/p99 of `Map.update` from one client with
   persistence on (acknowledged once its record is fdatasync'ed) against a bare os.write +
   os.fdatasync of a record-sized buffer, measured in the same run in the state directory's
   filesystem, and against --no-persist. Goal: p50 <= 1.5x the bare p50.
1. Journal overhead: updates/s on a pinned map, single from one client, batched, and single
   from `clients` processes at once, persistence on (every acknowledged update fsynced, group
   commit) against --no-persist. Goal: <= 2x.
2. Crash test: `clients` processes update their own key of a pinned map with increasing
   numbers and record each acknowledged number; the daemon is killed with SIGKILL at random
   points `kills` times and restarted; after each restart every stored number must be at
   least the last one its client saw acknowledged. Reports acknowledged updates and losses.
Wall-clock on a shared machine: expect noise.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from bpffs.client import Client, Map
from bpffs.vm.uapi import MapType

RECORD_BYTES = 32  # a framed single-update record (key 4, value 8 bytes)


class Daemon:
    def __init__(self, root: Path, persist: bool = True):
        self.root = root
        self.socket = str(root / "s.sock")
        self.mount = root / "bpf"
        self.args = [] if persist else ["--no-persist"]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.mount.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "bpffs.daemon.main", "--socket",
                                      self.socket, "--mount", str(self.mount), "--state-dir",
                                      str(self.root / "state"), *self.args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mount):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("bpffsd did not start")
            time.sleep(0.02)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(self.mount)], capture_output=True)
        while os.path.ismount(self.mount):
            time.sleep(0.02)


def throughput(persist: bool, clients: int, seconds: float = 2.0
               ) -> tuple[float, float, float]:
    root = Path(tempfile.mkdtemp(prefix="bpffs-bench-"))
    d = Daemon(root, persist)
    d.start()
    try:
        with Client(d.socket) as c:
            fd = c.map_create(MapType.HASH, 4, 8, 100_000)
            c.obj_pin(fd, str(d.mount / "m"))
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                c.map_update_elem(fd, (n % 1000).to_bytes(4, "little"), n.to_bytes(8, "little"))
                n += 1
            single = n / (time.perf_counter() - start)
            keys = [k.to_bytes(4, "little") for k in range(10_000)]
            values = [bytes(8)] * len(keys)
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                c.map_update_batch(fd, keys, values)
                n += len(keys)
            batched = n / (time.perf_counter() - start)
            concurrent = concurrent_updates(d.socket, str(d.mount / "m"), clients, seconds)
    finally:
        d.kill(signal.SIGTERM)
        shutil.rmtree(root, ignore_errors=True)
    return single, batched, concurrent


def percentiles(samples: list[int]) -> tuple[float, float]:
    """p50 and p99 of nanosecond samples, in microseconds."""
    ordered = sorted(samples)
    return (ordered[len(ordered) // 2] / 1e3, ordered[min(len(ordered) - 1,
                                                          len(ordered) * 99 // 100)] / 1e3)


def bare_fdatasync(directory: Path, count: int, size: int = RECORD_BYTES) -> list[int]:
    """The floor: append `size` bytes and fdatasync, `count` times, in a file of `directory`
    (the state directory's filesystem); each one's duration in ns."""
    path = directory / "bare-journal"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        buffer, samples = os.urandom(size), []
        for _ in range(count):
            began = time.perf_counter_ns()
            os.write(fd, buffer)
            os.fdatasync(fd)
            samples.append(time.perf_counter_ns() - began)
    finally:
        os.close(fd)
        os.unlink(path)
    return samples


def update_latency(persist: bool, count: int) -> tuple[list[int], list[int]]:
    """Durations (ns) of `count` single updates (Map.update) from one client to a pinned
    map, and of as many bare appends + fdatasync in the state directory's filesystem,
    interleaved in rounds so that both see the same load."""
    root = Path(tempfile.mkdtemp(prefix="bpffs-bench-"))
    d = Daemon(root, persist)
    d.start()
    updates: list[int] = []
    bare: list[int] = []
    try:
        with Client(d.socket) as c:
            m = Map.create(MapType.HASH, 4, 8, 100_000, key=int, value=int, client=c)
            c.obj_pin(m.fd, str(d.mount / "m"))
            for n in range(200):  # warm up
                m.update(n % 1000, n)
            state = root / "state" if persist else root
            rounds = 10
            for _ in range(rounds):
                for n in range(count // rounds):
                    began = time.perf_counter_ns()
                    m.update(n % 1000, n)
                    updates.append(time.perf_counter_ns() - began)
                bare += bare_fdatasync(state, count // rounds)
            m.close()
    finally:
        d.kill(signal.SIGTERM)
        shutil.rmtree(root, ignore_errors=True)
    return updates, bare


def report_latency(count: int) -> None:
    """Print issue 16's figure: a durable update's latency against the disk's own floor
    (the bare fdatasync, same run, same filesystem), and against no persistence."""
    on, bare = update_latency(True, count)
    off, _ = update_latency(False, count // 4)
    (on50, on99), (bare50, bare99), (off50, off99) = map(percentiles, (on, bare, off))
    print(f"{'durable single update, us':30} {'p50':>9} {'p99':>9}   ({count} each,"
          f" load average {os.getloadavg()[0]:.2f})")
    print(f"{'persist on (Map.update)':30} {on50:9.1f} {on99:9.1f}")
    print(f"{'bare write + fdatasync':30} {bare50:9.1f} {bare99:9.1f}")
    print(f"{'persist off (Map.update)':30} {off50:9.1f} {off99:9.1f}")
    print(f"ratio persist on / bare: p50 {on50 / bare50:.2f}x (goal <= 1.5x),"
          f" p99 {on99 / bare99:.2f}x")


def update_loop(cid: int, socket_path: str, pin: str, start: multiprocessing.Barrier,
                seconds: float, done: multiprocessing.Queue) -> None:
    with Client(socket_path) as c:
        fd = c.obj_get(pin)
        key = cid.to_bytes(4, "little")
        start.wait()
        n, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            c.map_update_elem(fd, key, n.to_bytes(8, "little"))
            n += 1
        done.put(n / (time.perf_counter() - began))


def concurrent_updates(socket_path: str, pin: str, clients: int, seconds: float) -> float:
    """Single updates from `clients` processes at once: what group commit is for."""
    start, done = multiprocessing.Barrier(clients), multiprocessing.Queue()
    procs = [multiprocessing.Process(target=update_loop,
                                     args=(n, socket_path, pin, start, seconds, done))
             for n in range(clients)]
    for p in procs:
        p.start()
    rates = [done.get(timeout=60 + seconds) for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def client_loop(cid: int, socket_path: str, pin: str, ack_dir: str, stop: multiprocessing.Event
                ) -> None:
    seq = 0
    key = cid.to_bytes(4, "little")
    ack = open(os.path.join(ack_dir, str(cid)), "w")  # noqa: SIM115 - closed at exit
    while not stop.is_set():
        try:
            with Client(socket_path) as c:
                fd = c.obj_get(pin)
                while not stop.is_set():
                    c.map_update_elem(fd, key, (seq + 1).to_bytes(8, "little"))
                    seq += 1
                    ack.seek(0)
                    ack.write(f"{seq:20d}")
                    ack.flush()
        except OSError:
            time.sleep(0.02)  # the daemon is down: try again
    ack.close()


def acked(ack_dir: str, cid: int) -> int:
    try:
        return int(open(os.path.join(ack_dir, str(cid))).read() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def crash_test(kills: int, clients: int) -> tuple[int, int]:
    root = Path(tempfile.mkdtemp(prefix="bpffs-crash-"))
    ack_dir = str(root / "acks")
    os.mkdir(ack_dir)
    d = Daemon(root)
    d.start()
    pin = str(d.mount / "counts")
    with Client(d.socket) as c:
        fd = c.map_create(MapType.ARRAY, 4, 8, clients)
        c.obj_pin(fd, pin)
    stop = multiprocessing.Event()
    procs = [multiprocessing.Process(target=client_loop, args=(n, d.socket, pin, ack_dir,
                                                               stop)) for n in range(clients)]
    for p in procs:
        p.start()
    lost = 0
    rng = random.Random(1)
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(0.2, 1.0))
            d.kill()
            seen = {n: acked(ack_dir, n) for n in range(clients)}  # the daemon is dead now
            d.start()
            with Client(d.socket) as c:
                fd = c.obj_get(pin)
                for n in range(clients):
                    stored = int.from_bytes(c.map_lookup_elem(fd, n.to_bytes(4, "little")),
                                            "little")
                    if stored < seen[n]:
                        lost += seen[n] - stored
                        print(f"client {n}: acknowledged {seen[n]}, stored {stored}")
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=10)
        d.kill(signal.SIGTERM)
    total = sum(acked(ack_dir, n) for n in range(clients))
    shutil.rmtree(root, ignore_errors=True)
    return total, lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--updates", type=int, default=2000,
                        help="durable single updates timed for the latency (and bare syncs)")
    parser.add_argument("--only", choices=("latency", "throughput", "crash"))
    args = parser.parse_args()
    if args.only in (None, "latency"):
        report_latency(args.updates)
    if args.only in (None, "throughput"):
        on, off = throughput(True, args.clients), throughput(False, args.clients)
        print(f"{'updates/s':30} {'persist on':>12} {'persist off':>12} {'overhead':>9}")
        for label, a, b in (("single (one sync client)", on[0], off[0]),
                            ("batched (10,000/call)", on[1], off[1]),
                            (f"single ({args.clients} clients at once)", on[2], off[2])):
            print(f"{label:30} {a:12,.0f} {b:12,.0f} {b / a:8.2f}x")
    if args.only not in (None, "crash"):
        return
    total, lost = crash_test(args.kills, args.clients)
    print(f"crash test: {args.kills} SIGKILLs, {args.clients} clients: {total:,} updates"
          f" acknowledged, {lost} lost")


if __name__ == "__main__":
    main()
