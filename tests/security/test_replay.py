"""Issue 13, finding 3: acknowledged pins must survive kill -9 whatever the journal went through.

The replay used to charge every map the journal ever created against --memory-limit, freed
ones included, so a replacement map failed with ENOMEM, its pin was dropped and the start-up
compaction made the loss permanent. These tests run real daemons (subprocesses with FUSE
mounts), kill them with SIGKILL and restart them on the same state directory.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import DaemonProcess, raises_errno

from bpffs.client import Client
from bpffs.daemon.persist import records
from bpffs.vm.uapi import MapType

MIB = 1 << 20
KEY = (1).to_bytes(4, "little")


def big_map(c: Client, entries: int, fill: bytes) -> int:
    """A hash map of 4-byte keys and 4 KiB values (about 4 KiB of memlock an entry)."""
    fd = c.map_create(MapType.HASH, 4, 4096, entries, name="big")
    c.map_update_elem(fd, KEY, fill * 4096)
    return fd


def wait_for_no_maps(c: Client) -> None:
    """Closing an fd drops the daemon's reference asynchronously (on HUP)."""
    deadline = time.monotonic() + 10
    while c.status()["objects"].get("map", 0):
        assert time.monotonic() < deadline, "the closed map was never freed"
        time.sleep(0.02)


def kill_and_start(d: DaemonProcess, memory_limit: int, sig: int = signal.SIGKILL
                   ) -> DaemonProcess:
    """Kill the daemon (or stop it with SIGTERM) and start it again on the same state
    directory with this --memory-limit."""
    d.kill(sig)
    d.log.close()
    d.cleanup_mount()
    d.args = ("--memory-limit", str(memory_limit))
    return d.start()


def state_files(d: DaemonProcess) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.state_dir.iterdir())}


@pytest.mark.fuse
def test_a_replacement_of_a_freed_map_survives_sigkill(start_daemon) -> None:
    """Issue 13, finding 3: delete a pinned ~2.8 MiB map, pin a same-size replacement, kill -9
    with --memory-limit 4 MiB: the replacement was lost (the replay charged the freed map
    too). The journal's records free it where the live run did, and the limit is checked on
    what survives the replay."""
    d = start_daemon(mount=True, args=("--memory-limit", str(4 * MIB)))
    with d.client() as c:
        fd = big_map(c, 700, b"a")
        c.obj_pin(fd, str(d.mount / "old"))
        os.close(fd)
        os.unlink(d.mount / "old")
        wait_for_no_maps(c)
        fd = big_map(c, 700, b"b")  # fits live: the old map is gone
        c.obj_pin(fd, str(d.mount / "new"))
        os.close(fd)
    kill_and_start(d, 4 * MIB)
    assert os.listdir(d.mount) == ["new"]
    with d.client() as c:
        fd = c.obj_get(str(d.mount / "new"))
        assert c.map_lookup_elem(fd, KEY) == b"b" * 4096
        persist = c.status()["persistence"]
        assert persist["held"] is None and persist["unplaced"] == []
        assert persist["restored"]["problems"] == []
    kill_and_start(d, 4 * MIB)  # and again, from the compacted snapshot
    assert os.listdir(d.mount) == ["new"]


@pytest.mark.fuse
def test_many_create_free_cycles_restore_the_last_map(start_daemon) -> None:
    """Issue 13, finding 3: ten 2.8 MiB maps pinned and freed in turn under a 4 MiB limit (28
    MiB created in all, as the journal tells it): the last one is restored."""
    d = start_daemon(mount=True, args=("--memory-limit", str(4 * MIB)))
    with d.client() as c:
        for n in range(10):
            fd = big_map(c, 700, bytes([65 + n]))
            c.obj_pin(fd, str(d.mount / "m"))
            os.close(fd)
            if n < 9:
                os.unlink(d.mount / "m")
                wait_for_no_maps(c)
    (journal,) = d.state_dir.glob("journal-*")
    found, _, _ = records.read(journal.read_bytes())
    # each freed map is journaled as freed, so the replay frees it there and then
    assert [r[1] for r in found if r[0] == "free"] == ["map"] * 9
    kill_and_start(d, 4 * MIB)
    with d.client() as c:
        fd = c.obj_get(str(d.mount / "m"))
        assert c.map_lookup_elem(fd, KEY) == b"J" * 4096
        assert c.status()["persistence"]["held"] is None


@pytest.mark.fuse
def test_a_restore_that_cannot_place_a_pin_keeps_the_state_and_says_so(start_daemon) -> None:
    """Issue 13, finding 3: a restore that cannot place an acknowledged object (here: a
    restart with a lower --memory-limit than the state needs) must not compact it away. The
    snapshot and journal stay byte for byte, `bpffs status` names the object and why, this
    run's changes are refused as not durable (EROFS), and a restart with enough memory brings
    everything back."""
    d = start_daemon(mount=True, args=("--memory-limit", str(4 * MIB)))
    with d.client() as c:
        for name, fill in (("first", b"1"), ("second", b"2")):
            fd = big_map(c, 400, fill)
            c.obj_pin(fd, str(d.mount / name))
            os.close(fd)
    d.kill(signal.SIGKILL)  # the state is in the journal
    before = state_files(d)
    assert any(name.startswith("journal-") and data for name, data in before.items())

    d.log.close()
    d.cleanup_mount()
    d.args = ("--memory-limit", str(2 * MIB))
    d.start()
    assert os.listdir(d.mount) == ["first"]  # the newest object did not fit
    with d.client() as c:
        persist = c.status()["persistence"]
        assert persist["held"] and "--memory-limit" in persist["held"]
        (unplaced,) = persist["unplaced"]
        assert unplaced["kind"] == "map" and unplaced["name"] == "big"
        assert unplaced["paths"] == ["instance 'default':/second"]
        assert "--memory-limit allows 512" in unplaced["reason"]
        fd = c.obj_get(str(d.mount / "first"))
        assert c.map_lookup_elem(fd, KEY) == b"1" * 4096
        with raises_errno(errno.EROFS):  # made, but it could not be made durable
            c.map_update_elem(fd, KEY, b"x" * 4096)
    shown = subprocess.run(["bpffs", "status"], env=d.env,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "UNPLACED map 'big'" in shown.stdout and "persistence HELD" in shown.stdout

    d.stop()  # SIGTERM: the shutdown compaction must not touch the held state either
    d.cleanup_mount()
    assert state_files(d) == before

    d.args = ("--memory-limit", str(4 * MIB))
    d.start()
    assert sorted(os.listdir(d.mount)) == ["first", "second"]
    with d.client() as c:
        for name, fill in (("first", b"1"), ("second", b"2")):
            fd = c.obj_get(str(d.mount / name))
            assert c.map_lookup_elem(fd, KEY) == fill * 4096
        persist = c.status()["persistence"]
        assert persist["held"] is None and persist["unplaced"] == []
    assert "could not place map 'big'" in d.log_text()


@pytest.mark.fuse
def test_a_record_that_fails_to_replay_holds_the_state(start_daemon, tmp_path: Path) -> None:
    """Issue 13, finding 3: any acknowledged record the replay cannot apply (here a program
    whose map record names a map type this daemon refuses) keeps the state directory as it
    is instead of compacting the object away."""
    d = start_daemon(mount=True)
    with d.client() as c:
        fd = c.map_create(MapType.HASH, 4, 4, 4, name="kept")
        c.obj_pin(fd, str(d.mount / "kept"))
        os.close(fd)
    d.kill(signal.SIGKILL)
    d.log.close()
    d.cleanup_mount()
    (journal,) = d.state_dir.glob("journal-*")
    found, _, _ = records.read(journal.read_bytes())
    forged = [list(r) for r in found]
    for r in forged:
        if r[0] == "map":
            r[2] = 9999  # no such map type
    journal.write_bytes(b"".join(records.frame(r) for r in forged))
    before = state_files(d)
    d.start()
    with d.client() as c:
        persist = c.status()["persistence"]
        assert persist["held"] and persist["restored"]["problems"]
    d.stop()
    d.cleanup_mount()
    assert state_files(d) == before
