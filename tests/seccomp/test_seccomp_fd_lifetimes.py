"""Object fd lifetimes under `bpffs exec`, and the kernel's answers for fds that are not ours:
a target that closes an injected fd (the daemon drops the map, as the kernel frees it), dup2
over an injected fd and of one to a new number (the reference follows the fd), a pipe, file,
socket, O_PATH or closed number passed as map_fd (the kernel's errno), a target killed while
its calls are held between notification and answer (the supervisor survives, answers the
others, keeps no fd and leaves no object), and pins that cross between bpftool under exec,
`ls` and our CLI. The ctypes calls are seccomp_hostile_target's; each sequence also runs
plainly against the kernel, whose answers are the oracle."""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import DaemonProcess
from seccomp_helpers import BPFFS_EXEC, HERE, RAW_BPF, REPO, Run, normalise

from bpffs.client.seccomp import abi, handlers
from bpffs.client.seccomp import filter as seccomp_filter
from bpffs.client.seccomp.notify import Listener
from bpffs.client.seccomp.supervisor import Supervisor, spawn
from bpffs.client.seccomp.target import Target

pytestmark = pytest.mark.fuse

CLI = [sys.executable, "-c", "import sys; from bpffs.client.cli import main; sys.exit(main())"]

# The calls the targets make, on seccomp_hostile_target's raw bpf(): an ARRAY map of one u32
# (so a lookup tells which map an fd number names), its id, and whether an id still names a
# map (MAP_GET_FD_BY_ID, closed again at once: True, or -errno).
CALLS = textwrap.dedent("""
    import ctypes, json, os, socket, struct, sys
    sys.path.insert(0, sys.argv[1])
    from seccomp_hostile_target import at, bpf, buf

    KEY0 = buf(b"\\0\\0\\0\\0")

    def create(value):
        fd = bpf(0, at(struct.pack("<IIIIIII16sI", 2, 4, 4, 1, 0, 0, 0, b"lt", 0)), 48)
        assert fd >= 0, f"MAP_CREATE: {fd}"
        assert update(fd, value) == 0
        return fd

    def update(fd, value):
        v = buf(struct.pack("<I", value))
        return bpf(2, at(struct.pack("<I4xQQQ", fd, ctypes.addressof(KEY0),
                                     ctypes.addressof(v), 0)), 32)

    def lookup(fd):
        v = buf(b"\\xff" * 4)
        r = bpf(1, at(struct.pack("<I4xQQQ", fd, ctypes.addressof(KEY0), ctypes.addressof(v),
                                  0)), 32)
        return [r, struct.unpack("<I", v.raw)[0]]

    def delete(fd):
        return bpf(3, at(struct.pack("<I4xQQQ", fd, ctypes.addressof(KEY0), 0, 0)), 32)

    def info(fd):
        return bpf(15, at(struct.pack("<IIQ", fd, 80, ctypes.addressof(buf(bytes(80))))), 16)

    def map_id(fd):
        out = buf(bytes(80))
        assert bpf(15, at(struct.pack("<IIQ", fd, 80, ctypes.addressof(out))), 16) == 0
        return struct.unpack_from("<I", out.raw, 4)[0]

    def alive(map_id):
        fd = bpf(14, at(struct.pack("<III", map_id, 0, 0)), 12)
        if fd < 0:
            return fd
        os.close(fd)
        return True
""")

CLOSES = CALLS + textwrap.dedent("""
    fd = create(7)
    ident = map_id(fd)
    print(json.dumps({"lookup": lookup(fd), "alive": alive(ident), "id": ident}), flush=True)
    sys.stdin.readline()
    os.close(fd)
    print(json.dumps({"alive": alive(ident)}), flush=True)
    sys.stdin.readline()
""")

DUPS = CALLS + textwrap.dedent("""
    r = {}
    a, b = create(11), create(22)
    ida, idb = map_id(a), map_id(b)
    os.dup2(b, a)  # B over A: A's only fd is gone
    r["dup2 over: the old number"] = lookup(a)
    r["dup2 over: A by id"] = alive(ida)
    os.close(b)
    r["dup2 over, b closed: the old number"] = lookup(a)
    r["dup2 over, b closed: B by id"] = alive(idb)
    os.close(a)
    r["B's last fd closed: B by id"] = alive(idb)

    c = create(33)
    idc = map_id(c)
    new = os.dup2(c, 200)  # to a new number, then the original closed
    os.close(c)
    r["moved: the new number"] = lookup(new)
    r["moved: update on the new number"] = update(new, 34)
    r["moved: the new number again"] = lookup(new)
    r["moved: the old number"] = lookup(c)
    r["moved: update on the old number"] = update(c, 35)
    r["moved: C by id"] = alive(idc)
    os.close(new)
    r["moved, new closed: C by id"] = alive(idc)
    r["moved, new closed: the new number"] = lookup(new)

    d = create(44)
    idd = map_id(d)
    pipe_r, pipe_w = os.pipe()
    os.dup2(pipe_r, d)  # a pipe over an injected fd
    r["pipe over: the number"] = lookup(d)
    r["pipe over: D by id"] = alive(idd)
    print(json.dumps(r, sort_keys=True))
""")

FOREIGN = CALLS + textwrap.dedent("""
    r = {}
    pipe_r, pipe_w = os.pipe()
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dgram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock_path = os.path.join(sys.argv[2], "sock")
    listening.bind(sock_path)
    fds = {
        "a pipe's read end": pipe_r,
        "a pipe's write end": pipe_w,
        "a regular file": os.open(sys.argv[1] + "/seccomp_hostile_target.py", os.O_RDONLY),
        "a directory": os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY),
        "/dev/null": os.open("/dev/null", os.O_RDWR),
        "a unix socketpair end": left.fileno(),
        "a UDP socket": dgram.fileno(),
        "an eventfd": os.eventfd(0),
        "an O_PATH fd of a file": os.open("/dev/null", os.O_PATH),
        "an O_PATH fd of a unix socket's file": os.open(sock_path, os.O_PATH),
        "fd -1": -1,
        "a number past the fd table": 1 << 20,
    }
    fds["a closed number"] = os.open("/dev/null", os.O_RDONLY)  # the lowest free number
    os.close(fds["a closed number"])
    for what, fd in fds.items():
        r[what] = {"lookup": lookup(fd & 0xFFFFFFFF), "update": update(fd & 0xFFFFFFFF, 1),
                   "delete": delete(fd & 0xFFFFFFFF), "info": info(fd & 0xFFFFFFFF)}
    ours = create(5)
    r["ours still works"] = lookup(ours)
    print(json.dumps(r, sort_keys=True))
""")


def _maps(daemon: DaemonProcess) -> tuple[set[int], int, int]:
    """(map ids, map objects, object fds) as the daemon says them (listing ids needs root)."""
    ids, start = set(), 0
    with daemon.client() as c:
        while True:
            try:
                start = c.get_next_id("map", start)
            except OSError as e:
                assert e.errno == errno.ENOENT
                break
            ids.add(start)
        status = c.status()
    return ids, status["objects"].get("map", 0), status["object_fds"]


def _settled(daemon: DaemonProcess, want: tuple[set[int], int, int]) -> tuple:
    """_maps once it equals want (a dead target's fds close as it is reaped), or after 5 s."""
    deadline = time.monotonic() + 5
    while True:
        got = _maps(daemon)
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


@pytest.fixture
def root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("listing maps by id (and the kernel's bpf(2)) needs root")


def _kernel(plain: Run, script: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    done = plain(sys.executable, "-c", script, str(HERE), *args, **kwargs)
    if done.returncode and "MAP_CREATE" in done.stderr:
        pytest.skip(f"the kernel refuses bpf(2) here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    return done


# -- 1. a target that closes an injected fd -----------------------------------------------------
def test_closing_an_injected_fd_drops_the_map(daemon: DaemonProcess, seccomp_ok: None,
                                              root_only: None, plain: Run) -> None:
    kernel = _kernel(plain, CLOSES, input="\n\n").stdout.splitlines()
    ids, maps, fds = _maps(daemon)
    proc = subprocess.Popen([*BPFFS_EXEC, "--socket", str(daemon.socket), "--", sys.executable,
                             "-c", CLOSES, str(HERE)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        opened = json.loads(proc.stdout.readline())
        assert opened["lookup"] == [0, 7] and opened["alive"] is True
        assert opened["id"] not in ids
        # the target's injected fd is the only reference: one map, one object fd more
        assert _maps(daemon) == (ids | {opened["id"]}, maps + 1, fds + 1)
        proc.stdin.write("\n")
        proc.stdin.flush()
        closed = json.loads(proc.stdout.readline())
        assert closed == {"alive": -errno.ENOENT} == json.loads(kernel[1])
        assert _maps(daemon) == (ids, maps, fds)  # while the target still runs
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert json.loads(kernel[0])["alive"] is True


# -- 2. dup2 over an injected fd, and of one to a new number ------------------------------------
def test_dup2_moves_the_reference_as_the_kernel_does(under_exec: Run, plain: Run,
                                                     daemon: DaemonProcess,
                                                     root_only: None) -> None:
    before = _maps(daemon)
    kernel = json.loads(_kernel(plain, DUPS).stdout)
    done = under_exec(sys.executable, "-c", DUPS, str(HERE))
    assert done.returncode == 0, done.stderr
    ours = json.loads(done.stdout)
    assert ours == kernel
    # what the kernel said, spelt out: the reference follows the fd
    assert kernel["dup2 over: the old number"] == [0, 22]
    assert kernel["dup2 over: A by id"] == -errno.ENOENT
    assert kernel["dup2 over, b closed: B by id"] is True
    assert kernel["B's last fd closed: B by id"] == -errno.ENOENT
    assert kernel["moved: the new number again"] == [0, 34]
    assert kernel["moved: the old number"][0] == -errno.EBADF
    assert kernel["moved, new closed: C by id"] == -errno.ENOENT
    assert kernel["pipe over: the number"][0] == -errno.EINVAL
    assert kernel["pipe over: D by id"] == -errno.ENOENT
    assert _settled(daemon, before) == before


# -- 3. fds that are not ours as map_fd ---------------------------------------------------------
def test_foreign_fds_as_map_fd_get_the_kernels_errno(under_exec: Run, plain: Run,
                                                     daemon: DaemonProcess, tmp_path: Path,
                                                     root_only: None) -> None:
    (tmp_path / "k").mkdir()
    (tmp_path / "o").mkdir()
    kernel = json.loads(_kernel(plain, FOREIGN, str(tmp_path / "k")).stdout)
    done = under_exec(sys.executable, "-c", FOREIGN, str(HERE), str(tmp_path / "o"))
    assert done.returncode == 0, done.stderr
    ours = json.loads(done.stdout)
    assert {w: v for w, v in ours.items() if v != kernel[w]} == {}, kernel
    assert kernel["a pipe's read end"]["lookup"][0] == -errno.EINVAL
    assert kernel["/dev/null"]["update"] == -errno.EINVAL
    assert kernel["a closed number"]["lookup"][0] == -errno.EBADF
    assert kernel["an O_PATH fd of a file"]["update"] == -errno.EBADF
    assert kernel["ours still works"] == [0, 5]


# -- 4. a target killed between the notification and the answer -------------------------------
CHURN_CALLS = RAW_BPF + textwrap.dedent("""
    def churn(stop, out):
        create = ctypes.create_string_buffer(struct.pack("<IIIII", 2, 4, 4, 1, 0), 48)
        key = ctypes.create_string_buffer(4)
        val = ctypes.create_string_buffer(b"\\7\\0\\0\\0")
        attr = ctypes.create_string_buffer(32)
        rounds, after = 0, 0
        while after < 20:
            fd = libc.syscall(NR_BPF, MAP_CREATE, ctypes.addressof(create), 48)
            if fd < 0:
                out.append(("create", ctypes.get_errno()))
                return
            struct.pack_into("<I4xQQQ", attr, 0, fd, ctypes.addressof(key),
                             ctypes.addressof(val), 0)
            if libc.syscall(NR_BPF, MAP_UPDATE_ELEM, ctypes.addressof(attr), 32) != 0 or \\
                    libc.syscall(NR_BPF, MAP_LOOKUP_ELEM, ctypes.addressof(attr), 32) != 0:
                out.append(("use", ctypes.get_errno()))
            os.close(fd)
            rounds += 1
            after += stop.is_set()
        out.append(("rounds", rounds))
""")
# A victim process of 4 churning threads, and 3 survivor threads in this one.
VICTIM_AND_SURVIVORS = textwrap.dedent("""
    victim = os.fork()
    if victim == 0:
        stop = threading.Event()
        threads = [threading.Thread(target=churn, args=(stop, [])) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        os._exit(0)
    stop, out = threading.Event(), []
    threads = [threading.Thread(target=churn, args=(stop, out)) for _ in range(3)]
    for t in threads:
        t.start()
""")
CHURN = CHURN_CALLS + VICTIM_AND_SURVIVORS + textwrap.dedent("""
    _, status = os.waitpid(victim, 0)
    stop.set()
    for t in threads:
        t.join()
    with open(sys.argv[1], "w") as f:
        json.dump({"victim": os.waitstatus_to_exitcode(status), "out": sorted(out)}, f)
""")
HELD = 4  # one held MAP_CREATE per victim thread: all of them wait for us at the kill


def _fds() -> list[str]:
    """What each of our fds is (this process is the supervisor here)."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{name}"))
        except OSError:
            pass  # listdir's own fd
    return sorted(out)


def test_a_target_killed_with_calls_held_from_many_threads(daemon: DaemonProcess,
                                                           seccomp_ok: None, root_only: None,
                                                           tmp_path: Path) -> None:
    """The victim's four threads each wait in MAP_CREATE, already done by the daemon, while
    its parent's three threads keep calling; SIGKILL, then the answers: ADDFD fails (ENOENT),
    the supervisor closes its copy, and serves the parent on. No fd of the supervisor's and
    no object of the daemon's outlives it."""
    before = _maps(daemon)
    report = tmp_path / "report.json"
    with daemon.client() as c:
        fds_before = _fds()
        child, lfd = spawn([sys.executable, "-c", CHURN, str(report)], seccomp_filter.build())
        sup = Supervisor(Listener(lfd), c)
        held: list[tuple] = []
        served_from_parent = 0
        try:
            deadline = time.monotonic() + 60
            # (and until the parent was served once meanwhile: under load, the victim's four
            # calls can all come first)
            while len(held) < HELD or not served_from_parent:
                assert time.monotonic() < deadline, f"held {len(held)} of the victim's calls"
                if not select.select([lfd], [], [], 1)[0]:
                    continue
                notif = sup.listener.recv()
                if notif is None:
                    continue
                target = Target(sup.listener, notif, sup.threads)
                outcome = sup.outcome(target, notif)
                if notif.nr == abi.Nr.bpf and target.tgid != child and \
                        notif.args[0] & 0xFFFFFFFF == 0:
                    assert isinstance(outcome, handlers.Inject)
                    held.append((notif, outcome, target.tgid))
                    continue
                served_from_parent += notif.nr == abi.Nr.bpf and target.tgid == child
                sup.answer(notif.id, outcome)
            victims = {tgid for _, _, tgid in held}
            assert len(victims) == 1 and len({n.pid for n, _, _ in held}) == HELD
            victim = victims.pop()
            # the daemon made the held maps: each alive, its only reference our copy
            assert _maps(daemon)[1] >= before[1] + HELD
            pidfd = os.pidfd_open(victim)
            os.kill(victim, signal.SIGKILL)
            assert select.select([pidfd], [], [], 30)[0], "the victim did not die"
            os.close(pidfd)
            for notif, outcome, _ in held:
                assert not sup.listener.id_valid(notif.id)
                sup.answer(notif.id, outcome)  # ADDFD: ENOENT; our copy closed
                with pytest.raises(OSError):
                    os.fstat(outcome.fd)
            status = sup.run(child)  # the parent's calls, answered to the end
            assert os.waitstatus_to_exitcode(status) == 0
            # no object fd (a socket) kept: only the per-thread caches are extra until close
            assert [f for f in _fds() if f.startswith("socket:")] == \
                [f for f in fds_before if f.startswith("socket:")]
        finally:
            sup.close()
        assert _fds() == fds_before
    got = json.loads(report.read_text())
    assert got["victim"] == -signal.SIGKILL
    assert [kind for kind, _ in got["out"]] == ["rounds"] * 3, got["out"]  # no failed call
    assert served_from_parent > 0
    assert _settled(daemon, before) == before


# -- 5. pins cross over -------------------------------------------------------------------------
def test_a_pin_bpftool_makes_is_ls_and_our_clis(bpftool: str, under_exec: Run, bpf_dir: Path,
                                                daemon: DaemonProcess) -> None:
    """bpftool (under exec) creates, fills and pins a second name; `ls` on the mount and
    `bpffs map show/dump pinned` see them as bpftool does. (The other way round:
    test_seccomp_bpftool.test_pins_of_our_client_are_bpftools.)"""
    made, again = bpf_dir / "made", bpf_dir / "again"
    for words in (["map", "create", str(made), "type", "hash", "key", "4", "value", "4",
                   "entries", "8", "name", "made"],
                  ["map", "update", "pinned", str(made), "key", "1", "0", "0", "0", "value",
                   "9", "0", "0", "0"],
                  ["map", "pin", "pinned", str(made), str(again)]):
        done = under_exec(bpftool, *words)
        assert done.returncode == 0, (words, done.stderr)
    listed = subprocess.run(["ls", "-l", str(bpf_dir)], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[-1] for line in listed.stdout.splitlines()[1:]]
    assert names == ["again", "made"]
    assert all(line.startswith("-rw-------") for line in listed.stdout.splitlines()[1:])

    def ours(*words: str) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, "--socket", str(daemon.socket), *words], cwd=REPO,
                              capture_output=True, text=True, timeout=60)

    for path in (made, again):
        shown, theirs = ours("map", "show", "pinned", str(path)), \
            under_exec(bpftool, "map", "show", "pinned", str(path))
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout == theirs.stdout
        assert " hash  name made  flags 0x0\n\tkey 4B  value 4B  max_entries 8" in shown.stdout
        dumped = ours("map", "dump", "pinned", str(path))
        assert dumped.returncode == 0, dumped.stderr
        assert dumped.stdout == under_exec(bpftool, "map", "dump", "pinned", str(path)).stdout \
            == "key: 01 00 00 00  value: 09 00 00 00\nFound 1 element\n"
    assert normalise(ours("map", "show", "pinned", str(made)).stdout, bpf_dir) == \
        normalise(ours("map", "show", "pinned", str(again)).stdout, bpf_dir)


KILLS = CHURN_CALLS + textwrap.dedent("""
    import signal, time
    print("ready", flush=True)
    sys.stdin.readline()
""") + VICTIM_AND_SURVIVORS + textwrap.dedent("""
    time.sleep(0.5)
    os.kill(victim, signal.SIGKILL)
    _, status = os.waitpid(victim, 0)
    stop.set()
    for t in threads:
        t.join()
    print(json.dumps({"victim": os.waitstatus_to_exitcode(status), "out": sorted(out)}),
          flush=True)
    sys.stdin.readline()
""")


def _fds_of(pid: int) -> list[str]:
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            pass
    return sorted(out)


def test_bpffs_exec_survives_a_target_killed_mid_traffic(daemon: DaemonProcess,
                                                          seccomp_ok: None,
                                                          root_only: None) -> None:
    """The same through `bpffs exec`: a child killed while its four threads call bpf() as fast
    as they can. The supervisor's fd table afterwards (/proc/PID/fd) holds no object fd more
    than before: what it gained is only its per-thread cache (/proc/TID/mem and pidfds, at
    most two for each thread it served, dropped at Threads.LIMIT)."""
    before = _maps(daemon)
    proc = subprocess.Popen([*BPFFS_EXEC, "--socket", str(daemon.socket), "--", sys.executable,
                             "-c", KILLS], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        fds_before = _fds_of(proc.pid)
        proc.stdin.write("\n")
        proc.stdin.flush()
        got = json.loads(proc.stdout.readline())
        fds_after = _fds_of(proc.pid)
        assert _settled(daemon, before) == before  # while the supervisor still runs
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert got["victim"] == -signal.SIGKILL
    assert [kind for kind, _ in got["out"]] == ["rounds"] * 3, got["out"]
    assert all(rounds > 20 for _, rounds in got["out"])
    sockets = [f for f in fds_before if f.startswith("socket:")]
    assert [f for f in fds_after if f.startswith("socket:")] == sockets
    gained = list(fds_after)
    for f in fds_before:
        gained.remove(f)
    assert all(f.endswith("/mem") or f == "anon_inode:[pidfd]" for f in gained), gained
    assert len(gained) <= 2 * (1 + 4 + 3), gained
