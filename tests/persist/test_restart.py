"""Pins and map contents survive daemon restarts and crashes (SIGKILL): the tree with its
modes, owners, symlinks and hard links; maps with their contents; programs with their maps;
prog_array slots. Objects held only by fds do not persist, as in the kernel."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from helpers import DaemonProcess, raises_errno

from bpffs.vm import asm
from bpffs.vm.isa import R0, R1, R2, R3, R4, R10
from bpffs.vm.uapi import BPF_ANY, Helper, MapType, ProgType

FRAME = bytes(12) + b"\x08\x00" + bytes(46)
KEY = (1).to_bytes(4, "little")


def restart(d: DaemonProcess, sig: int | None = signal.SIGKILL) -> DaemonProcess:
    """Kill (or stop) the daemon and start it again on the same state directory."""
    if sig is None:
        assert d.stop() == 0
    else:
        d.kill(sig)
        d.log.close()
    d.cleanup_mount()
    for _ in range(100):
        if not d.mount or not os.path.ismount(d.mount):
            break
        time.sleep(0.05)
    return d.start()


def counter_program(map_fd: int) -> bytes:
    """Adds 1 to the value of key 1 (creating it): a program writing a map."""
    return asm.program(
        asm.st(4, R10, -4, 1), asm.mov64_reg(R2, R10), asm.add64_imm(R2, -4),
        asm.ld_map_fd(R1, map_fd), asm.call(Helper.map_lookup_elem),
        asm.jmp_imm(0x50, R0, 0, 11),  # JNE: found
        asm.st(8, R10, -16, 1), asm.mov64_reg(R2, R10), asm.add64_imm(R2, -4),
        asm.mov64_reg(R3, R10), asm.add64_imm(R3, -16), asm.ld_map_fd(R1, map_fd),
        asm.mov64_imm(R4, BPF_ANY), asm.call(Helper.map_update_elem),
        asm.mov64_imm(R0, 0), asm.exit(),
        asm.mov64_imm(R1, 1), asm.atomic(8, 0, R0, R1, 0), asm.mov64_imm(R0, 0), asm.exit())


@pytest.mark.fuse
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_tree_maps_and_programs_survive_a_restart(start_daemon, how: str) -> None:
    d = start_daemon(mount=True)
    b = d.mount
    with d.client() as c:
        (b / "dir").mkdir(mode=0o750)
        (b / "dir" / "sub").mkdir()
        m = c.map_create(MapType.HASH, 4, 8, 16, name="counts")
        c.map_update_elem(m, KEY, (41).to_bytes(8, "little"))
        c.obj_pin(m, str(b / "dir" / "counts"))
        arr = c.map_create(MapType.ARRAY, 4, 4, 4)
        c.map_update_elem(arr, (2).to_bytes(4, "little"), b"abcd")
        c.obj_pin(arr, str(b / "arr"))
        prog = c.prog_load(ProgType.SCHED_CLS, counter_program(m), name="count")
        c.obj_pin(prog, str(b / "dir" / "prog"))
        jumps = c.map_create(MapType.PROG_ARRAY, 4, 4, 2)
        c.map_update_elem(jumps, bytes(4), prog.to_bytes(4, "little"))
        c.obj_pin(jumps, str(b / "jumps"))
        unpinned = c.map_create(MapType.HASH, 4, 4, 4)
        for fd in (m, arr, prog, jumps):
            os.close(fd)
    os.symlink("dir/counts", b / "link")
    os.link(b / "dir" / "counts", b / "hard")
    os.chmod(b / "arr", 0o640)
    os.chown(b / "arr", 1000, 1001)
    os.rename(b / "dir" / "sub", b / "moved")

    restart(d, signal.SIGKILL if how == "SIGKILL" else None)
    with d.client() as c:
        assert sorted(os.listdir(b)) == ["arr", "dir", "hard", "jumps", "link", "moved"]
        assert sorted(os.listdir(b / "dir")) == ["counts", "prog"]
        assert stat.S_IMODE(os.stat(b / "dir").st_mode) == 0o750
        st = os.stat(b / "arr")
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1000, 1001)
        assert os.readlink(b / "link") == "dir/counts"
        assert os.stat(b / "hard").st_nlink == 2
        assert os.stat(b / "hard").st_ino == os.stat(b / "dir" / "counts").st_ino
        m = c.obj_get(str(b / "link"))
        assert c.map_lookup_elem(m, KEY) == (41).to_bytes(8, "little")
        assert c.obj_get_info_by_fd(m)["name"] == "counts"
        arr = c.obj_get(str(b / "arr"))
        assert c.map_lookup_elem(arr, (2).to_bytes(4, "little")) == b"abcd"
        prog = c.obj_get(str(b / "dir" / "prog"))
        assert c.obj_get_info_by_fd(prog)["name"] == "count"
        c.prog_test_run(prog, FRAME)  # still writes the restored map
        assert c.map_lookup_elem(m, KEY) == (42).to_bytes(8, "little")
        jumps = c.obj_get(str(b / "jumps"))
        assert c.obj_get_info_by_fd(jumps)["entries"] == 1
        assert c.get_next_id("map", 0) > 0
        with raises_errno(errno.EBADF):  # an fd of the previous daemon
            c.map_lookup_elem(unpinned, KEY)
        maps = []
        next_id = 0
        while True:
            try:
                next_id = c.get_next_id("map", next_id)
            except OSError:
                break
            maps.append(next_id)
        assert len(maps) == 3  # counts, arr, jumps: the unpinned map did not persist


@pytest.mark.fuse
def test_an_acknowledged_update_survives_sigkill(start_daemon) -> None:
    d = start_daemon(mount=True)
    with d.client() as c:
        m = c.map_create(MapType.ARRAY, 4, 8, 64)
        c.obj_pin(m, str(d.mount / "a"))
        for n in range(64):
            c.map_update_elem(m, n.to_bytes(4, "little"), (n * 3).to_bytes(8, "little"))
    restart(d)
    with d.client() as c:
        m = c.obj_get(str(d.mount / "a"))
        assert [int.from_bytes(c.map_lookup_elem(m, n.to_bytes(4, "little")), "little")
                for n in range(64)] == [n * 3 for n in range(64)]


@pytest.mark.fuse
def test_program_writes_persist_within_the_interval(start_daemon) -> None:
    d = start_daemon(mount=True)
    with d.client() as c:
        m = c.map_create(MapType.HASH, 4, 8, 4)
        c.obj_pin(m, str(d.mount / "m"))
        prog = c.prog_load(ProgType.SCHED_CLS, counter_program(m))
        for _ in range(5):
            c.prog_test_run(prog, FRAME)
    time.sleep(0.5)  # default interval: 100 ms
    restart(d)
    with d.client() as c:
        m = c.obj_get(str(d.mount / "m"))
        assert c.map_lookup_elem(m, KEY) == (5).to_bytes(8, "little")


def _journal(d: DaemonProcess) -> Path:
    (journal,) = d.state_dir.glob("journal-*")
    return journal


@pytest.mark.fuse
def test_a_torn_journal_tail_is_dropped(start_daemon) -> None:
    d = start_daemon(mount=True)
    with d.client() as c:
        m = c.map_create(MapType.HASH, 4, 4, 4)
        c.obj_pin(m, str(d.mount / "m"))
        c.map_update_elem(m, KEY, b"good")
    d.kill()
    d.log.close()
    with open(_journal(d), "ab") as f:
        f.write(b"\x40\x00\x00\x00\x12\x34")  # a record header cut short by the crash
    restart_after_kill(d)
    with d.client() as c:
        m = c.obj_get(str(d.mount / "m"))
        assert c.map_lookup_elem(m, KEY) == b"good"
        restored = c.status()["persistence"]["restored"]
        assert "torn record" in " ".join(restored["truncated"])


@pytest.mark.fuse
def test_a_corrupt_record_stops_the_replay_there(start_daemon) -> None:
    d = start_daemon(mount=True)
    with d.client() as c:
        m = c.map_create(MapType.HASH, 4, 4, 4)
        c.obj_pin(m, str(d.mount / "m"))
        c.map_update_elem(m, KEY, b"one!")
        size = _journal(d).stat().st_size
        c.map_update_elem(m, KEY, b"two!")
        c.map_update_elem(m, (2).to_bytes(4, "little"), b"more")
    d.kill()
    d.log.close()
    with open(_journal(d), "r+b") as f:  # flip a byte in the body of the second update
        f.seek(size + 12)
        byte = f.read(1)
        f.seek(size + 12)
        f.write(bytes([byte[0] ^ 0xFF]))
    restart_after_kill(d)
    with d.client() as c:
        m = c.obj_get(str(d.mount / "m"))
        assert c.map_lookup_elem(m, KEY) == b"one!"
        with raises_errno(errno.ENOENT):
            c.map_lookup_elem(m, (2).to_bytes(4, "little"))
        assert "checksum mismatch" in " ".join(c.status()["persistence"]["restored"]
                                               ["truncated"])


def restart_after_kill(d: DaemonProcess) -> DaemonProcess:
    d.cleanup_mount()
    return d.start()


@pytest.mark.fuse
def test_a_full_state_disk_fails_updates_clearly_and_keeps_what_was_acknowledged(
        tmp_path) -> None:
    state = tmp_path / "tiny"
    state.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(state)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    d = DaemonProcess(tmp_path / "d", mount=True, args=("--state-dir", str(state / "s")))
    acknowledged = []
    try:
        d.start()
        with d.client() as c:
            m = c.map_create(MapType.HASH, 4, 1024, 512)
            c.obj_pin(m, str(d.mount / "m"))
            with raises_errno(errno.ENOSPC):
                for n in range(1, 200):
                    c.map_update_elem(m, n.to_bytes(4, "little"), bytes([n]) * 1024)
                    acknowledged.append(n)
            assert "No space left" in c.status()["persistence"]["journal_failure"]
            assert acknowledged, "the disk filled before the first update"
        d.kill()
        d.log.close()
        d.cleanup_mount()
        subprocess.run(["mount", "-o", "remount,size=4m", str(state)], check=True)
        d.start()
        with d.client() as c:
            m = c.obj_get(str(d.mount / "m"))
            for n in acknowledged:
                assert c.map_lookup_elem(m, n.to_bytes(4, "little")) == bytes([n]) * 1024
    finally:
        d.stop()
        d.cleanup_mount()
        subprocess.run(["umount", "-l", str(state)], check=False)


@pytest.mark.fuse
def test_an_object_unpinned_and_pinned_again_while_held_by_an_fd_survives(start_daemon) -> None:
    """The journal names objects by id: one unpinned while an fd holds it is not freed (no
    "free" record), so pinning it again (and writing it in between) replays onto the same
    object; one closed and freed is gone for the replay too."""
    d = start_daemon(mount=True)
    with d.client() as c:
        m = c.map_create(MapType.HASH, 4, 4, 4)
        c.obj_pin(m, str(d.mount / "a"))
        os.unlink(d.mount / "a")
        c.map_update_elem(m, KEY, b"kept")
        c.obj_pin(m, str(d.mount / "b"))
        gone = c.map_create(MapType.HASH, 4, 4, 4)
        c.obj_pin(gone, str(d.mount / "gone"))
        os.close(gone)
        os.unlink(d.mount / "gone")
    restart(d)
    assert os.listdir(d.mount) == ["b"]
    with d.client() as c:
        assert c.map_lookup_elem(c.obj_get(str(d.mount / "b")), KEY) == b"kept"
        persist = c.status()["persistence"]
        assert persist["held"] is None and persist["restored"]["problems"] == []
