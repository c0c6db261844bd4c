"""Compactions while serving (the snapshot written in a thread, the next generation's journal
acknowledged once it is in place): a failed one keeps every acknowledged change and is
retried. Kills during compactions: tests/security/test_persist_stalls.py."""

from __future__ import annotations

import errno
import subprocess
import time

import pytest
from helpers import DaemonProcess

from bpffs.vm.uapi import MapType


def key(n: int) -> bytes:
    return n.to_bytes(4, "little")


@pytest.mark.fuse
def test_a_failed_compaction_loses_nothing_acknowledged_and_is_retried(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state directory on a 512 KiB tmpfs, compactions every 64 KiB of journal: the disk
    fills while compacting. Updates then fail (ENOSPC: live, not durable); once there is room
    again the compaction is retried and updates are acknowledged; after a kill -9 every
    acknowledged update is there."""
    state = tmp_path / "tiny"
    state.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(state)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    monkeypatch.setenv("BPFFSD_COMPACT_BYTES", str(64 << 10))
    d = DaemonProcess(tmp_path / "d", mount=True, args=("--state-dir", str(state / "s")))
    acknowledged: dict[int, bytes] = {}
    failed = 0
    try:
        d.start()
        with d.client() as c:
            m = c.map_create(MapType.HASH, 4, 1024, 1024)
            c.obj_pin(m, str(d.mount / "m"))
            for n in range(1, 700):
                value = bytes([n % 251]) * 1024
                try:
                    c.map_update_elem(m, key(n % 600), value)
                    acknowledged[n % 600] = value
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    acknowledged.pop(n % 600, None)  # live, maybe durable: unknown
                    failed += 1
                    if failed > 20:
                        break
                    # A refusal is immediate (each request's own write fails): back off, so
                    # that compactions (due every persist interval) meet the full disk too.
                    time.sleep(0.05)
            assert failed, "the disk never filled"
            subprocess.run(["mount", "-o", "remount,size=16m", str(state)], check=True)
            deadline = time.monotonic() + 30
            while True:  # the journal and the compaction retry: acknowledged again
                try:
                    c.map_update_elem(m, key(1000 % 600), b"x" * 1024)
                    acknowledged[1000 % 600] = b"x" * 1024
                    break
                except OSError as e:
                    assert e.errno == errno.ENOSPC and time.monotonic() < deadline, e
                    time.sleep(0.2)
            persist = c.status()["persistence"]
            assert persist["journal_failure"] is None
        failures = d.log_text().count("compaction into")
        print(f"\n{failed} updates refused, {failures} compactions failed, then generation"
              f" {persist['generation']}")
        assert failures  # one did fail
        d.kill()
        d.log.close()
        d.cleanup_mount()
        d.start()
        with d.client() as c:
            m = c.obj_get(str(d.mount / "m"))
            for k, value in acknowledged.items():
                assert c.map_lookup_elem(m, key(k)) == value, k
    finally:
        d.stop()
        d.cleanup_mount()
        subprocess.run(["umount", "-l", str(state)], check=False)
