"""bpffsd.service and bpffsd.socket under a real systemd as PID 1, next to a kernel bpffs at
/sys/fs/bpf, as on every systemd host.

A Debian 12 root is built with mmdebstrap (systemd, dbus, fuse3, python3), bpffsd is installed
in it as install.sh lays it out as root (a virtualenv at /opt/bpffsd/venv, from wheels built
here; `bpffsd` and `bpffs` linked into /usr/local/bin, the path ExecStart names), and the units
are copied in unchanged. Then `unshare --pid --fork --mount`, proc, sysfs, cgroup2, a kernel
bpffs at /sys/fs/bpf, /dev and tmpfs /run and /tmp, pivot_root into the root and exec
/lib/systemd/systemd (systemd-nspawn --boot needs a systemd host; this does not). The test
process stands for the host's other tools: it reads PID 1's mountinfo and the mount itself
through /proc/PID/root, from outside the namespaces.

Slow (about a minute) and it reaches the package registries: it runs where CI,
BPFFSD_INSTALL_TESTS or BPFFSD_SYSTEMD_TESTS is set, and is skipped cleanly where root, unshare,
mmdebstrap, Python 3.11 (Debian 12's, for the wheels) or the registries are missing:

    BPFFSD_SYSTEMD_TESTS=1 python3 -m pytest -q tests/systemd
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bpffs import paths

pytestmark = [pytest.mark.slow, pytest.mark.install]

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("systemd", "systemd-sysv", "dbus", "fuse3", "python3", "python3-venv", "procps",
            "util-linux")
APT_OPTIONS = ('Acquire::Check-Valid-Until "false"', 'Acquire::Check-Date "false"')
VENV = "/opt/bpffsd/venv"  # install.sh's virtualenv as root
MOUNT = paths.SYSTEM_ALT_MOUNT  # the service's default mountpoint
ROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8", "HOME": "/root", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}

# Run by `unshare --pid --fork --mount` with the root as $1: the new PID namespace's init
# becomes systemd.
BOOT = r"""set -e
R=$1
mount --make-rprivate /
mount --bind "$R" "$R"
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup"
mount -t bpf bpf "$R/sys/fs/bpf"   # the kernel's bpffs, where systemd mounts it at boot
mount --rbind /dev "$R/dev"
mount -t tmpfs -o mode=0755 tmpfs "$R/run"
mount -t tmpfs tmpfs "$R/tmp"
mkdir -p "$R/.host"
cd "$R"
pivot_root . .host
INIT='umount -l /.host && rmdir /.host; exec /lib/systemd/systemd --system --log-target=console'
exec chroot . /bin/sh -c "$INIT"
"""

# Run in the root before it boots (a private mount and PID namespace, the root's /proc).
INSTALL = f"""set -e
python3 -m venv {VENV}
{VENV}/bin/pip install -q --no-index --find-links /var/tmp/bpffsd-wheels 'bpffsd[daemon]'
ln -sf {VENV}/bin/bpffsd {VENV}/bin/bpffs /usr/local/bin/
rm -rf /var/tmp/bpffsd-wheels
"""


def skip_reason() -> str | None:
    if not (os.environ.get("CI") or os.environ.get("BPFFSD_INSTALL_TESTS")
            or os.environ.get("BPFFSD_SYSTEMD_TESTS")):
        return ("builds a Debian root and boots systemd (about a minute, from the registries):"
                " set BPFFSD_SYSTEMD_TESTS=1 (CI sets CI and runs it)")
    if os.geteuid() != 0:
        return "needs root (unshare, mount, pivot_root)"
    missing = [tool for tool in ("mmdebstrap", "unshare", "nsenter", "pivot_root", "chroot")
               if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} (apt-get install mmdebstrap util-linux)"
    if sys.version_info[:2] != (3, 11):
        return "the wheels built here must fit Debian 12's python3.11"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    return None


def checkout(dest: Path) -> Path:
    """This repository's files as a clone plus the working tree's changes has them."""
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], check=True, capture_output=True).stdout
    for name in out.decode().split("\0"):
        src = REPO / name
        if not name or not (src.is_symlink() or src.is_file()):
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():  # bpffs/daemon -> ../bpffsd and its siblings
            (dest / name).symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dest / name)
    return dest


def run(cmd: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                          timeout=timeout, check=False, **kw)


@dataclass
class Booted:
    root: Path
    proc: subprocess.Popen  # unshare
    pid: int  # systemd, as the host sees it
    console: Path

    def sh(self, script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A shell command inside the booted system (its mount and PID namespaces)."""
        return run(["nsenter", "-t", str(self.pid), "-m", "-p", "-r", "-w", "/bin/sh", "-c",
                    script], timeout=timeout, env=ROOT_ENV)

    def ok(self, script: str, timeout: float = 120) -> str:
        result = self.sh(script, timeout)
        assert result.returncode == 0, (f"`{script}` exited {result.returncode}:\n"
                                        f"{result.stdout}{result.stderr}\n{self.journal()}")
        return result.stdout

    def show(self, unit: str, prop: str) -> str:
        return self.ok(f"systemctl show -p {prop} --value {unit}").strip()

    def journal(self, unit: str = "bpffsd.service", extra: str = "") -> str:
        result = self.sh(f"journalctl -u {unit} --no-pager -o cat {extra}")
        return result.stdout

    def mountinfo(self) -> str:
        """PID 1's mounts, read from outside its namespaces."""
        return Path(f"/proc/{self.pid}/mountinfo").read_text()

    def fuse_mounts(self) -> list[str]:
        return [line.split()[4] for line in self.mountinfo().splitlines()
                if line.partition(" - ")[2].startswith("fuse.bpffsd ")]

    def stop_all(self) -> None:
        self.sh("systemctl stop bpffsd.service; rm -f /etc/default/bpffsd;"
                " systemctl daemon-reload; systemctl reset-failed")


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("systemd")
    root = work / "root"
    started = time.monotonic()
    prebuilt = os.environ.get("BPFFSD_SYSTEMD_DEBIAN_ROOT")  # an mmdebstrap of PACKAGES, to reuse
    if prebuilt:
        subprocess.run(["cp", "-a", prebuilt, str(root)], check=True)
    else:
        debootstrap = run(["mmdebstrap", "--variant=minbase",
                           *(f"--aptopt={o}" for o in APT_OPTIONS),
                           "--include=" + ",".join(PACKAGES), "bookworm", str(root)], timeout=1200)
        if debootstrap.returncode != 0:
            pytest.skip("mmdebstrap could not build a Debian 12 root (no registry?): "
                        + (debootstrap.stderr.strip().splitlines() or ["?"])[-1])
    built = time.monotonic()
    wheels = root / "var/tmp/bpffsd-wheels"
    wheel = run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels),
                 f"{checkout(work / 'src')}[daemon]"], timeout=1200)
    if wheel.returncode != 0:
        pytest.skip(f"pip could not build the wheels (no registry?): {wheel.stderr[-500:]}")
    setup = (f"set -e; R={shlex.quote(str(root))}; mount --make-rprivate /;"
             " mount -t proc proc $R/proc; mount --rbind /dev $R/dev;"
             f" exec chroot $R /bin/sh -c {shlex.quote(INSTALL)}")
    installed = run(["unshare", "--mount", "--pid", "--fork", "--kill-child", "/bin/sh", "-c",
                     setup], env=ROOT_ENV)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    for name in ("bpffsd.service", "bpffsd.socket"):  # as shipped: no sed
        shutil.copy(REPO / "systemd" / name, root / "etc/systemd/system" / name)
    shutil.copy(REPO / "systemd/bpffsd.conf", root / "etc/tmpfiles.d/bpffsd.conf")
    for unit in ("getty.target", "serial-getty@ttyS0.service"):  # no consoles to wait for
        (root / "etc/systemd/system" / unit).symlink_to("/dev/null")
    console = work / "console.log"
    with open(console, "wb") as out:
        proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount", "--kill-child",
                                 "/bin/sh", "-c", BOOT, "boot", str(root)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=ROOT_ENV)
    booted = None
    try:
        deadline = time.monotonic() + 30
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        while not (children.exists() and children.read_text().split()):
            assert proc.poll() is None, console.read_text()
            assert time.monotonic() < deadline, "unshare started no child"
            time.sleep(0.05)
        pid = int(children.read_text().split()[0])
        booted = Booted(root, proc, pid, console)
        deadline = time.monotonic() + 120
        bus = Path(f"/proc/{pid}/root/run/systemd/private")  # systemctl's way in
        while not bus.exists():
            assert proc.poll() is None and time.monotonic() < deadline, console.read_text()
            time.sleep(0.1)
        state = booted.sh("systemctl is-system-running --wait", timeout=180).stdout.strip()
        assert state in ("running", "degraded"), (
            f"systemd is {state!r}\n{booted.sh('systemctl --failed --no-pager').stdout}\n"
            f"{console.read_text()[-3000:]}")
        print(f"\nDebian root: {built - started:.0f} s; wheels, install and boot:"
              f" {time.monotonic() - built:.0f} s; systemd {state}")
        yield booted
    finally:
        if booted is not None:
            booted.sh("systemctl poweroff --no-block", timeout=30)
        try:
            proc.wait(timeout=60 if booted is not None else 0.1)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def test_the_shipped_units_verify(booted: Booted) -> None:
    result = booted.sh("systemd-analyze verify /etc/systemd/system/bpffsd.service"
                       " /etc/systemd/system/bpffsd.socket")
    assert result.returncode == 0, result.stderr
    assert "bpffsd" not in result.stderr, result.stderr


def test_the_service_mounts_for_the_host_next_to_the_kernels_bpffs(booted: Booted) -> None:
    """Type=notify: `systemctl start` returns once bpffsd said READY=1 (its STATUS= shows);
    the service shares PID 1's mount namespace, so its mount is the host's; the kernel's bpffs
    at /sys/fs/bpf stays on top there, untouched."""
    booted.stop_all()
    booted.ok("systemctl start bpffsd.socket bpffsd.service")
    assert booted.show("bpffsd.service", "ActiveState") == "active"
    assert booted.show("bpffsd.service", "StatusText") == f"serving on {paths.SYSTEM_SOCKET}"
    main_pid = booted.show("bpffsd.service", "MainPID")
    namespaces = booted.ok(f"readlink /proc/1/ns/mnt /proc/{main_pid}/ns/mnt").split()
    assert namespaces[0] == namespaces[1], "the service has a mount namespace of its own"
    assert booted.fuse_mounts() == [MOUNT]
    assert paths.kernel_bpffs_at("/sys/fs/bpf", mountinfo=f"/proc/{booted.pid}/mountinfo")
    booted.ok(f"bpffs map create {MOUNT}/counts type hash key 4 value 8 entries 16 name counts")
    assert os.listdir(f"/proc/{booted.pid}/root{MOUNT}") == ["counts"]  # from the host
    assert "counts" not in booted.ok("ls /sys/fs/bpf")
    assert "Traceback" not in booted.journal()


SMOKE = """
import os, struct, sys
from bpffs.client import Client
from bpffs.vm.uapi import MapType, ProgType
mount = sys.argv[1]
insns = struct.pack("<BBhi", 0xb7, 0, 0, 7) + struct.pack("<BBhi", 0x95, 0, 0, 0)  # r0 = 7
with Client() as c:
    m = c.map_create(MapType.HASH, 4, 8, 16, name="smoke")
    c.map_update_elem(m, b"\\1\\0\\0\\0", b"\\2" * 8)
    p = c.prog_load(ProgType.SOCKET_FILTER, insns, name="seven")
    assert c.prog_test_run(p, bytes(64), repeat=3).retval == 7
    c.obj_pin(m, f"{mount}/smoke_map")
    c.obj_pin(p, f"{mount}/smoke_prog")
    again = c.obj_get(f"{mount}/smoke_map")
    pid = os.fork()
    if pid == 0:  # an object fd is a reference: a child uses its inherited copy
        with Client() as child:
            os._exit(child.map_lookup_elem(again, b"\\1\\0\\0\\0") != b"\\2" * 8)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    os.close(c.perf_event_open(0))
print("smoke ok")
"""


def test_the_object_model_works_under_the_hardening(booted: Booted) -> None:
    """Maps, programs (verified and run), pins, fds shared with a child, perf events, then a
    restart that restores the pins: all under the unit's seccomp filter and capabilities."""
    booted.ok("systemctl start bpffsd.service")
    smoke = f"{VENV}/bin/python3 - {MOUNT} <<'EOF'\n{SMOKE}\nEOF"
    assert booted.ok(smoke).strip() == "smoke ok"
    booted.ok("systemctl restart bpffsd.service")
    assert {"smoke_map", "smoke_prog"} <= set(os.listdir(f"/proc/{booted.pid}/root{MOUNT}"))
    assert "Traceback" not in booted.journal()


def test_containers_get_the_tree(booted: Booted) -> None:
    """Bound at a container's /sys/fs/bpf, or mounted into its mount namespace by the service
    (setns under RestrictNamespaces=mnt and the rest of the hardening)."""
    booted.ok("systemctl start bpffsd.service")
    booted.ok(f"bpffs map create {MOUNT}/shared type array key 4 value 4 entries 1")
    bound = booted.ok(f"unshare -m sh -c 'mount --bind {MOUNT} /sys/fs/bpf && bpffs map create"
                      " /sys/fs/bpf/viabind type array key 4 value 4 entries 1 && ls /sys/fs/bpf'")
    assert {"shared", "viabind"} <= set(bound.split())
    assert "viabind" in os.listdir(f"/proc/{booted.pid}/root{MOUNT}")  # the host sees the pin
    mounted = booted.ok(
        "unshare -m --propagation private sleep 60 & sleep 0.5;"
        " bpffs mount /sys/fs/bpf --target-pid $! --instance box >/dev/null;"
        " nsenter -t $! -m sh -c 'bpffs map create /sys/fs/bpf/inbox type array key 4 value 4"
        " entries 1 && ls /sys/fs/bpf && grep fuse.bpffsd /proc/self/mountinfo'; kill $!")
    assert "inbox" in mounted.split() and " /sys/fs/bpf " in mounted
    assert "inbox" not in booted.ok("ls /sys/fs/bpf"), "the host's kernel bpffs is untouched"


def test_stop_unmounts_cleanly(booted: Booted) -> None:
    booted.ok("systemctl start bpffsd.service")
    assert booted.fuse_mounts() == [MOUNT]
    booted.ok("systemctl stop bpffsd.service")
    assert booted.show("bpffsd.service", "ActiveState") == "inactive"
    assert booted.show("bpffsd.service", "Result") == "success"  # no timeout, no SIGKILL
    assert booted.fuse_mounts() == []
    assert booted.sh("pgrep -f '[b]in/bpffsd|[b]pffs.daemon'").stdout == "", "processes left"
    assert "Traceback" not in booted.journal()


def test_socket_activation(booted: Booted) -> None:
    """The service stopped, the socket listening: the first client starts bpffsd, which takes
    the socket from systemd, mounts and reports ready."""
    booted.stop_all()
    booted.ok("systemctl start bpffsd.socket")
    assert booted.show("bpffsd.service", "ActiveState") == "inactive"
    assert f"on {paths.SYSTEM_SOCKET}" in booted.ok("bpffs status")
    booted.ok("until systemctl is-active -q bpffsd.service; do sleep 0.1; done", timeout=30)
    assert booted.fuse_mounts() == [MOUNT]
    assert f"mounted at {MOUNT}" in booted.ok("bpffs status")


def test_the_mountpoint_and_options_come_from_etc_default(booted: Booted) -> None:
    """/etc/default/bpffsd sets BPFFSD_MOUNT and BPFFSD_ARGS. Log lines reach the journal
    without a timestamp of their own (journald adds it), with their priority."""
    booted.stop_all()
    elsewhere = "/run/bpffsd/elsewhere"
    booted.ok(f"printf 'BPFFSD_MOUNT={elsewhere}\\nBPFFSD_ARGS=-v\\n' > /etc/default/bpffsd;"
              " systemctl start bpffsd.service")
    assert booted.fuse_mounts() == [elsewhere]
    ready = [line for line in booted.journal(extra="-p info").splitlines()
             if "ready on" in line]
    assert ready and ready[-1].startswith("INFO bpffs.daemon.daemon: bpffsd "), ready
    assert not any("ready on" in line for line in booted.journal(extra="-p warning").splitlines())
    booted.stop_all()


def test_the_kernels_bpffs_is_never_covered(booted: Booted) -> None:
    """BPFFSD_MOUNT=/sys/fs/bpf on a systemd host: bpffsd refuses, in one journal line."""
    booted.stop_all()
    result = booted.sh("echo BPFFSD_MOUNT=/sys/fs/bpf > /etc/default/bpffsd;"
                       " systemctl start bpffsd.service")
    assert result.returncode != 0
    journal = booted.journal()
    assert "/sys/fs/bpf is a kernel bpffs mount" in journal, journal
    assert "Traceback" not in journal
    assert booted.fuse_mounts() == []
    assert paths.kernel_bpffs_at("/sys/fs/bpf", mountinfo=f"/proc/{booted.pid}/mountinfo")
    booted.stop_all()
