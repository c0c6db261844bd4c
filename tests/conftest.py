"""Fixtures shared by the whole suite: real daemons (subprocesses), real FUSE mounts, real
sockets, and the running kernel as an oracle. Nothing here is mocked.

The tests come in three layers, each run wherever its parts exist:
- in-process (tests/inproc, most of tests/vm and tests/verifier): the daemon's and the VM's
  classes used directly, no daemon process;
- control socket: a daemon started with --no-mount, the default of every fixture below;
- FUSE: tests marked `@pytest.mark.fuse`, only where a mount is the point (shell tools, pins,
  namespaces), skipped without /dev/fuse and fusermount3. Only they may mount: `bpf_dir` and
  `start_daemon(mount=True)` fail a test that is not marked.
`pytest -m "not fuse"` runs the first two layers; BPFFSD_TEST_HIDE_FUSE=1 makes the suite
behave as on a machine without FUSE (helpers.fuse_available).

- `daemon`: the module's bpffsd, mounted for a test marked fuse; `client` connects to it.
- `bpf_dir`: a fresh directory on that mount.
- `start_daemon`: start more (or differently configured) daemons inside a test.
- `kernel_bpffs`: a real `mount -t bpf` (skipped where the kernel or privileges are missing).
- `examples`, `build`: objects built by clang from examples/ and from C snippets.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import DaemonProcess, fuse_available

import bpffs
from bpffs.client import Client
from bpffs.vm import kernel

REPO = Path(__file__).resolve().parents[1]


def _check_import_identity() -> None:
    """Fail loudly when `bpffs` comes from anywhere but this checkout: another checkout's
    editable install, or an old copy in site-packages, would be tested in its place."""
    for name, module in (("bpffs", bpffs), ("bpffs.client", bpffs.client),
                         ("bpffs.vm", bpffs.vm)):
        where = Path(module.__file__).resolve()
        if not where.is_relative_to(REPO):
            raise pytest.UsageError(
                f"{name} is imported from {where}, not from this checkout ({REPO}): run pytest"
                f" as `python3 -m pytest` from {REPO}, or `pip install -e {REPO}`")


_check_import_identity()


def _check_log(daemon: DaemonProcess) -> None:
    text = daemon.log_text()
    assert "Traceback" not in text, f"bpffsd logged a traceback:\n{text}"


def needs_mount(request: pytest.FixtureRequest) -> bool:
    """Whether the requesting test is marked fuse (the only tests that may mount)."""
    return request.node.get_closest_marker("fuse") is not None


def _module_daemon(root: Path, mount: bool) -> Iterator[DaemonProcess]:
    d = DaemonProcess(root, mount).start()
    yield d
    status = d.stop()
    left = d.cleanup_mount()
    _check_log(d)
    assert status == 0, f"bpffsd exited with {status}:\n{d.log_text()}"
    assert not left, "bpffsd left its mount behind on SIGTERM"


@pytest.fixture(scope="module")
def socket_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One bpffsd per test module, without a mount: the control socket only."""
    yield from _module_daemon(tmp_path_factory.mktemp("bpffsd"), mount=False)


@pytest.fixture(scope="module")
def mounted_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One bpffsd per test module with a FUSE mount, for the tests marked fuse."""
    yield from _module_daemon(tmp_path_factory.mktemp("bpffsd"), mount=True)


@pytest.fixture
def daemon(request: pytest.FixtureRequest) -> DaemonProcess:
    """The module's daemon: mounted for a test marked fuse, else without a mount. Tests
    isolate themselves with `bpf_dir`."""
    return request.getfixturevalue("mounted_daemon" if needs_mount(request) else "socket_daemon")


@pytest.fixture
def start_daemon(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator:
    """start_daemon(mount=False, args=(), root=None) -> DaemonProcess, stopped after the
    test; mount=True only in a test marked fuse."""
    started: list[DaemonProcess] = []

    def start(mount: bool = False, args: tuple[str, ...] = (), root: Path | None = None
              ) -> DaemonProcess:
        if mount and not needs_mount(request):
            pytest.fail("a test that mounts must be marked @pytest.mark.fuse", pytrace=False)
        d = DaemonProcess(root or tmp_path / f"d{len(started)}", mount, args).start()
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
        d.cleanup_mount()
    for d in started:
        _check_log(d)


@pytest.fixture
def public_root() -> Iterator[Path]:
    """A directory every user may search (pytest's tmp_path is root's 0700)."""
    root = Path(tempfile.mkdtemp(prefix="bpffsd-pub-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def public_daemon(public_root: Path, start_daemon, request: pytest.FixtureRequest
                  ) -> DaemonProcess:
    """A daemon under public_root: one whose socket uid 65534 can reach (mounted for a test
    marked fuse)."""
    return start_daemon(root=public_root / "d", mount=needs_mount(request))


@pytest.fixture
def client(daemon: DaemonProcess) -> Iterator[Client]:
    with daemon.client() as c:
        yield c


@pytest.fixture
def bpf_dir(daemon: DaemonProcess) -> Iterator[Path]:
    """A fresh directory on the module daemon's mount (names may not contain dots)."""
    if daemon.mount is None:
        pytest.fail("bpf_dir is on the mount: mark the test @pytest.mark.fuse", pytrace=False)
    path = daemon.mount / f"t{uuid.uuid4().hex[:12]}"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def use_daemon(daemon: DaemonProcess, monkeypatch: pytest.MonkeyPatch) -> DaemonProcess:
    """Point the module-level libbpf calls (default_client) at the module daemon."""
    monkeypatch.setenv("BPFFS_SOCKET", str(daemon.socket))
    return daemon


@pytest.fixture
def kernel_bpffs(tmp_path: Path) -> Iterator[Path]:
    """A real kernel bpffs, the oracle for shell-tool behaviour."""
    if os.geteuid() != 0:
        pytest.skip("mounting a kernel bpffs needs root")
    path = tmp_path / "kernel_bpf"
    path.mkdir()
    if subprocess.run(["mount", "-t", "bpf", "bpf", str(path)], capture_output=True).returncode:
        pytest.skip("this kernel cannot mount bpffs here")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


# -- clang-built objects (tests/elf, tests/client) ----------------------------------------------
EXAMPLES = REPO / "examples"
INCLUDE = EXAMPLES / "include"
EXAMPLE_NAMES = sorted(p.stem for p in EXAMPLES.glob("*.c"))


def clang_available() -> bool:
    return shutil.which("clang") is not None


def compile_bpf(source: Path, output: Path, debug: bool = True) -> Path:
    """clang -O2 -target bpf -c (with -g: BTF, needed by .maps)."""
    cmd = ["clang", "-O2", "-target", "bpf", f"-I{INCLUDE}", "-c", str(source), "-o",
           str(output)] + (["-g"] if debug else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr}"
    return output


@pytest.fixture(scope="session")
def examples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every examples/*.c built once: name -> object path."""
    if not clang_available():
        pytest.skip("needs clang (install.sh installs it)")
    out = tmp_path_factory.mktemp("examples")
    return {name: compile_bpf(EXAMPLES / f"{name}.c", out / f"{name}.o")
            for name in EXAMPLE_NAMES}


@pytest.fixture
def build(tmp_path: Path) -> Callable[..., Path]:
    """build(c_source, name="prog", debug=True) -> object path, built with the examples'
    header."""
    if not clang_available():
        pytest.skip("needs clang (install.sh installs it)")

    def build_source(source: str, name: str = "prog", debug: bool = True) -> Path:
        c_file = tmp_path / f"{name}.c"
        c_file.write_text('#include "bpf_helpers.h"\n' + source)
        return compile_bpf(c_file, tmp_path / f"{name}.o", debug)

    return build_source


requires_kernel = pytest.mark.skipif(not kernel.available(),
                                     reason="needs the running kernel's bpf(2) (root)")
requires_fuse = pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse and fusermount3")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("kernel"):
            item.add_marker(requires_kernel)
        if item.get_closest_marker("fuse"):
            item.add_marker(requires_fuse)
