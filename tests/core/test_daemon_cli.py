"""`bpffsd` as a user starts it: where it mounts by default (never over the kernel's own bpffs),
what it says when it cannot start (one line, never a traceback), where --detach sends its
output, and what its log lines look like (timestamped; not under journald, which stamps them)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpffs import paths

DAEMON = [sys.executable, "-m", "bpffs.daemon.main"]
STAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d bpffsd\[\d+\]: "
                     r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
RUNNING = re.compile(r"^bpffsd: running \(pid (\d+)\)")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


def env(**extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("BPFFS_SOCKET", "JOURNAL_STREAM", "NOTIFY_SOCKET", "LISTEN_PID",
                          "LISTEN_FDS")}
    return {**clean, **extra}


def bpffsd(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DAEMON, *args], capture_output=True, text=True, timeout=timeout,
                          env=kw.pop("env", env()), **kw)


def stop(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and _state(pid) != "Z":
        assert time.monotonic() < deadline, f"bpffsd {pid} did not stop"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.fixture
def detached(tmp_path: Path) -> Iterator[list[int]]:
    """Pids of daemons a test started with --detach, stopped after it."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if os.path.exists(f"/proc/{pid}"):
            stop(pid)


def start_detached(pids: list[int], *args: str) -> tuple[int, subprocess.CompletedProcess]:
    result = bpffsd("--detach", *args, timeout=60)
    assert result.returncode == 0, result.stderr
    match = RUNNING.match(result.stdout)
    assert match, result.stdout
    pids.append(int(match.group(1)))
    return pids[-1], result


# -- the default mount never hides a kernel bpffs ------------------------------------------------
@needs_root
def test_kernel_bpffs_at_reads_the_filesystem_on_top(kernel_bpffs: Path, tmp_path: Path) -> None:
    assert paths.kernel_bpffs_at(str(kernel_bpffs))
    assert paths.default_mount(str(kernel_bpffs)) == paths.SYSTEM_ALT_MOUNT  # root
    plain = tmp_path / "plain"
    plain.mkdir()
    assert not paths.kernel_bpffs_at(str(plain))
    assert paths.default_mount(str(plain)) == str(plain)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(kernel_bpffs)], check=True)
    try:  # covered by another filesystem: what is there now is not a kernel bpffs
        assert not paths.kernel_bpffs_at(str(kernel_bpffs))
    finally:
        subprocess.run(["umount", str(kernel_bpffs)], check=True)
    assert paths.kernel_bpffs_at(str(kernel_bpffs) + "/")


@needs_root
def test_an_explicit_mount_over_a_kernel_bpffs_is_refused(kernel_bpffs: Path,
                                                           tmp_path: Path) -> None:
    result = bpffsd("--mount", str(kernel_bpffs), "--no-persist", "--socket",
                    str(tmp_path / "c.sock"))
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"bpffsd: {kernel_bpffs} is a kernel bpffs mount")
    assert "--shadow-kernel-bpffs" in line and paths.SYSTEM_ALT_MOUNT in line
    assert paths.kernel_bpffs_at(str(kernel_bpffs))


@needs_root
@pytest.mark.fuse
def test_shadow_kernel_bpffs_covers_it_when_asked(kernel_bpffs: Path, tmp_path: Path,
                                                  detached: list[int]) -> None:
    pid, _ = start_detached(detached, "--mount", str(kernel_bpffs), "--shadow-kernel-bpffs",
                            "--no-persist", "--socket", str(tmp_path / "c.sock"))
    assert not paths.kernel_bpffs_at(str(kernel_bpffs))  # ours is on top
    stop(pid)
    assert paths.kernel_bpffs_at(str(kernel_bpffs)), "the kernel's is back once bpffsd stops"


DEFAULT_MOUNT_SCRIPT = r"""set -e
mount --make-rprivate /
mount -t tmpfs tmpfs /run
while grep -q ' /sys/fs/bpf ' /proc/self/mountinfo; do umount /sys/fs/bpf; done
if [ "$1" = host ]; then mount -t bpf bpf /sys/fs/bpf; fi
out=$("$2" -m bpffs.daemon.main --detach --no-persist)
echo "$out"
grep ' fuse.bpffsd ' /proc/self/mountinfo | cut -d' ' -f5 | sed 's/^/fuse at /'
grep ' - bpf ' /proc/self/mountinfo | cut -d' ' -f5 | sed 's/^/bpf at /'
pid=$(echo "$out" | sed -n 's/^bpffsd: running (pid \([0-9]*\)).*/\1/p')
kill "$pid"
while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
grep ' fuse.bpffsd ' /proc/self/mountinfo | cut -d' ' -f5 | sed 's/^/left at /' || true
"""


@needs_root
@pytest.mark.fuse
@pytest.mark.parametrize("where, mount", [("host", paths.SYSTEM_ALT_MOUNT),
                                          ("container", paths.SYSTEM_MOUNT)])
def test_the_default_mount(where: str, mount: str) -> None:
    """Root's `bpffsd --detach` with no options, in a private mount namespace standing in for a
    systemd host (the kernel's bpffs at /sys/fs/bpf) or a container (nothing there)."""
    result = subprocess.run(["unshare", "--mount", "--pid", "--fork", "--mount-proc",
                             "--kill-child", "/bin/sh", "-c", DEFAULT_MOUNT_SCRIPT, "sh", where,
                             sys.executable], capture_output=True, text=True, timeout=120,
                            env=env())
    if result.returncode and "unshare failed" in result.stderr:
        pytest.skip(f"unshare: {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout.splitlines()
    assert RUNNING.match(out[0]) and f"mounted at {mount};" in out[0], out
    assert f"fuse at {mount}" in out and f"left at {mount}" not in out, out
    if where == "host":
        assert "bpf at /sys/fs/bpf" in out, out  # still there, still on top
        assert f"mounting at {mount} instead" in result.stderr  # said where, and why
    else:
        assert "bpf at /sys/fs/bpf" not in out
    assert "Traceback" not in result.stderr


# -- start-up failures: one line each ------------------------------------------------------------
def test_a_second_daemon_names_the_first(tmp_path: Path, detached: list[int]) -> None:
    sock = str(tmp_path / "c.sock")
    pid, _ = start_detached(detached, "--no-mount", "--no-persist", "--socket", sock)
    for detach in (["--detach"], []):
        result = bpffsd(*detach, "--no-mount", "--no-persist", "--socket", sock)
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"bpffsd: a bpffsd already serves {sock} (pid {pid})"], result.stderr
        assert result.stdout == ""


def _cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    a_file = tmp / "a-file"
    a_file.write_text("")
    sock = ["--socket", str(tmp / "c.sock")]
    long_sock = str(tmp / ("x" * 120) / "c.sock")
    return {
        "state dir is a file": (["--no-mount", *sock, "--state-dir", str(a_file)],
                                f"refusing the state directory {a_file}: it is not a"
                                " directory"),
        "mountpoint is a file": (["--no-persist", *sock, "--mount", str(a_file)],
                                 f"cannot mount at {a_file}: it exists and is not a directory"),
        "socket directory is a file": (["--no-mount", "--no-persist", "--socket",
                                        f"{a_file}/c.sock"],
                                       f"cannot create the control socket in {a_file}"),
        "socket path too long": (["--no-mount", "--no-persist", "--socket", long_sock],
                                 "is too long for a Unix socket"),
        "log file in a file": (["--no-mount", "--no-persist", *sock, "--log-file",
                                f"{a_file}/log"], f"cannot open the log file {a_file}/log"),
    }


@pytest.mark.parametrize("case", ["state dir is a file", "mountpoint is a file",
                                  "socket directory is a file", "socket path too long",
                                  "log file in a file"])
@pytest.mark.parametrize("detach", [False, True])
def test_start_up_failures_say_one_line(tmp_path: Path, case: str, detach: bool) -> None:
    args, expected = _cases(tmp_path)[case]
    result = bpffsd(*(["--detach"] if detach else []), *args)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bpffsd: "), result.stderr
    assert expected in lines[0], lines[0]


# -- --detach and the log ------------------------------------------------------------------------
def test_detach_lets_go_of_the_terminal(tmp_path: Path, detached: list[int]) -> None:
    """The parent returns once the daemon serves, and the daemon keeps none of its output
    pipes (subprocess.run would wait for them): its stdout and stderr are the log file,
    bpffsd.log beside the socket, which the parent names."""
    sock = tmp_path / "run" / "c.sock"
    log = tmp_path / "run" / "bpffsd.log"
    pid, result = start_detached(detached, "-v", "--no-mount", "--no-persist", "--socket",
                                 str(sock))
    assert result.stdout.splitlines() == [
        f"bpffsd: running (pid {pid}); socket {sock}, no mount; log {log}"]
    assert result.stderr == ""
    assert os.readlink(f"/proc/{pid}/fd/1") == os.readlink(f"/proc/{pid}/fd/2") == str(log)
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    stop(pid)
    lines = log.read_text().splitlines()
    assert any(f"ready on {sock}" in line for line in lines), lines
    assert any("SIGTERM: shutting down" in line for line in lines), lines
    assert all(STAMPED.match(line) for line in lines), lines


def run_foreground(tmp_path: Path, journal: str | None) -> list[str]:
    """A daemon in the foreground with -v, its stderr a file; JOURNAL_STREAM as given (a
    stream's device:inode, or None for none)."""
    sock = tmp_path / "f.sock"
    out = tmp_path / "stderr.log"
    with open(out, "wb") as stderr:
        st = os.fstat(stderr.fileno())
        stream = f"{st.st_dev}:{st.st_ino}" if journal == "this" else journal
        extra = {"JOURNAL_STREAM": stream} if stream else {}
        proc = subprocess.Popen([*DAEMON, "-v", "--no-mount", "--no-persist", "--socket",
                                 str(sock)], stdout=subprocess.DEVNULL, stderr=stderr,
                                env=env(**extra))
    try:
        deadline = time.monotonic() + 30
        while "ready on" not in out.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    return out.read_text().splitlines()


def test_log_lines_start_with_a_timestamp(tmp_path: Path) -> None:
    lines = run_foreground(tmp_path, None)
    assert lines and all(STAMPED.match(line) for line in lines), lines
    stamp = lines[0].split()[0]
    assert abs(time.time() - time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))) < 120


def test_under_journald_lines_carry_a_priority_and_no_timestamp(tmp_path: Path) -> None:
    lines = run_foreground(tmp_path, "this")
    assert any(line.startswith("<6>INFO bpffs.daemon.daemon: bpffsd ") for line in lines), lines
    assert not any(STAMPED.match(line.lstrip("<0123456789>")) for line in lines), lines


def test_journal_stream_of_another_stream_keeps_timestamps(tmp_path: Path) -> None:
    """JOURNAL_STREAM inherited by a process whose stderr goes elsewhere is not the journal."""
    lines = run_foreground(tmp_path, "1:2")
    assert lines and all(STAMPED.match(line) for line in lines), lines


def test_the_help_names_the_defaults_and_the_new_options() -> None:
    result = bpffsd("--help")
    assert paths.SYSTEM_ALT_MOUNT in result.stdout and "--shadow-kernel-bpffs" in result.stdout
    assert "--log-file" in result.stdout


def test_failures_inside_the_daemon_are_explained_in_one_line(caplog) -> None:
    """trio (0.25 on) wraps errors in ExceptionGroups: the expected ones (OSError, BpfError)
    become their message; anything else is a bug, logged with its traceback."""
    import errno

    from bpffs.daemon.main import explain
    from bpffs.vm.errors import BpfError

    refused = BpfError(errno.EACCES, "cannot mount /x: Permission denied")
    nested = BaseExceptionGroup("outer", [ExceptionGroup("inner", [refused])])
    assert explain(nested) == "cannot mount /x: Permission denied"
    assert explain(FileNotFoundError(2, "No such file or directory", "/y")) == (
        "/y: No such file or directory")
    assert not caplog.records
    bug = ExceptionGroup("outer", [ValueError("seconds must be non-negative")])
    assert explain(bug) == ("internal error: ValueError: seconds must be non-negative (the log"
                            " has the traceback)")
    [record] = caplog.records
    assert record.exc_info and record.exc_info[1] is bug


def test_negative_intervals_and_limits_are_usage_errors() -> None:
    for option in ("--persist-interval", "--memory-limit"):
        result = bpffsd(option, "-1", "--no-mount", "--no-persist")
        assert result.returncode == 2 and f"argument {option}: -1 is negative" in result.stderr
        assert "Traceback" not in result.stderr


@needs_root
def test_a_mount_that_fails_says_why_without_a_traceback(tmp_path: Path) -> None:
    """No /dev/fuse (a private /dev): the mount worker fails after the daemon started, and
    --detach's parent reports it in one line (libfuse's own line goes to the log)."""
    script = ('mount --make-rprivate / && mount -t tmpfs tmpfs /dev && exec "$@"')
    result = subprocess.run(["unshare", "--mount", "/bin/sh", "-c", script, "sh", *DAEMON,
                             "--detach", "--no-persist", "--socket", str(tmp_path / "c.sock"),
                             "--mount", str(tmp_path / "m")], capture_output=True, text=True,
                            timeout=120, env=env())
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"bpffsd: cannot mount {tmp_path / 'm'}: fuse_session_mount failed"], result.stderr
    log = (tmp_path / "bpffsd.log").read_text()
    assert "Traceback" not in log and "fuse_session_mount failed" in log
