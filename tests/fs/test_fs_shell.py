"""Shell tools on our mount behave as on the kernel's bpffs: the same transcript runs on a real
`mount -t bpf` and on a fresh bpffsd mount, and every output and exit status must match.

Normalised away: the mountpoint's path, and the kernel's maps.debug/progs.debug files (added
after 4.4, which we do not emulate). `cat` of a pin is left out on purpose: the kernel answers
EIO, we print the object (test_fs_render.py).
"""

from __future__ import annotations

import difflib
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fs_helpers import UNPRIVILEGED, as_user, client_call, errno_of, in_child, pin_as, pin_new_map
from helpers import DaemonProcess, raises_errno

from bpffs.vm import kernel
from bpffs.vm.uapi import MapType

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

KERNEL_ONLY_FILES = ("maps.debug", "progs.debug")

# Each line runs as `sh -c LINE` in the mount's root, as root with umask 022; "m" is a pinned map.
TRANSCRIPT = r"""
stat -c '%A %h %s %U:%G %F' .
stat -f -c 'blocks=%b free=%f avail=%a files=%c ffree=%d namelen=%l bsize=%S' .
stat -c '%A %h %s %U:%G %F' m
ls -l m | cut -d' ' -f1-5
mkdir d
mkdir d
mkdir -m 700 e
stat -c '%A %h %s %F' d e
stat -c '%h' .
touch x
touch d/x
touch m
echo hi > x
echo hi > m
printf '' >> m
truncate -s 0 m
truncate -s 5 m
stat -c '%s' m
mkfifo f
mknod n c 1 3
mknod r p
mkdir a.b
ln -s m a.b
mkdir "$(printf 'x%.0s' $(seq 255))" && rmdir "$(printf 'x%.0s' $(seq 255))"
mkdir "$(printf 'x%.0s' $(seq 256))" 2>&1 | sed 's/x\{9,\}/X/'
ls -a
ln -s d sd
ln -s nowhere dangling
ln -s m sm
readlink sd dangling sm
stat -c '%A %h %s %F %N' sd
stat -L -c '%A %F' sm
cat dangling
ls sd/
ln m hard
stat -c '%h' m hard
$RENAMEAT2 m hard NOREPLACE
$RENAMEAT2 m nothere NOREPLACE && $RENAMEAT2 nothere m NOREPLACE
$RENAMEAT2 d e EXCHANGE && stat -c '%n %A' d e && $RENAMEAT2 e d EXCHANGE
$RENAMEAT2 d nothere EXCHANGE
$RENAMEAT2 m d/x WHITEOUT
ln d dhard
ln m d/m2
stat -c '%h' m
mv d e/d
ls e
mv e/d d
mv m d/
ls d
mv d/m m
mv -n m hard
mv -T e d
mv d e
mkdir -p p/q/r
rmdir p
rmdir p/q/r p/q p
rmdir nope
rmdir m
rm nope
rm d
rm -d d/m2
rm d/m2
stat -c '%h' m
rm hard
stat -c '%h' m
chmod 640 m
stat -c '%A' m
chmod 1777 e
stat -c '%A' e
chown 1000:1000 e m
stat -c '%A %u %g' e m
chown 0:0 m
chmod 600 m
mv sd e/sd
ls -l e | tail -n +2 | cut -d' ' -f1,2
readlink e/sd
ls e/sd/
rm -r e
cd dangling
rm dangling sm
mkdir -m 0 locked
stat -c '%A' locked
ls locked
rmdir locked
mkdir s && ln -s ../m s/up && readlink s/up && stat -L -c '%F' s/up
rm -r s
ls -a
ls -la | grep -v debug | wc -l
"""


# renameat2(2) with a flag, as `mv --exchange`/`mv -n` would do with a newer coreutils.
RENAMEAT2 = """
import ctypes, os, sys
flags = {"NOREPLACE": 1, "EXCHANGE": 2, "WHITEOUT": 4}[sys.argv[3]]
libc = ctypes.CDLL(None, use_errno=True)
if libc.renameat2(-100, os.fsencode(sys.argv[1]), -100, os.fsencode(sys.argv[2]), flags):
    sys.exit(f"renameat2 {sys.argv[3]}: {os.strerror(ctypes.get_errno())}")
"""


def run_transcript(root: Path) -> list[str]:
    out = []
    env = {**os.environ, "RENAMEAT2": f"{sys.executable} -c '{RENAMEAT2}'"}
    for line in TRANSCRIPT.strip().splitlines():
        result = subprocess.run(["sh", "-c", line], cwd=root, capture_output=True, text=True,
                                timeout=30, env=env, preexec_fn=lambda: os.umask(0o022))
        text = (result.stdout + result.stderr).replace(str(root), "B")
        kept = [t for t in text.splitlines() if not any(f in t for f in KERNEL_ONLY_FILES)]
        out.append(f"$ {line}\n" + "".join(f"  {t}\n" for t in kept)
                   + f"  [exit {result.returncode}]")
    return out


def test_shell_transcript_matches_the_kernel(kernel_bpffs: Path, start_daemon) -> None:
    fd = kernel.map_create(MapType.HASH, 4, 8, 16)
    kernel.obj_pin(fd, str(kernel_bpffs / "m"))
    os.close(fd)
    ours = start_daemon(mount=True)
    with ours.client() as client:
        pin_new_map(client, ours.mount / "m")
    # The listing of a fresh kernel bpffs counts maps.debug/progs.debug: drop them, as above.
    for name in KERNEL_ONLY_FILES:
        assert (kernel_bpffs / name).exists()
    expected = run_transcript(kernel_bpffs)
    got = run_transcript(ours.mount)
    diff = "\n".join(difflib.unified_diff("\n".join(expected).splitlines(),
                                          "\n".join(got).splitlines(), "kernel bpffs",
                                          "bpffsd", lineterm=""))
    assert got == expected, f"shell transcript differs:\n{diff}"


# -- permissions, as a non-root caller sees them ------------------------------------------------
RDONLY = 1 << 3  # BPF_F_RDONLY


@pytest.fixture(scope="module")
def public() -> Iterator[Path]:
    """A directory every user can traverse (pytest's own tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="bpffs-public-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(public: Path) -> Iterator[DaemonProcess]:
    """This module's daemon, mounted where other users can reach it."""
    d = DaemonProcess(public / "ours", mount=True).start()
    (public / "ours").chmod(0o755)
    yield d
    assert d.stop() == 0, d.log_text()
    assert not d.cleanup_mount()


@pytest.fixture
def kernel_bpffs(public: Path) -> Iterator[Path]:
    """A kernel bpffs where other users can reach it."""
    path = public / f"kernel{uuid.uuid4().hex[:8]}"
    path.mkdir()
    if subprocess.run(["mount", "-t", "bpf", "bpf", str(path)], capture_output=True).returncode:
        pytest.skip("this kernel cannot mount bpffs here")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def _kernel_and_ours(kernel_bpffs: Path, daemon, name: str) -> tuple[Path, Path]:
    """A pinned map at NAME in both filesystems' roots."""
    fd = kernel.map_create(MapType.HASH, 4, 8, 16)
    kernel.obj_pin(fd, str(kernel_bpffs / name))
    os.close(fd)
    with daemon.client() as client:
        pin_new_map(client, daemon.mount / name)
    return kernel_bpffs / name, daemon.mount / name


def _get_errnos(kpin: Path, pin: Path, daemon, flags: int = 0) -> tuple[int, int]:
    """errno of OBJ_GET as nobody, on the kernel's pin and on ours (0: success)."""
    return (errno_of(lambda: in_child(lambda: os.close(kernel.obj_get(str(kpin), flags)),
                                      user=UNPRIVILEGED)),
            errno_of(lambda: client_call(daemon, "obj_get", str(pin), flags,
                                         user=UNPRIVILEGED)))


def _as_nobody(*argv: str) -> int:
    return subprocess.run(as_user(list(argv), UNPRIVILEGED), capture_output=True).returncode


def test_chmod_and_chown_are_enforced_on_obj_get(daemon, kernel_bpffs: Path) -> None:
    kpin, pin = _kernel_and_ours(kernel_bpffs, daemon, f"perm{os.getpid()}")
    # Mode 0600, owned by root: nobody may not get it, on either filesystem.
    assert _get_errnos(kpin, pin, daemon) == (errno.EACCES, errno.EACCES)
    # chmod o+rw lets them in ...
    for p in (kpin, pin):
        subprocess.run(["chmod", "606", str(p)], check=True)
    assert _get_errnos(kpin, pin, daemon) == (0, 0)
    # ... a read-only grant allows BPF_F_RDONLY only ...
    for p in (kpin, pin):
        subprocess.run(["chmod", "604", str(p)], check=True)
    assert _get_errnos(kpin, pin, daemon, RDONLY) == (0, 0)
    assert _get_errnos(kpin, pin, daemon) == (errno.EACCES, errno.EACCES)
    # ... and chown hands the pin over.
    for p in (kpin, pin):
        subprocess.run(["chmod", "600", str(p)], check=True)
        subprocess.run(["chown", "{}:{}".format(*UNPRIVILEGED), str(p)], check=True)
    assert _get_errnos(kpin, pin, daemon) == (0, 0)
    os.unlink(kpin)
    os.unlink(pin)


def test_sticky_root_protects_other_users_pins(daemon, kernel_bpffs: Path) -> None:
    kpin, pin = _kernel_and_ours(kernel_bpffs, daemon, f"sticky{os.getpid()}")
    for p in (kpin, pin):
        assert _as_nobody("rm", "-f", str(p)) != 0, f"{p} removed by a non-owner"
        assert _as_nobody("mv", str(p), str(p) + "x") != 0, f"{p} renamed by a non-owner"
        assert p.exists()
    # A user may pin into the world-writable root and remove their own pins.
    mine = daemon.mount / f"mine{os.getpid()}"
    pin_as(daemon, mine, user=UNPRIVILEGED)
    assert mine.stat().st_uid == UNPRIVILEGED[0]
    assert _as_nobody("rm", str(mine)) == 0
    assert not mine.exists()
    os.unlink(kpin)
    os.unlink(pin)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o600), (0o077, 0o600), (0o266, 0o400),
                                         (0o777, 0o000)])
def test_pins_are_0600_minus_the_callers_umask(daemon, kernel_bpffs: Path, umask: int,
                                               mode: int) -> None:
    def kernel_pin() -> None:
        fd = kernel.map_create(MapType.HASH, 4, 4, 1)
        kernel.obj_pin(fd, str(kernel_bpffs / "u"))
        os.close(fd)

    in_child(kernel_pin, umask=umask)
    pin = daemon.mount / f"u{umask:o}x{os.getpid()}"
    pin_as(daemon, pin, umask=umask)
    assert (kernel_bpffs / "u").stat().st_mode & 0o7777 == mode
    assert pin.stat().st_mode & 0o7777 == mode
    pin.unlink()


def test_non_owner_cannot_pin_into_a_0755_directory(daemon, bpf_dir: Path) -> None:
    with raises_errno(errno.EACCES):
        pin_as(daemon, bpf_dir / "x", user=UNPRIVILEGED)
    assert not (bpf_dir / "x").exists()


def test_writing_a_pin_is_eio(client, bpf_dir: Path) -> None:
    pin_new_map(client, bpf_dir / "m")
    with raises_errno(errno.EIO):
        os.open(bpf_dir / "m", os.O_WRONLY)
