"""The systemd units: `systemd-analyze verify` accepts them, and the daemon runs under
socket activation (the listening socket from LISTEN_FDS, as bpffsd.socket hands it over)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bpffs.client import Client
from bpffs.vm.uapi import MapType

UNITS = Path(__file__).parents[2] / "systemd"


SYSTEM_UNITS = Path("/lib/systemd/system")
# Settings that give a service a mount namespace of its own (systemd.exec(5); each checked under
# systemd 252 with `systemd-run -p SETTING readlink /proc/self/ns/mnt`): any of them would hide
# bpffsd's FUSE mounts from the host.
PRIVATE_MOUNT_NAMESPACE = (
    "ProtectSystem", "ProtectHome", "ProtectKernelTunables", "ProtectKernelModules",
    "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc", "ProcSubset", "PrivateTmp",
    "PrivateDevices", "PrivateIPC", "PrivateMounts", "MountAPIVFS", "ReadWritePaths",
    "ReadOnlyPaths", "InaccessiblePaths", "ExecPaths", "NoExecPaths", "BindPaths",
    "BindReadOnlyPaths", "TemporaryFileSystem", "RootDirectory", "RootImage",
    "LogNamespace", "DynamicUser", "MountFlags", "NetworkNamespacePath")


def unit_settings(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def verify(*args: str) -> subprocess.CompletedProcess:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    return subprocess.run([analyze, "verify", *args], capture_output=True, text=True,
                          timeout=120)


def test_the_units_verify_as_shipped(tmp_path: Path) -> None:
    """No sed first: ExecStart names /usr/local/bin/bpffsd, where install.sh links it. Checked
    in a root holding this host's systemd units and an executable at that path, then without
    it (the message the unchanged unit gave when bpffsd was installed elsewhere)."""
    if not SYSTEM_UNITS.is_dir():
        pytest.skip(f"{SYSTEM_UNITS} is missing (systemd is not installed)")
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for name in ("bpffsd.service", "bpffsd.socket"):
        shutil.copy(UNITS / name, units / name)
    daemon = root / "usr/local/bin/bpffsd"
    daemon.parent.mkdir(parents=True)
    daemon.write_text("#!/bin/sh\n")
    daemon.chmod(0o755)
    shipped = ["/etc/systemd/system/bpffsd.service", "/etc/systemd/system/bpffsd.socket"]
    result = verify(f"--root={root}", *shipped)
    assert result.returncode == 0, result.stderr
    daemon.unlink()
    result = verify(f"--root={root}", *shipped)
    assert "/usr/local/bin/bpffsd is not executable" in result.stderr
    if os.access("/usr/local/bin/bpffsd", os.X_OK):  # install.sh ran on this machine
        result = verify(str(UNITS / "bpffsd.service"), str(UNITS / "bpffsd.socket"))
        assert result.returncode == 0, result.stderr


def test_the_service_keeps_the_hosts_mount_namespace() -> None:
    """Its FUSE mounts must be the host's: no setting that privatises the mount namespace."""
    settings = unit_settings("bpffsd.service")
    assert not set(settings) & set(PRIVATE_MOUNT_NAMESPACE), settings
    assert settings["NoNewPrivileges"] == ["yes"]  # the hardening that does not need one stays
    assert settings["RestrictNamespaces"] == ["mnt"]  # setns into containers' mount namespaces
    assert settings["KillMode"] == ["mixed"]  # SIGTERM to bpffsd, which stops its workers


def test_the_service_runs_next_to_the_kernels_bpffs() -> None:
    """systemd mounts the kernel's bpffs at /sys/fs/bpf at boot: the service neither skips
    itself because of it nor mounts over it; the mountpoint is configurable."""
    settings = unit_settings("bpffsd.service")
    assert not any(key.startswith("Condition") for key in settings), settings
    assert settings["Environment"] == ["BPFFSD_MOUNT=/run/bpffsd/bpf"]
    assert settings["EnvironmentFile"] == ["-/etc/default/bpffsd"]
    [exec_start] = settings["ExecStart"]
    assert exec_start.startswith("/usr/local/bin/bpffsd --mount ${BPFFSD_MOUNT} ")
    assert exec_start.endswith(" $BPFFSD_ARGS")
    assert "/sys/fs/bpf" not in (UNITS / "bpffsd.conf").read_text()
    example = (UNITS / "bpffsd.default").read_text()
    assert "#BPFFSD_MOUNT=/run/bpffsd/bpf" in example and "#BPFFSD_ARGS=" in example


def test_the_tmpfiles_entry_names_the_state_and_runtime_directories() -> None:
    lines = [line.split() for line in (UNITS / "bpffsd.conf").read_text().splitlines()
             if line and not line.startswith("#")]
    assert ["d", "/var/lib/bpffsd", "0700", "root", "root", "-"] in lines
    assert ["d", "/run/bpffsd", "0755", "root", "root", "-"] in lines


def test_socket_activation(tmp_path: Path) -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    sock = tmp_path / "control.sock"
    proc = subprocess.Popen([activate, "--seqpacket", "-l", str(sock), sys.executable, "-m",
                             "bpffs.daemon.main", "--no-mount", "--no-persist", "--socket",
                             str(tmp_path / "unused.sock")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.05)
        with Client(str(sock)) as client:  # the first connection starts the daemon
            fd = client.map_create(MapType.ARRAY, 4, 4, 1)
            assert client.status()["socket"]
            os.close(fd)
        assert not (tmp_path / "unused.sock").exists(), "the daemon bound its own socket"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
