"""The filesystem side's checks on what clients send, and its mount workers' log lines
(red-team review, findings 4 and 5)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from fs_helpers import wait_for

from bpffs.daemon.fs import mount_namespace_of
from bpffs.daemon.fs.worker import RPC_TIMEOUT_ENV

pytestmark = pytest.mark.fuse


def test_only_a_mount_namespace_fd_is_taken_for_one(daemon, tmp_path: Path) -> None:
    """red-team review, finding 4: the mount request ran the nsfs ioctl on whatever fd the
    client sent, on the event loop (an fd on our own FUSE mount could reach it). The fd's
    /proc/self/fd link, which the kernel makes without asking any filesystem, must now read
    mnt:[INO] before anything else is done with it; the inode is taken from it."""
    (tmp_path / "file").write_bytes(b"")
    opened = [os.open("/proc/self/ns/mnt", os.O_RDONLY), os.open("/proc/self/ns/net", os.O_RDONLY),
              os.open(tmp_path / "file", os.O_RDONLY), os.open(daemon.mount, os.O_PATH),
              os.open(daemon.mount, os.O_RDONLY)]
    try:
        assert mount_namespace_of(opened[0]) == os.stat("/proc/self/ns/mnt").st_ino
        assert [mount_namespace_of(fd) for fd in opened[1:]] == [None] * 4
    finally:
        for fd in opened:
            os.close(fd)


def _worker_warning(start_daemon, monkeypatch, root: Path) -> tuple[str, str]:
    """Start a daemon whose mount worker warns once at start; its log and the warning."""
    monkeypatch.setenv(RPC_TIMEOUT_ENV, "soon")  # not a number: the worker says it ignores it
    d = start_daemon(mount=True, root=root)
    line = wait_for(lambda: next((line for line in d.log_text().splitlines()
                                  if f"ignoring {RPC_TIMEOUT_ENV}" in line), None),
                    "the mount worker's warning")
    return d.log_text(), str(line)


def test_mount_worker_log_lines_are_timestamped_like_the_daemons(start_daemon, monkeypatch,
                                                                  tmp_path: Path) -> None:
    """red-team review, finding 5: the mount workers logged "bpffsd worker: message", with no
    time, into the daemon's log (--detach's file). They now use the daemon's format."""
    _log, line = _worker_warning(start_daemon, monkeypatch, tmp_path / "d")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d bpffsd\[\d+\]:"
                        rf" WARNING bpffsd\.worker: ignoring {RPC_TIMEOUT_ENV}=.*", line), line


def test_under_journald_no_log_line_has_a_timestamp(start_daemon, monkeypatch,
                                                    tmp_path: Path) -> None:
    """red-team review, finding 5: when standard error is journald's (JOURNAL_STREAM names
    it), journald stamps the time: the daemon's lines and its workers' carry only the
    priority prefix."""
    root = tmp_path / "d"
    root.mkdir()
    log = root / "bpffsd.log"  # DaemonProcess appends the daemon's stderr here
    log.write_bytes(b"")
    st = log.stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    text, line = _worker_warning(start_daemon, monkeypatch, root)
    assert line.startswith(f"<4>WARNING bpffsd.worker: ignoring {RPC_TIMEOUT_ENV}="), line
    assert all(re.match(r"<\d>", entry) for entry in text.splitlines()), text
