"""Entry point 2 of issue 15: a real runc hands its container's seccomp listener to bpffsd's
agent (`bpffsd --seccomp-agent PATH`), and Debian's bpftool, unmodified, inside the container
works on the container's /sys/fs/bpf, a bind mount of the daemon's mount. The rootfs is built
here: busybox-static, bpftool and the libraries ldd names."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from helpers import DaemonProcess

from bpffs.client.seccomp.agent import oci_seccomp, receive

pytestmark = pytest.mark.fuse

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "ls", "cat", "id", "stat", "echo")
USER = (1000, 1000)  # the unprivileged container user
AGENT_WAIT = 30.0


def _runc_unavailable() -> str | None:
    if shutil.which("runc") is None:
        return "runc is not installed (Debian: apt-get install runc)"
    if os.geteuid() != 0:
        return "runc needs root here"
    done = subprocess.run(["file", "-L", str(BUSYBOX)], capture_output=True, text=True) \
        if shutil.which("file") else None
    if not BUSYBOX.exists() or (done is not None and "statically" not in done.stdout):
        return "a static /bin/busybox is needed (Debian: apt-get install busybox-static)"
    return None


@pytest.fixture
def runc(seccomp_ok: None) -> str:
    reason = _runc_unavailable()
    if reason:
        pytest.skip(reason)
    return shutil.which("runc") or "runc"


def _libraries(binary: str) -> list[Path]:
    """The shared objects ldd says binary needs (the loader included)."""
    done = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True)
    return [Path(m) for m in re.findall(r"(/\S+) \(0x", done.stdout)]


def _rootfs(root: Path, bpftool: str) -> Path:
    """busybox with a few applets, bpftool and its libraries, the mount points."""
    for d in ("bin", "proc", "dev", "sys", "tmp", "etc"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    shutil.copy2(bpftool, root / "bin" / "bpftool")
    for lib in _libraries(bpftool):
        dest = root / lib.relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib.resolve(), dest)
    (root / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\n")
    return root


def _bundle(path: Path, bpftool: str, bpf_mount: Path, agent: Path, script: str,
            user: tuple[int, int] = (0, 0)) -> Path:
    """A bundle running `sh -c script` as user, /sys/fs/bpf bound from bpf_mount, bpf() and
    friends sent to the agent. Capabilities are runc's defaults: no CAP_BPF or
    CAP_SYS_ADMIN, so nothing here reaches the kernel's bpf()."""
    path.mkdir()
    _rootfs(path / "rootfs", bpftool)
    subprocess.run(["runc", "spec"], cwd=path, check=True)
    config = json.loads((path / "config.json").read_text())
    config["process"].update(terminal=False, args=["/bin/sh", "-c", script],
                             user={"uid": user[0], "gid": user[1]})
    config["root"]["readonly"] = False
    config["mounts"].append({"destination": "/sys/fs/bpf", "type": "bind",
                             "source": str(bpf_mount), "options": ["rbind", "rw"]})
    config["linux"]["seccomp"] = oci_seccomp(str(agent), "bpffsd-test")
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def _run(bundle: Path, state: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["runc", "--root", str(state), "run", "--bundle", str(bundle),
                           f"t{uuid.uuid4().hex[:10]}"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


@pytest.fixture
def agent_daemon(runc: str, public_root: Path, start_daemon) -> tuple[DaemonProcess, Path]:
    """A mounted daemon (socket reachable by USER) that serves the agent socket."""
    agent = public_root / "agent.sock"
    d = start_daemon(root=public_root / "d", mount=True, args=("--seccomp-agent", str(agent)))
    deadline = time.monotonic() + AGENT_WAIT
    while not agent.exists():
        assert time.monotonic() < deadline, f"no agent socket:\n{d.log_text()}"
        time.sleep(0.05)
    return d, agent


def test_bpftool_in_a_runc_container(agent_daemon: tuple[DaemonProcess, Path], bpftool: str,
                                     tmp_path: Path) -> None:
    d, agent = agent_daemon
    assert d.mount is not None
    script = ("B=/sys/fs/bpf; echo statfs $(stat -f -c %t $B);"
              " bpftool map create $B/x type hash key 4 value 8 entries 16 name x &&"
              " bpftool map update pinned $B/x key 1 0 0 0 value 42 0 0 0 0 0 0 0 &&"
              " bpftool map lookup pinned $B/x key 1 0 0 0 && bpftool map show pinned $B/x")
    done = _run(_bundle(tmp_path / "b", bpftool, d.mount, agent, script), tmp_path / "state")
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{out}\n{d.log_text()}"
    assert "statfs cafe4a11" in out
    assert "key: 01 00 00 00  value: 2a 00 00 00 00 00 00 00" in out
    assert re.search(r"\d+: hash  name x  flags 0x0", out), out
    assert "x" in os.listdir(d.mount)  # the container's pin, on the host's mount
    with d.client() as c:
        fd = c.obj_get(str(d.mount / "x"))
        assert c.map_lookup_elem(fd, bytes([1, 0, 0, 0])) == (42).to_bytes(8, "little")
        os.close(fd)


def test_a_non_root_container_user_acts_as_itself(agent_daemon: tuple[DaemonProcess, Path],
                                                   bpftool: str, tmp_path: Path) -> None:
    """The agent is root; the container's uid 1000 gets uid 1000's rights: its pin is its
    own, root's 0600 pin, root's directory and a pin behind root's 0700 directory stay closed
    to it, and listing ids (CAP_SYS_ADMIN) fails."""
    d, agent = agent_daemon
    assert d.mount is not None
    mine, roots = d.mount / "u", d.mount / "r"
    mine.mkdir()
    os.chown(mine, *USER)
    roots.mkdir(mode=0o755)
    (d.mount / "h").mkdir(mode=0o700)
    with d.client() as c:
        fd = c.map_create(1, 4, 4, 4, name="secret")  # BPF_MAP_TYPE_HASH, as root
        c.obj_pin(fd, str(d.mount / "secret"))
        c.obj_pin(fd, str(d.mount / "h" / "open"))
        os.close(fd)
    os.chmod(d.mount / "h" / "open", 0o666)  # open to all, in a directory closed to them
    script = ("B=/sys/fs/bpf; id -u;"
              " bpftool map create $B/u/m type array key 4 value 4 entries 2 name m &&"
              " bpftool map update pinned $B/u/m key 1 0 0 0 value 7 0 0 0 && echo created;"
              " bpftool map show pinned $B/secret; echo secret=$?;"
              " bpftool map create $B/r/m type array key 4 value 4 entries 2 name m; echo r=$?;"
              " bpftool map show pinned $B/h/open; echo h=$?;"
              " bpftool map list; echo list=$?")
    done = _run(_bundle(tmp_path / "b", bpftool, d.mount, agent, script, USER),
                tmp_path / "state")
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{out}\n{d.log_text()}"
    assert out.startswith("1000\n") and "created" in out, out
    assert (os.stat(mine / "m").st_uid, os.stat(mine / "m").st_gid) == USER
    assert re.search(r"secret=(?!0)\d+", out) and "Permission denied" in out, out
    assert re.search(r"r=(?!0)\d+", out) and not (roots / "m").exists(), out
    assert re.search(r"h=(?!0)\d+", out), out
    assert re.search(r"list=(?!0)\d+", out) and "Operation not permitted" in out, out


def _agent_pids(daemon_pid: int) -> list[int]:
    """The daemon's seccomp agent workers."""
    children = [pid for task in Path(f"/proc/{daemon_pid}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    return [int(pid) for pid in children
            if b"seccomp.agent" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def test_the_daemon_restarts_a_dead_agent(agent_daemon: tuple[DaemonProcess, Path]) -> None:
    d, agent = agent_daemon
    assert d.proc is not None
    [first] = _agent_pids(d.proc.pid)
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + AGENT_WAIT
    while True:
        pids = _agent_pids(d.proc.pid)
        if pids and pids != [first]:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(str(agent))
                    break
                except OSError:
                    pass
        assert time.monotonic() < deadline, d.log_text()
        time.sleep(0.05)
    assert "seccomp agent" in d.log_text() and "restarting" in d.log_text()


def test_a_message_without_a_listener_is_refused() -> None:
    """A peer that names no seccompFd gets nothing served, and the fds it sent are closed."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        before = len(os.listdir("/proc/self/fd"))
        socket.send_fds(theirs, [json.dumps({"fds": ["other"], "pid": 1}).encode()], [r])
        theirs.shutdown(socket.SHUT_WR)
        with pytest.raises(ValueError, match="seccompFd"):
            receive(ours)
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        for fd in (r, w):
            os.close(fd)
        ours.close()
        theirs.close()
