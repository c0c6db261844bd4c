"""BPF_OBJ_PIN and BPF_OBJ_GET resolve paths as the kernel does, because the kernel resolves
them: each case runs against a real kernel bpffs (bpf(2)) and against our mount (the client
sends O_PATH fds), from a process whose cwd is the filesystem's root, and both must end the
same way (the same errno, or success)."""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fs_helpers import Container, errno_of, in_child, pin_new_map

from bpffs.client import Client
from bpffs.vm import kernel
from bpffs.vm.uapi import MapType

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

RDONLY, WRONLY = 1 << 3, 1 << 4
LONG = "x" * 255

# (operation, path, file_flags); every path is relative to a fresh case directory holding
# d/m (a pinned map), s -> d/m, sd -> d, dangling -> nowhere, loop -> loop.
CASES = [
    ("get", "d/m", 0),
    ("get", "./d/../d/m", 0),
    ("get", "s", 0),
    ("get", "sd/m", 0),
    ("get", "d/m", RDONLY),
    ("get", "d/m", WRONLY),
    ("get", "d/m", RDONLY | WRONLY),
    ("get", "d/m", 1 << 5),
    ("get", "d", 0),
    ("get", "sd", 0),
    ("get", ".", 0),
    ("get", "nope", 0),
    ("get", "d/nope", 0),
    ("get", "d/m/x", 0),
    ("get", "dangling", 0),
    ("get", "loop", 0),
    ("get", "a.b", 0),
    ("get", "", 0),
    ("get", "{off}", 0),
    ("get", "{off}/file", 0),
    ("pin", "new", 0),
    ("pin", "d/new", 0),
    ("pin", "sd/new", 0),
    ("pin", "./d/../new", 0),
    ("pin", "d/m", 0),
    ("pin", "s", 0),
    ("pin", "dangling", 0),
    ("pin", "sd", 0),
    ("pin", "d", 0),
    ("pin", "d/", 0),
    ("pin", "new/", 0),
    ("pin", ".", 0),
    ("pin", "..", 0),
    ("pin", "d/.", 0),
    ("pin", "nodir/x", 0),
    ("pin", "nodir/.", 0),
    ("pin", "d/m/x", 0),
    ("pin", "dangling/x", 0),
    ("pin", "loop/x", 0),
    ("pin", "a.b", 0),
    ("pin", "d//new", 0),
    ("pin", LONG, 0),
    ("pin", LONG + "x", 0),
    ("pin", "new\udcff", 0),
    ("pin", "", 0),
    ("pin", "{off}/x", 0),
    ("pin", "{off}/..", 0),
]


class KernelFs:
    def __init__(self, root: Path):
        self.root = root
        self.fd = kernel.map_create(MapType.HASH, 4, 4, 1)

    def pin(self, path: str, _flags: int) -> None:
        kernel.obj_pin(self.fd, path)

    def get(self, path: str, flags: int) -> None:
        os.close(kernel.obj_get(path, flags))


class OurFs:
    def __init__(self, root: Path, socket: Path):
        self.root = root
        self.socket = socket

    def pin(self, path: str, _flags: int) -> None:
        with Client(str(self.socket)) as client:
            client.obj_pin(client.map_create(MapType.HASH, 4, 4, 1), path)

    def get(self, path: str, flags: int) -> None:
        with Client(str(self.socket)) as client:
            os.close(client.obj_get(path, flags))


def _populate(case_dir: Path, pin_map) -> None:
    case_dir.mkdir()
    (case_dir / "d").mkdir()
    pin_map(case_dir / "d" / "m")
    (case_dir / "s").symlink_to("d/m")
    (case_dir / "sd").symlink_to("d")
    (case_dir / "dangling").symlink_to("nowhere")
    (case_dir / "loop").symlink_to("loop")


@pytest.fixture
def both(kernel_bpffs: Path, daemon, bpf_dir: Path) -> Iterator[tuple[KernelFs, OurFs]]:
    k = KernelFs(kernel_bpffs)

    def kernel_pin(path: Path) -> None:
        kernel.obj_pin(k.fd, str(path))

    with daemon.client() as client:
        _populate(kernel_bpffs / "c", kernel_pin)
        _populate(bpf_dir / "c", lambda path: pin_new_map(client, path))
    k.root = kernel_bpffs / "c"
    yield k, OurFs(bpf_dir / "c", daemon.socket)
    os.close(k.fd)


def _outcome(fs: KernelFs | OurFs, op: str, path: str, flags: int, off: str) -> int:
    def run() -> None:
        os.chdir(fs.root)
        getattr(fs, op)(os.fsencode(path.replace("{off}", off)), flags)

    return errno_of(lambda: in_child(run))


@pytest.mark.parametrize("op, path, flags", CASES,
                         ids=[f"{op}-{path[:20]!r}-{flags:#x}" for op, path, flags in CASES])
def test_pin_and_get_resolve_paths_like_the_kernel(both, tmp_path: Path, op: str, path: str,
                                                   flags: int) -> None:
    (tmp_path / "file").write_text("not a pin")
    k, ours = both
    expected = _outcome(k, op, path, flags, str(tmp_path))
    got = _outcome(ours, op, path, flags, str(tmp_path))
    assert (errno.errorcode.get(got, got), errno.errorcode.get(expected, expected)) == (
        errno.errorcode.get(expected, expected),) * 2, f"{op} {path!r}: kernel vs ours"
    if op == "pin" and expected == 0:  # and the new pin is there, a map, in both
        for fs in both:
            target = os.path.join(os.fsencode(fs.root), os.fsencode(path))
            assert os.path.isfile(target)
            assert _outcome(fs, "get", os.fsdecode(target), 0, "") == 0


@pytest.fixture
def bind_target() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bpffs-bind-"))
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)
    path.rmdir()


@pytest.mark.parametrize("which", ["kernel", "ours"])
def test_pin_and_get_through_a_bind_mount(both, bind_target: Path, which: str) -> None:
    fs = both[0] if which == "kernel" else both[1]
    subprocess.run(["mount", "--bind", str(fs.root / "d"), str(bind_target)], check=True)
    assert _outcome(fs, "get", str(bind_target / "m"), 0, "") == 0
    assert _outcome(fs, "pin", str(bind_target / "viabind"), 0, "") == 0
    assert (fs.root / "d" / "viabind").is_file()
    assert _outcome(fs, "get", str(fs.root / "d" / "viabind"), 0, "") == 0
    os.unlink(bind_target / "viabind")
    assert not (fs.root / "d" / "viabind").exists()


def test_bind_mount_into_a_container(daemon, bpf_dir: Path, client) -> None:
    """A subdirectory of the host's mount, bound into a container's namespace: the container
    pins and gets through it, the host sees the same objects."""
    (bpf_dir / "shared").mkdir()
    pin_new_map(client, bpf_dir / "shared" / "fromhost")
    with Container(daemon.env) as box:
        box.run("mkdir", "-p", "/run/bpffs-bind")
        box.run("mount", "--bind", str(bpf_dir / "shared"), "/run/bpffs-bind")
        out = box.python("""
            fd = client.obj_get("/run/bpffs-bind/fromhost")
            client.obj_pin(fd, "/run/bpffs-bind/fromcontainer")
            print(sorted(os.listdir("/run/bpffs-bind")))
        """)
        assert out.strip() == "['fromcontainer', 'fromhost']"
    fd = client.obj_get(str(bpf_dir / "shared" / "fromcontainer"))
    assert client.obj_get_info_by_fd(fd)["id"] == client.obj_get_info_by_fd(
        client.obj_get(str(bpf_dir / "shared" / "fromhost")))["id"]
