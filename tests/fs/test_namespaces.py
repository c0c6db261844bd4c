"""Per-mount-namespace instances with real namespaces (`unshare -m`): containers are isolated
from each other and from the host; mounts in one namespace show one tree; a named instance is
shared between containers and outlives its mounts; an unnamed one releases its pins when its
last mount goes; a map fd passed between containers over a Unix socket can be pinned there."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from fs_helpers import CLIENT_PRELUDE, Container, cli, wait_for
from helpers import in_child

from bpffs.client import Client
from bpffs.vm import asm
from bpffs.vm.uapi import ProgType

pytestmark = pytest.mark.fuse

MNT = "/mnt/bpf"


@pytest.fixture
def containers(daemon):
    made: list[Container] = []

    def make() -> Container:
        c = Container(daemon.env)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


def pin_map(c: Container, path: str) -> int:
    """Create a map in the container and pin it; returns its id."""
    return int(c.python(f"""
        fd = client.map_create(MapType.HASH, 4, 4, 4)
        client.obj_pin(fd, {path!r})
        print(client.obj_get_info_by_fd(fd)["id"])
    """))


def test_two_containers_are_isolated_from_each_other_and_the_host(daemon, containers) -> None:
    a, b = containers(), containers()
    a.mount(daemon, MNT)
    b.mount(daemon, MNT)
    pin_map(a, f"{MNT}/only_in_a")
    assert a.run("ls", MNT).stdout.split() == ["only_in_a"]
    assert b.run("ls", MNT).stdout.split() == []
    assert "only_in_a" not in os.listdir(daemon.mount)


def test_two_mounts_in_one_namespace_show_the_same_tree(daemon, containers) -> None:
    a = containers()
    a.mount(daemon, "/mnt/one")
    a.mount(daemon, "/mnt/two")
    pin_map(a, "/mnt/one/m")
    a.run("mkdir", "/mnt/two/d")
    assert sorted(a.run("ls", "/mnt/one").stdout.split()) == ["d", "m"]
    assert sorted(a.run("ls", "/mnt/two").stdout.split()) == ["d", "m"]


def test_a_named_instance_is_shared_and_outlives_its_mounts(daemon, containers) -> None:
    a, b = containers(), containers()
    a.mount(daemon, MNT, "--instance", "shared")
    b.mount(daemon, MNT, "--instance", "shared")
    map_id = pin_map(a, f"{MNT}/m")
    assert b.run("ls", MNT).stdout.split() == ["m"]
    a.stop()
    b.stop()
    c = containers()
    wait_for(lambda: "shared" in cli(daemon, "status"), "the instance to be listed")
    c.mount(daemon, MNT, "--instance", "shared")
    assert int(c.python(f"""
        print(client.obj_get_info_by_fd(client.obj_get("{MNT}/m"))["id"])
    """)) == map_id


def test_an_unnamed_instance_releases_its_pins_with_its_last_mount(daemon, containers) -> None:
    a = containers()
    a.mount(daemon, MNT)
    map_id = pin_map(a, f"{MNT}/m")
    with Client(str(daemon.socket)) as client:
        os.close(client.get_fd_by_id("map", map_id))
        a.stop()  # the namespace goes with its last process; the daemon unmounts

        def freed() -> bool:
            try:
                os.close(client.get_fd_by_id("map", map_id))
            except OSError:
                return True
            return False

        wait_for(freed, "the map of the unmounted instance to be freed", timeout=30)


def test_a_map_fd_passed_between_containers_is_pinned_there(daemon, containers,
                                                            tmp_path) -> None:
    a, b = containers(), containers()
    a.mount(daemon, MNT)
    b.mount(daemon, MNT)
    path = str(tmp_path / "handoff.sock")
    recv_code = CLIENT_PRELUDE + textwrap.dedent(f"""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.bind({path!r}); s.listen(1)
        conn, _ = s.accept()
        _, fds, _, _ = socket.recv_fds(conn, 16, 1)
        client.obj_pin(fds[0], "{MNT}/from_a")
        print(client.obj_get_info_by_fd(fds[0])["id"])
    """)
    proc = subprocess.Popen(["nsenter", "-t", str(b.pid), "-m", sys.executable, "-c",
                             recv_code], env=daemon.env, stdout=subprocess.PIPE, text=True)
    wait_for(lambda: os.path.exists(path), "the receiver to listen")
    sent_id = int(a.python(f"""
        fd = client.map_create(MapType.ARRAY, 4, 4, 1)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect({path!r})
        socket.send_fds(s, [b"x"], [fd])
        print(client.obj_get_info_by_fd(fd)["id"])
    """))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert int(out) == sent_id
    assert b.run("ls", MNT).stdout.split() == ["from_a"]
    assert a.run("ls", MNT).stdout.split() == []
    # the sender's fd is gone with its process: the pin in b holds the map
    assert int(b.python(f"""
        print(client.obj_get_info_by_fd(client.obj_get("{MNT}/from_a"))["id"])
    """)) == sent_id


CONTAINER_ROOT = 100_000  # host uid and gid of root in a user-namespaced container
RETURN_0 = asm.program(asm.mov64_imm(0, 0), asm.exit())


@pytest.fixture
def public_root() -> Iterator[Path]:
    """A directory other users can reach (pytest's tmp dirs are 0700), removed after the
    daemons started in it have stopped."""
    public = Path(tempfile.mkdtemp(prefix="bpffs-public-"))
    public.chmod(0o755)
    yield public
    shutil.rmtree(public, ignore_errors=True)


def test_a_container_with_its_own_user_and_pid_namespaces(public_root, start_daemon) -> None:
    """The recipe for a rootless-style container: its root is host uid 100000. The kernel
    maps ids across the FUSE mount, so the container sees its own files as root's and the
    host's as nobody's; the daemon sees the container's root as the unprivileged uid 100000."""
    daemon = start_daemon(mount=True, root=public_root / "d")
    with Container(daemon.env, uid_base=CONTAINER_ROOT) as c, daemon.client() as client:
        c.mount(daemon, MNT)
        assert c.run("id", "-u").stdout.strip() == "0"
        c.run("mkdir", f"{MNT}/mine")
        assert c.run("stat", "-c", "%u:%g", f"{MNT}/mine").stdout.strip() == "0:0"
        from_host = f"/proc/{c.pid}/root{MNT}"  # the container's tree, seen from the host
        assert os.stat(f"{from_host}/mine").st_uid == CONTAINER_ROOT
        assert c.run("stat", "-c", "%U", MNT).stdout.strip() == "nobody"  # host root's 1777

        fd = client.map_create(1, 4, 4, 1)
        client.obj_pin(fd, f"{from_host}/mine/from_host")  # the host pins into the container
        assert c.run("ls", f"{MNT}/mine").stdout.split() == ["from_host"]
        assert c.run("stat", "-c", "%U %a", f"{MNT}/mine/from_host").stdout.split() == [
            "nobody", "600"]
        c.run("rm", f"{MNT}/mine/from_host")  # its own directory: the container may unlink
        assert client.obj_get_info_by_fd(fd)["id"] > 0  # the host's fd still holds the map
        os.close(fd)
        touched = c.run("touch", f"{MNT}/mine/file", check=False)
        assert touched.returncode != 0 and "Permission denied" in touched.stderr
        assert c.run("ls", "-A", f"{MNT}/mine").stdout.split() == []

        fd = client.map_create(1, 4, 4, 1)
        client.obj_pin(fd, f"{from_host}/hosts")  # host root's pin, 0600
        os.close(fd)

        def as_the_containers_root() -> list:
            """A client inside the container (its user and mount namespaces, as its root)."""
            enter_namespaces(c.pid)
            with Client(str(daemon.socket)) as inside:
                os.close(inside.map_create(1, 4, 4, 1))  # unprivileged callers may
                pinned = os.path.exists(f"{MNT}/hosts")
                outcomes = []
                for attempt in (lambda: inside.obj_get(f"{MNT}/hosts"),
                                lambda: inside.prog_load(ProgType.SCHED_CLS, RETURN_0, "GPL")):
                    try:
                        os.close(attempt())
                        outcomes.append(0)
                    except OSError as e:
                        outcomes.append(e.errno)
                return [os.getuid(), pinned, *outcomes]

        assert in_child(as_the_containers_root) == [0, True, errno.EACCES, errno.EPERM]


def enter_namespaces(pid: int) -> None:
    """Join the user and mount namespaces of `pid` and become root there (this process must
    be single-threaded, as a forked child is)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for ns in ("user", "mnt"):
        ns_fd = os.open(f"/proc/{pid}/ns/{ns}", os.O_RDONLY)
        if libc.setns(ns_fd, 0) != 0:
            raise OSError(ctypes.get_errno(), f"setns into the {ns} namespace of {pid}")
        os.close(ns_fd)
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
