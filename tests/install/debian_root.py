"""A stock Debian 12 root filesystem, built with mmdebstrap from Debian's packages, and scripts run
inside it as root under `unshare --mount --pid --fork` + chroot.

Shared by the install tests and anyone else who needs a Debian root (a systemd test, say):

    tarball = build_tarball(tmp / "bookworm.tar", include=["python3"])   # ~45 s for minbase
    root = extract(tarball, tmp / "root")
    copy_host_network(root)            # resolv.conf, hosts, CA certificates, pip's configuration
    copy_checkout(root / "src")        # this repository's tracked and untracked files
    result = run_in_root(root, "cd /src && bash install.sh", timeout=1800)

Inside, the script sees the root's own /proc (a new PID namespace: everything it started is
killed when it returns), a fresh sysfs (so no kernel bpffs is mounted at /sys/fs/bpf), a /dev of
its own with the usual nodes and /dev/fuse mode 0666 (as Debian's udev makes it), a devpts and
tmpfs on /run, /tmp and /dev/shm. Mounts made inside stay in the private mount
namespace and vanish with it. The network is the host's: the root gets the host's resolver, CA
certificates and pip configuration, and the PIP_* variables of the environment, so apt and pip
reach the same registries as the host does.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

SUITE = "bookworm"
# The host's apt configuration does the same: the mirror may serve a dated snapshot.
APT_OPTIONS = ('Acquire::Check-Valid-Until "false"', 'Acquire::Check-Date "false"')
REPO = Path(__file__).resolve().parents[2]
# Host files that make the registries reachable from inside the root, copied when present.
NETWORK_FILES = ("/etc/resolv.conf", "/etc/hosts", "/etc/pip.conf", "/etc/xdg/pip")
CA_DIR = "/usr/local/share/ca-certificates"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def missing_tools() -> list[str]:
    """What this machine lacks to build and enter a root (empty when all is there)."""
    missing = [tool for tool in ("mmdebstrap", "unshare", "chroot", "tar")
               if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root")
    return missing


def build_tarball(dest: Path, include: Iterable[str] = (), variant: str = "minbase",
                  log: Path | None = None) -> Path:
    """mmdebstrap a Debian 12 root into the tarball `dest` (apt sources: deb.debian.org's
    bookworm, bookworm-updates and bookworm-security, as Debian's own images have)."""
    cmd = ["mmdebstrap", f"--variant={variant}", *(f"--aptopt={o}" for o in APT_OPTIONS)]
    include = list(include)
    if include:
        cmd.append("--include=" + ",".join(include))
    cmd += [SUITE, str(dest)]
    with open(log or dest.with_suffix(".log"), "wb") as out:
        subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT, timeout=1200)
    return dest


def extract(tarball: Path, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-xpf", str(tarball)], check=True)
    return root


def copy_host_network(root: Path) -> None:
    """Give the root the host's resolver, CA certificates (the root's update-ca-certificates
    picks up /usr/local/share/ca-certificates when ca-certificates is installed) and pip's
    configuration."""
    for name in NETWORK_FILES:
        src = Path(name)
        dst = root / name.lstrip("/")
        if not src.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.is_file():
            dst.unlink()
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copyfile(src, dst)
    if Path(CA_DIR).is_dir():
        shutil.copytree(CA_DIR, root / CA_DIR.lstrip("/"), dirs_exist_ok=True)
    if Path(CA_BUNDLE).is_file():  # until the root's own ca-certificates regenerates it
        bundle = root / CA_BUNDLE.lstrip("/")
        bundle.parent.mkdir(parents=True, exist_ok=True)
        if not bundle.exists():
            shutil.copyfile(CA_BUNDLE, bundle)


def checkout_files(repo: Path = REPO) -> list[str]:
    """The repository's files as a fresh clone plus the working tree's changes would have them:
    tracked and untracked, minus what .gitignore excludes (virtualenvs, caches, builds)."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], check=True, capture_output=True).stdout
    return [f for f in out.decode().split("\0") if f and (repo / f).exists()]


def copy_checkout(dest: Path, repo: Path = REPO) -> Path:
    for name in checkout_files(repo):
        src, dst = repo / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)
    return dest


def root_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment for the root: a stock PATH and locale, plus the host's PIP_*."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb",
           "DEBIAN_FRONTEND": "noninteractive"}
    env.update({k: v for k, v in os.environ.items() if k.startswith("PIP_")})
    env.update(extra or {})
    return env


def run_in_root(root: Path, script: str, env: Mapping[str, str] | None = None,
                timeout: float = 1800, log: Path | None = None
                ) -> subprocess.CompletedProcess[str]:
    """Run a bash script as root inside `root`; returns its status and its output (stdout and
    stderr together, also written to `log` if given)."""
    r = shlex.quote(str(root))
    setup = f"""set -e
mount --make-rprivate /
mount -t proc proc {r}/proc
mount -t sysfs sysfs {r}/sys
mount -t tmpfs -o mode=755 tmpfs {r}/dev
for node in "null 1 3" "zero 1 5" "full 1 7" "random 1 8" "urandom 1 9" "tty 5 0" "fuse 10 229"
do set -- $node; mknod -m 666 {r}/dev/$1 c $2 $3; done
mkdir {r}/dev/pts {r}/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts {r}/dev/pts
ln -s pts/ptmx {r}/dev/ptmx
mount -t tmpfs -o mode=1777 tmpfs {r}/dev/shm
ln -s /proc/self/fd {r}/dev/fd
ln -s /proc/self/fd/0 {r}/dev/stdin
ln -s /proc/self/fd/1 {r}/dev/stdout
ln -s /proc/self/fd/2 {r}/dev/stderr
mount -t tmpfs tmpfs {r}/run
mount -t tmpfs tmpfs {r}/tmp
exec chroot {r} /bin/bash -c {shlex.quote(script)}
"""
    cmd = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "/bin/sh", "-c", setup]
    result = subprocess.run(cmd, env=root_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            timeout=timeout, check=False)
    if log is not None:
        log.write_text(result.stdout)
    return result
