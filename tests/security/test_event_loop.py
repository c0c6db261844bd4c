"""Adversarial: no request blocks the daemon's event loop (issue 13, findings 5 and 7).

Each test runs an attack against a real daemon while a probe (a thread of this test process,
on its own connection) looks up one map element in a loop and records its worst latency. The
goal is PROBE_GOAL; the assertion uses PROBE_BOUND, looser, because the test machine is shared
and noisy (the figures measured are in the report of the change, and printed with -s).
Attackers that need not be root run as uid 65534 in a forked child (helpers.in_child).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from attack import under_probe
from helpers import NOBODY, DaemonProcess, in_child, raises_errno

from bpffs.client import Client, calls
from bpffs.daemon.fs.worker import RPC_TIMEOUT_ENV
from bpffs.daemon.syscall import MAP_BATCH_MAX_BYTES
from bpffs.vm import asm, load_program
from bpffs.vm.program import COMPILE_MAX_INSNS
from bpffs.vm.uapi import BPF_COMPLEXITY_LIMIT_INSNS, MapType, ProgType

# -- prog_load: the verifier ------------------------------------------------------------------
# Instructions of a straight-line program: ~0.5 s of verification here and ~0.35 s of
# compiling; below the verifier's 32768 processed instructions.
BIG_PROGRAM_INSNS = 30_000
LOADERS = 4  # clients loading one each at once: before, each load held the loop in turn


def straight_line(n: int) -> bytes:
    """r0 = 0, then r0 += 1 until n instructions with the exit: nothing to prune."""
    return asm.program(asm.mov64_imm(0, 0), *[asm.add64_imm(0, 1)] * (n - 2), asm.exit())


def test_verifying_a_program_does_not_stall_other_clients(public_daemon) -> None:
    """issue 13, finding 5: the verifier ran on the event loop, for as long as it took (31 s
    for a 252-instruction filter with 60 unprunable branch levels, from uid 65534; the
    verifier's own bounds now stop that one sooner). Whatever verification costs, it now
    runs in a worker thread (LOAD_THREADS_PER_UID per uid), so other clients are served."""
    insns = straight_line(BIG_PROGRAM_INSNS)
    clients = [Client(str(public_daemon.socket), timeout=None) for _ in range(LOADERS)]
    try:
        def load_all() -> list[int]:
            with ThreadPoolExecutor(LOADERS) as pool:
                return list(pool.map(lambda c: c.prog_load(ProgType.SOCKET_FILTER, insns),
                                     clients))

        fds = under_probe(public_daemon, load_all,
                          f"{LOADERS} concurrent prog_loads of {BIG_PROGRAM_INSNS} instructions")
        assert clients[0].prog_test_run(fds[0], bytes(64)).retval == BIG_PROGRAM_INSNS - 2
    finally:
        for c in clients:
            c.close()


# -- map batches ------------------------------------------------------------------------------
BATCH_ELEMENTS = 300_000  # ~1 s of updates applied in one request before the fix
DELETE_ELEMENTS = 80_000  # a hash map that fits in uid 65534's 8 MiB of memlock
BATCH_KEY, BATCH_VALUE = 4, 16
BATCH_UNDER_WAY = 0.1  # seconds after which a batch of BATCH_ELEMENTS is being applied


def _raw_batch(op: str, *args: Any) -> Any:
    """One batch request as it goes on the wire, bypassing the library's ~1 MiB chunking."""
    return (yield calls.Request(op, args))[0]


def _packed_keys(n: int) -> bytes:
    return b"".join(i.to_bytes(BATCH_KEY, "little") for i in range(n))


def _big_batches(socket_path: str) -> list[int]:
    """Update and read back a big array in one request each; fill and empty a hash map."""
    with Client(socket_path, timeout=None) as c:
        fd = c.map_create(MapType.ARRAY, BATCH_KEY, BATCH_VALUE, BATCH_ELEMENTS)
        handle, _ = c.run(calls.bind(c.session, fd))
        done = c.run(_raw_batch("map_update_batch", handle, _packed_keys(BATCH_ELEMENTS),
                                bytes(BATCH_VALUE * BATCH_ELEMENTS), 0))
        got, _, _ = c.run(_raw_batch("map_lookup_batch", handle, None, BATCH_ELEMENTS, False))
        os.close(fd)
        fd = c.map_create(MapType.HASH, BATCH_KEY, BATCH_VALUE, DELETE_ELEMENTS)
        handle, _ = c.run(calls.bind(c.session, fd))
        keys = _packed_keys(DELETE_ELEMENTS)
        c.run(_raw_batch("map_update_batch", handle, keys,
                         bytes(BATCH_VALUE * DELETE_ELEMENTS), 0))
        deleted = c.run(_raw_batch("map_delete_batch", handle, keys))
        return [done, len(got) // BATCH_KEY, deleted]


def test_a_big_map_batch_does_not_stall_other_clients(public_daemon) -> None:
    """issue 13, finding 5: one 240 MiB map_update_batch held the loop for 48.5 s (and 3.3 GB
    RSS, from lists of every key). Batches are now applied in slices of SLICE_SECONDS,
    from the packed bytes, with other clients served between slices; lookup and delete batches
    too."""
    counts = under_probe(public_daemon, lambda: in_child(
        _big_batches, str(public_daemon.socket), user=NOBODY), "update/lookup/delete batches")
    assert counts == [BATCH_ELEMENTS, BATCH_ELEMENTS, DELETE_ELEMENTS]


def test_closing_the_fd_during_a_batch_changes_nothing(public_daemon) -> None:
    """issue 13, finding 5: a batch now spans many turns of the event loop, during which the
    caller may close the map's last fd. The batch holds the map as the kernel's fdget holds
    it for the syscall: it completes, and the daemon logs no error."""
    with public_daemon.client() as c:
        fd = c.map_create(MapType.ARRAY, BATCH_KEY, BATCH_VALUE, BATCH_ELEMENTS)
        handle, _ = c.run(calls.bind(c.session, fd))
        pending = c.start(_raw_batch("map_update_batch", handle, _packed_keys(BATCH_ELEMENTS),
                                     bytes(BATCH_VALUE * BATCH_ELEMENTS), 0))
        time.sleep(BATCH_UNDER_WAY)  # closed before the batch starts, the fd is EBADF
        os.close(fd)
        assert pending() == BATCH_ELEMENTS
        after = c.map_create(MapType.HASH, 4, 4, 1)  # the daemon still serves requests
        c.map_update_elem(after, bytes(4), b"live")
        assert c.map_lookup_elem(after, bytes(4)) == b"live"
        os.close(after)


def test_a_batch_above_the_request_limit_is_e2big(public_daemon) -> None:
    """issue 13, finding 5: the size of a batch request is bounded (MAP_BATCH_MAX_BYTES), with
    the kernel's errno for an oversized attribute."""
    with public_daemon.client() as c:
        fd = c.map_create(MapType.HASH, 8, 8, 16)
        handle, _ = c.run(calls.bind(c.session, fd))
        n = MAP_BATCH_MAX_BYTES // 16 + 1
        with raises_errno(errno.E2BIG):
            c.run(_raw_batch("map_update_batch", handle, bytes(8 * n), bytes(8 * n), 0))
        assert c.map_lookup_batch(fd, 16)[0] == [], "nothing applied"


# -- prog_test_run ----------------------------------------------------------------------------
REPEAT = 3_000_000  # ~1 s of repetitions of a tiny program here, one request
# ~0.35 s to compile here, ~40% of it in the builtin compile(), which holds the GIL even in a
# worker thread (so that part still delays the loop; see vm/compiler/).
COMPILED_INSNS = 16_000


def _daemon_rss(daemon: DaemonProcess) -> int:
    """The daemon's resident set, in bytes."""
    assert daemon.proc is not None
    with open(f"/proc/{daemon.proc.pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_test_run_of_many_repetitions_does_not_stall_other_clients(public_daemon) -> None:
    """issue 13, finding 7: prog_test_run ran every repetition on the event loop (repeat is
    the kernel's u32, uncapped: a million repetitions stalled everyone). The run now pauses
    between repetitions every SLICE_SECONDS, as the kernel reschedules."""
    with public_daemon.client() as c:
        fd = c.prog_load(ProgType.SOCKET_FILTER, asm.program(asm.mov64_imm(0, 7), asm.exit()))
        run = under_probe(public_daemon, lambda: c.prog_test_run(fd, bytes(64), repeat=REPEAT),
                          f"prog_test_run repeat={REPEAT}")
        assert run.retval == 7
        assert c.obj_get_info_by_fd(fd)["run_cnt"] == REPEAT


@pytest.mark.parametrize("budget", [BPF_COMPLEXITY_LIMIT_INSNS + 1, 0, -1])
def test_a_run_budget_beyond_the_kernels_complexity_limit_is_einval(public_daemon,
                                                                     budget: int) -> None:
    """issue 13, finding 7: a run's instruction budget was not capped (a client could ask a
    run to go on for ever). No verified program runs more than the kernel's complexity limit
    of instructions, so that is the cap."""
    with public_daemon.client() as c:
        fd = c.prog_load(ProgType.SOCKET_FILTER, asm.program(asm.mov64_imm(0, 7), asm.exit()))
        with raises_errno(errno.EINVAL):
            c.prog_test_run(fd, bytes(64), budget=budget)
        assert c.prog_test_run(fd, bytes(64), budget=BPF_COMPLEXITY_LIMIT_INSNS).retval == 7


def test_compiling_a_big_program_does_not_stall_other_clients(public_daemon) -> None:
    """issue 13, finding 7: the first test run of a big program compiled it on the event loop
    (a 1M-instruction one: ~20 s and ~1.25 GB). Compiling now runs in a worker thread. (The
    builtin compile() of the generated source still holds the GIL, ~40% of the time: the
    probe sees that part; see the report.)"""
    n = COMPILED_INSNS
    with public_daemon.client() as c:
        fd = c.prog_load(ProgType.SOCKET_FILTER, straight_line(n))
        before = _daemon_rss(public_daemon)
        run = under_probe(public_daemon, lambda: c.prog_test_run(fd, bytes(64)),
                          f"first test run (compiling) of {n} instructions")
        grew = _daemon_rss(public_daemon) - before
    assert run.retval == n - 2
    print(f"RSS grew by {grew >> 20} MiB")


def test_programs_above_the_compile_bound_are_interpreted() -> None:
    """issue 13, finding 7: compiling costs ~2 KiB of memory an instruction, which the
    program's memlock charge does not cover; programs above COMPILE_MAX_INSNS are interpreted
    (as the kernel's JIT may leave a program to the interpreter), so that memory is bounded
    whatever the verifier's limit on program size."""
    prog, _ = load_program(ProgType.SOCKET_FILTER, straight_line(COMPILE_MAX_INSNS + 1),
                           license="GPL",
                           resolve_map=lambda fd: None, verify=False)
    assert prog.entry("compiled") is prog.entry("interpreter")


# -- reading a pin ----------------------------------------------------------------------------
DUMP_ELEMENTS = 100_000  # ~3.6 MB of text, ~0.3 s to render whole; within 8 MiB of memlock
OPEN_FILES = 10


@pytest.mark.fuse
def test_opening_a_big_pinned_map_renders_nothing_whole(public_daemon) -> None:
    """issue 13, finding 5: each open() of a pinned big map rendered its whole dump on the
    event loop (1 s and 13 MB a open, kept while open). The text is now made as it is read
    (render.PinText): open + read of the first 4 KiB is quick, and open files do not cost
    the dump's size each."""
    assert public_daemon.mount is not None
    pin = public_daemon.mount / "big"
    with public_daemon.client() as c:
        fd = c.map_create(MapType.HASH, 4, 8, DUMP_ELEMENTS)
        keys = [i.to_bytes(4, "little") for i in range(DUMP_ELEMENTS)]
        c.map_update_batch(fd, keys, [k * 2 for k in keys])
        c.obj_pin(fd, str(pin))
    before = _daemon_rss(public_daemon)

    def open_and_read() -> list:
        files = [open(pin, "rb") for _ in range(OPEN_FILES)]  # noqa: SIM115 - closed below
        return [(f, f.read(4096)) for f in files]

    opened = under_probe(public_daemon, open_and_read, f"{OPEN_FILES} opens + 4 KiB reads")
    grew = _daemon_rss(public_daemon) - before
    for f, _ in opened:
        f.close()
    print(f"RSS grew by {grew >> 10} KiB with {OPEN_FILES} files open")
    assert grew < 4 << 20, f"{OPEN_FILES} open files cost {grew >> 20} MiB"
    first = opened[0][1].decode().splitlines()
    assert first[0].startswith("# hash map id") and first[1].endswith(" 00 00 00 00")

    counted = under_probe(public_daemon, lambda: subprocess.run(
        ["wc", "-l", str(pin)], capture_output=True, check=True).stdout, "wc -l of the pin")
    assert int(counted.split()[0]) == DUMP_ELEMENTS + 1
    lines = pin.read_bytes().decode().splitlines()
    assert sorted(lines[1:]) == sorted(
        f"{' '.join(f'{b:02x}' for b in k)}: {' '.join(f'{b:02x}' for b in k * 2)}"
        for k in keys)
    pin.unlink()


# -- a stopped daemon -------------------------------------------------------------------------
MOUNT_TIMEOUT = 1.0  # seconds (BPFFSD_MOUNT_TIMEOUT) for the test's daemon; 30 by default


@pytest.mark.fuse
def test_a_stopped_daemon_times_out_filesystem_calls(start_daemon, monkeypatch) -> None:
    """issue 13, low item: while the daemon was stopped (SIGSTOP), `ls` of the mount blocked
    with no timeout (in D state). The mount worker now answers a request the daemon leaves
    unanswered for RPC_TIMEOUT seconds with ETIMEDOUT, and the late replies that follow
    SIGCONT are dropped, not taken as the answers to later requests."""
    monkeypatch.setenv(RPC_TIMEOUT_ENV, str(MOUNT_TIMEOUT))
    d = start_daemon(mount=True)
    assert d.mount is not None and d.proc is not None
    (d.mount / "before").mkdir()
    os.kill(d.proc.pid, signal.SIGSTOP)
    start = time.monotonic()
    ls = subprocess.Popen(["ls", str(d.mount / "before")], stderr=subprocess.PIPE, text=True)
    try:
        ls.wait(timeout=5 * MOUNT_TIMEOUT + 5)  # (an ls in D state cannot be killed)
    except subprocess.TimeoutExpired:
        pass
    finally:
        took = time.monotonic() - start
        os.kill(d.proc.pid, signal.SIGCONT)
        _, stderr = ls.communicate(timeout=60)
    print(f"\nls with the daemon stopped: {took:.2f} s, {stderr.strip()}")
    assert ls.returncode != 0 and "Connection timed out" in stderr
    assert took < 5 * MOUNT_TIMEOUT + 5
    (d.mount / "after").mkdir()
    assert sorted(os.listdir(d.mount)) == ["after", "before"]
    assert (d.mount / "after").is_dir() and not (d.mount / "nothing").exists()
