"""The supervisor's own duties: a target killed while its call is served (no answer, no fd
left behind in the daemon), a thread that exec's (a stale /proc/TID/mem is reopened), calls
from many threads (each notification names a TID), an unprivileged user's own credentials."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import NOBODY, DaemonProcess, become
from seccomp_helpers import RAW_BPF, Run, bpftool_path

from bpffs.client.seccomp import abi, handlers
from bpffs.client.seccomp import filter as seccomp_filter
from bpffs.client.seccomp.notify import Listener
from bpffs.client.seccomp.supervisor import Supervisor, run, spawn
from bpffs.client.seccomp.target import Gone, Target
from bpffs.vm.uapi import MapType

pytestmark = pytest.mark.fuse

OBJ_GET_ONCE = RAW_BPF + textwrap.dedent("""
    obj_get(sys.argv[1])
""")


def _pinned_map(daemon: DaemonProcess, path: Path) -> None:
    with daemon.client() as c:
        fd = c.map_create(MapType.HASH, 4, 4, 8, name="m")
        c.map_update_elem(fd, b"\3\0\0\0", b"\4\0\0\0")
        c.obj_pin(fd, str(path))
        os.close(fd)


def _object_fds(daemon: DaemonProcess, want: int) -> int:
    """The daemon's count of open object fds, once it reaches want (or after 5 s)."""
    deadline = time.monotonic() + 5
    with daemon.client() as c:
        while True:
            count = c.status()["object_fds"]
            if count == want or time.monotonic() > deadline:
                return count
            time.sleep(0.05)


def test_target_killed_while_its_call_is_served(daemon: DaemonProcess, bpf_dir: Path,
                                                seccomp_ok: None) -> None:
    _pinned_map(daemon, bpf_dir / "m")
    with daemon.client() as c:
        before = c.status()["object_fds"]
        child, fd = spawn([sys.executable, "-c", OBJ_GET_ONCE, str(bpf_dir / "m")],
                          seccomp_filter.build())
        sup = Supervisor(Listener(fd), c)
        try:
            while True:  # the interpreter's own opens first: the kernel's
                notif = sup.listener.recv()
                if notif is None:
                    continue
                if notif.nr == abi.Nr.bpf:
                    break
                sup.answer(notif.id, handlers.CONTINUE)
            target = Target(sup.listener, notif, sup.threads)
            target.read(notif.args[1], 16)  # /proc/TID/mem opened while it lived
            obj = c.obj_get(str(bpf_dir / "m"))  # the daemon's work done, then the kill
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            assert not sup.listener.id_valid(notif.id)
            with pytest.raises(Gone):
                handlers.handle(target, notif.nr, notif.args, sup.ctx)
            sup.answer(notif.id, handlers.Inject(obj))  # ADDFD: ENOENT, our copy closed
            with pytest.raises(OSError):
                os.fstat(obj)
        finally:
            sup.close()
    assert _object_fds(daemon, before) == before


def test_a_thread_that_execs_is_served_after_the_exec(under_exec: Run, bpf_dir: Path,
                                                      daemon: DaemonProcess) -> None:
    """The open before the exec caches /proc/TID/mem of the old image; bpftool's calls after
    the exec come from the same TID and must read the new one."""
    bpftool = bpftool_path()
    if bpftool is None:
        pytest.skip("bpftool is not installed")
    _pinned_map(daemon, bpf_dir / "m")
    argv = [bpftool, "map", "lookup", "pinned", str(bpf_dir / "m"), "key", "3", "0", "0", "0"]
    script = f"import os; open('/etc/hostname', 'rb').read(); os.execv({bpftool!r}, {argv!r})"
    done = under_exec(sys.executable, "-c", script)
    assert (done.returncode, done.stdout) == (0, "key: 03 00 00 00  value: 04 00 00 00\n"), \
        done.stderr


THREADS = RAW_BPF + textwrap.dedent("""
    out = []
    def work():
        fd = obj_get(sys.argv[1])
        key, val = ctypes.create_string_buffer(b"\\3\\0\\0\\0"), ctypes.create_string_buffer(4)
        attr = ctypes.create_string_buffer(struct.pack(
            "<I4xQQQ", fd, ctypes.addressof(key), ctypes.addressof(val), 0))
        ok = sum(libc.syscall(NR_BPF, MAP_LOOKUP_ELEM, ctypes.addressof(attr), 32) == 0
                 for _ in range(100))
        out.append((fd >= 0, ok, val.raw.hex()))
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(sorted(out))
""")


def test_calls_from_many_threads(under_exec: Run, bpf_dir: Path, daemon: DaemonProcess
                                 ) -> None:
    _pinned_map(daemon, bpf_dir / "m")
    done = under_exec(sys.executable, "-c", THREADS, str(bpf_dir / "m"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == str([(True, 100, "04000000")] * 4) + "\n"


def _as_nobody(argv: list[str], daemon: DaemonProcess, out: Path) -> int:
    """`bpffs exec argv` as uid 65534 (forked, so that no interpreter needs to be readable by
    it), its stdout and stderr into out; the exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            become(NOBODY)
            os._exit(run(argv, str(daemon.socket)))
        except BaseException:
            os._exit(99)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_an_unprivileged_user_acts_with_its_own_credentials(
        public_daemon: DaemonProcess, public_root: Path, seccomp_ok: None) -> None:
    """The supervisor is the user's own client: its maps work, root's 0600 pin is EACCES and
    listing objects by id needs CAP_SYS_ADMIN (EPERM), as the control socket's rules say."""
    bpftool = bpftool_path()
    if bpftool is None:
        pytest.skip("bpftool is not installed")
    assert public_daemon.mount is not None
    mine, roots = public_daemon.mount / "mine", public_daemon.mount / "roots"
    _pinned_map(public_daemon, roots)
    out = public_root / "out.txt"
    steps = [
        (["map", "create", str(mine), "type", "hash", "key", "4", "value", "4", "entries", "8",
          "name", "mine"], 0, ""),
        (["map", "update", "pinned", str(mine), "key", "1", "0", "0", "0", "value", "7", "0",
          "0", "0"], 0, ""),
        (["map", "dump", "pinned", str(mine)], 0,
         "key: 01 00 00 00  value: 07 00 00 00\nFound 1 element\n"),
        (["map", "show", "pinned", str(roots)], 255,
         f"Error: bpf obj get ({public_daemon.mount}): Permission denied\n"),
        (["map", "show"], 255, "Error: can't get next map: Operation not permitted\n"),
    ]
    for words, status, text in steps:
        assert (_as_nobody([bpftool, *words], public_daemon, out), out.read_text()) == \
            (status, text), words
    assert os.stat(mine).st_uid == NOBODY[0]


DROPS_PRIVILEGES = RAW_BPF + textwrap.dedent("""
    before = obj_get(sys.argv[1])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
    after = obj_get(sys.argv[1])
    print(before >= 0, after if after >= 0 else -ctypes.get_errno())
""")


def test_a_caller_that_drops_privileges_cannot_use_ours(under_exec: Run, bpf_dir: Path,
                                                         daemon: DaemonProcess) -> None:
    """The supervisor is a client with the credentials bpffs exec started with: a caller
    that has become another user since gets EPERM rather than acting with them."""
    if os.geteuid() != 0:
        pytest.skip("dropping to another user needs root")
    _pinned_map(daemon, bpf_dir / "m")
    done = under_exec(sys.executable, "-c", DROPS_PRIVILEGES, str(bpf_dir / "m"))
    assert done.stdout == "True -1\n", done.stderr
