"""Issue 13, finding 6: the state directory is trusted input, so the daemon must trust only a
directory of its own, and never follow a link inside it.

With a state dir owned by uid 65534, root (the daemon) overwrote one 0600 file and truncated
another through symlinks that user planted; a writable state dir would also let a user inject
records, which are replayed with the daemon's privileges. Real daemon subprocesses (root),
real chown to 65534, real symlinks.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import DaemonProcess

from bpffs.vm.uapi import MapType

NOBODY = 65534
SECRET = b"root's secret, mode 0600\n"


def victim(tmp_path: Path, name: str) -> Path:
    """A root-owned 0600 file that must come out of every test unchanged."""
    path = tmp_path / name
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return path


def refused(tmp_path: Path, state_dir: Path) -> str:
    """Start a daemon on state_dir, expect it to refuse, and return its log."""
    d = DaemonProcess(tmp_path / "d", mount=False, args=("--state-dir", str(state_dir)))
    try:
        with pytest.raises(RuntimeError, match="exited with 1"):
            d.start()
    finally:
        d.stop()  # a daemon that did start must not outlive the test
    text = d.log_text()
    assert "Traceback" not in text, text
    assert not d.socket.exists(), "the refusing daemon left its socket"
    return text


def test_a_state_dir_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    """Issue 13, finding 6: a state dir owned by uid 65534, holding symlinks that user planted
    at the names the daemon writes: root used to truncate and overwrite the link targets.
    Now the daemon refuses to start, says whose directory it is and what to do, and writes
    nothing anywhere."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    targets = {name: victim(tmp_path, f"victim-{name}")
               for name in ("journal-1", "snapshot.tmp", "snapshot", "journal-0")}
    for name, target in targets.items():
        os.symlink(target, state / name)
    os.lchown(state, NOBODY, NOBODY)
    for name in targets:
        os.lchown(state / name, NOBODY, NOBODY)
    before = sorted(os.listdir(state))

    log = refused(tmp_path, state)
    assert f"refusing the state directory {state}" in log
    assert f"owned by uid {NOBODY} with mode 0700" in log and "chown 0" in log
    assert sorted(os.listdir(state)) == before
    for target in targets.values():
        assert target.read_bytes() == SECRET


@pytest.mark.parametrize("mode", [0o770, 0o703, 0o1777])
def test_a_state_dir_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    """Issue 13, finding 6: a group- or world-writable state dir (sticky or not) lets another
    user plant records that the daemon would replay with its privileges: refused."""
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    log = refused(tmp_path, state)
    assert f"refusing the state directory {state}" in log
    assert f"with mode {mode:04o}" in log and "not writable by group or others" in log
    assert os.listdir(state) == []


def test_a_state_dir_under_another_users_directory_is_refused(tmp_path: Path) -> None:
    """Issue 13, finding 6: a parent directory owned by uid 65534 lets that user swap the
    state directory for one of their own: refused before any state is written."""
    parent = tmp_path / "theirs"
    parent.mkdir(mode=0o755)
    os.chown(parent, NOBODY, NOBODY)
    log = refused(tmp_path, parent / "state")
    assert f"its parent directory {parent} is owned by uid {NOBODY}" in log
    assert os.listdir(parent) == []


def test_a_state_dir_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    """Issue 13, finding 6: the state dir itself is checked with lstat: a symlink to a
    directory (even a good one) is refused, not followed."""
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    os.symlink(real, tmp_path / "state")
    log = refused(tmp_path, tmp_path / "state")
    assert "it is a symbolic link" in log
    assert os.listdir(real) == []


@pytest.mark.parametrize("name", ["snapshot", "journal-0"])
def test_a_symlinked_state_file_is_not_read_or_written(tmp_path: Path, name: str) -> None:
    """Issue 13, finding 6: a symlink planted as the snapshot or the current journal in a
    good state dir is never followed: the daemon refuses to start and names it; the link
    target is unchanged."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    target = victim(tmp_path, "victim")
    os.symlink(target, state / name)
    log = refused(tmp_path, state)
    assert f"{state / name} is a symbolic link" in log
    assert target.read_bytes() == SECRET
    assert os.path.islink(state / name) and sorted(os.listdir(state)) == [name]


@pytest.mark.fuse
def test_symlinks_at_the_names_compaction_writes_are_replaced(start_daemon,
                                                              tmp_path: Path) -> None:
    """Issue 13, finding 6: symlinks planted at the names a compaction creates (the next
    journal, the snapshot's temporary file) are replaced, never written through; the state
    still persists."""
    root = tmp_path / "d0"
    state = root / "state"
    state.mkdir(parents=True, mode=0o700)
    targets = {name: victim(tmp_path, f"victim-{name}")
               for name in ("journal-1", "snapshot.tmp")}
    for name, target in targets.items():
        os.symlink(target, state / name)
    d = start_daemon(mount=True, root=root)
    with d.client() as c:
        fd = c.map_create(MapType.HASH, 4, 4, 4)
        c.map_update_elem(fd, b"key1", b"val1")
        c.obj_pin(fd, str(d.mount / "m"))
    for target in targets.values():
        assert target.read_bytes() == SECRET
    assert not any(os.path.islink(p) for p in state.iterdir())
    assert d.stop() == 0
    d.cleanup_mount()
    d.start()
    with d.client() as c:
        assert c.map_lookup_elem(c.obj_get(str(d.mount / "m")), b"key1") == b"val1"
    for target in targets.values():
        assert target.read_bytes() == SECRET


def test_a_good_state_dir_is_created_private(tmp_path: Path, start_daemon) -> None:
    """The daemon creates a missing state dir (and its parents) itself: 0700, its own."""
    root = tmp_path / "d0"
    d = start_daemon(root=root)
    st = d.state_dir.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (os.geteuid(), 0o700)
    assert d.stop() == 0


@pytest.mark.parametrize("how", ["owned by 65534", "mode 0666"])
def test_a_state_file_another_user_could_write_is_refused(tmp_path: Path, how: str) -> None:
    """Issue 13, finding 6: a journal another user owns, or may write, could carry records
    they forged (programs are replayed as privileged): refused, named, left as it is."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    journal = state / "journal-0"
    journal.write_bytes(b"")
    if how == "mode 0666":
        journal.chmod(0o666)
    else:
        os.chown(journal, NOBODY, NOBODY)
    log = refused(tmp_path, state)
    assert f"{journal} is a regular file" in log and "chmod go-w" in log
    assert sorted(os.listdir(state)) == ["journal-0"] and journal.read_bytes() == b""
