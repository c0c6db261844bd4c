"""Adversarial: what one user can make the filesystem side of the daemon do (red-team review of
issue 13's fixes, findings 1-3).

Attackers run as uid 65534 in a forked child (helpers.in_child) against a real daemon whose
mount root is world-writable (1777, as bpffs's). A probe (a thread of this process, on its own
connection) looks up one map element in a loop while an attack runs; its worst latency must
stay under PROBE_BOUND (the goal is 50 ms; the bound is looser on a shared 2-core machine, and
the figures are printed with -s).
"""

from __future__ import annotations

import errno
import os
import subprocess
import types
from collections.abc import Callable
from pathlib import Path

import pytest
from attack import peak_rss, under_probe
from helpers import NOBODY, in_child

from bpffs.client import Client
from bpffs.daemon.fs import render
from bpffs.daemon.fs.tree import RENAME_EXCHANGE, Caller, NodeQuota, Tree
from bpffs.vm.maps import PerfEventArrayMap
from bpffs.vm.uapi import MapType

# -- finding 1: a read far into a big pin -------------------------------------------------------
FAR_ELEMENTS = 300_000  # ~0.8 s to render whole here; ~4.8 MB of text


def _pin_big_array_and_pread_far(socket_path: str, pin: str) -> bytes:
    with Client(socket_path) as c:
        fd = c.map_create(MapType.ARRAY, 4, 1, FAR_ELEMENTS)
        c.obj_pin(fd, pin)
    f = os.open(pin, os.O_RDONLY)
    try:
        return os.pread(f, 4096, 1 << 40)
    finally:
        os.close(f)


@pytest.mark.fuse
def test_a_read_far_into_a_big_pin_does_not_stall_or_grow_the_daemon(public_root: Path,
                                                                      start_daemon) -> None:
    """red-team review, finding 1: uid 65534 pinned its own 900k-element array in the mount's
    world-writable root and pread() 4 KiB at offset 2**40: PinText.read rendered the whole
    map in one synchronous call (2.5 s with every client waiting; RSS 29 -> 198 MB). A read
    now renders for READ_BUDGET at most and the worker asks again; what lies before the
    offset is dropped as it is rendered. The reader still sees the right bytes (EOF there)."""
    d = start_daemon(mount=True, root=public_root / "d")
    assert d.mount is not None
    pin = str(d.mount / "far")
    before = peak_rss(d)
    got = under_probe(d, lambda: in_child(_pin_big_array_and_pread_far, str(d.socket), pin,
                                          user=NOBODY), f"pread at 2**40 of {FAR_ELEMENTS}")
    grew = peak_rss(d) - before
    print(f"peak RSS grew by {grew >> 20} MiB")
    assert got == b""
    assert grew < 32 << 20, f"the daemon's peak RSS grew by {grew >> 20} MiB"


@pytest.mark.fuse
def test_a_read_at_any_offset_returns_the_texts_bytes_there(public_root: Path,
                                                             start_daemon) -> None:
    """red-team review, finding 1: with the rendering bounded per request, a read at an
    offset (pread, `dd skip=`, `tail -c` on a seekable file) still returns exactly the bytes
    a read from the start finds there, across many requests, forward and back."""
    d = start_daemon(mount=True, root=public_root / "d")
    assert d.mount is not None
    pin = d.mount / "m"
    with d.client() as c:
        fd = c.map_create(MapType.HASH, 4, 8, 50_000)
        keys = [i.to_bytes(4, "little") for i in range(50_000)]
        c.map_update_batch(fd, keys, [k * 2 for k in keys])
        c.obj_pin(fd, str(pin))
    text = pin.read_bytes()
    assert text.count(b"\n") == 50_001
    f = os.open(pin, os.O_RDONLY)
    try:
        for off in (len(text) - 100, 17, len(text) // 2, len(text) - 1, len(text),
                    len(text) + 5, 0, 1 << 40):
            assert os.pread(f, 70_000, off) == text[off:off + 70_000], off
    finally:
        os.close(f)
    tail = subprocess.run(["dd", f"if={pin}", "bs=1000", f"skip={len(text) // 1000 - 1}"],
                          capture_output=True, check=True).stdout
    assert tail == text[(len(text) // 1000 - 1) * 1000:]


# -- finding 2: fd arrays -----------------------------------------------------------------------
def test_an_fd_array_counts_its_live_slots() -> None:
    """red-team review, finding 2: obj_info counted an fd array's entries by walking every
    slot (16-23 ms for 1M empty ones, on the event loop). FdArrayMap keeps the count."""
    m = PerfEventArrayMap(4, 4, 8)
    a, b = object(), object()
    m.put((1).to_bytes(4, "little"), a)
    m.put((5).to_bytes(4, "little"), b)
    m.put((5).to_bytes(4, "little"), a)  # replaced: still two
    assert m.live == 2 == sum(1 for _ in m.items())
    m.delete((1).to_bytes(4, "little"))
    assert m.live == 1
    m.clear()
    assert m.live == 0 == sum(1 for _ in m.items())


def test_rendering_an_fd_array_scans_a_bounded_number_of_slots(monkeypatch) -> None:
    """red-team review, finding 2: reading a pinned 1M-slot PROG_ARRAY scanned every empty
    slot in one call looking for RENDER_STEP live ones (38-89 ms a read). A step now looks at
    SCAN_STEP slots at most; with a zero budget each read is one step, and one with nothing
    at its offset yet answers None (the worker asks again)."""
    monkeypatch.setattr(render, "READ_BUDGET", 0.0)
    m = PerfEventArrayMap(4, 4, 4 * render.SCAN_STEP)
    m.put((4 * render.SCAN_STEP - 1).to_bytes(4, "little"), "the object")
    text = render.PinText(types.SimpleNamespace(kind="map", id=3, impl=m), lambda obj: 7)
    header = text.read(0, 1 << 20)
    assert header.startswith(b"# perf_event_array map id 3")
    answers = []
    while (part := text.read(len(header), 1 << 20)) is None:
        answers.append(part)
    assert len(answers) == 3
    key = (4 * render.SCAN_STEP - 1).to_bytes(4, "little")
    assert part == f"{key.hex(' ')}: id 7\n".encode()
    assert text.read(len(header) + len(part), 4096) == b""


def _empty_prog_array_read(socket_path: str, pin: str) -> tuple[int, bytes]:
    with Client(socket_path) as c:
        fd = c.map_create(MapType.PROG_ARRAY, 4, 4, 1_000_000)
        c.obj_pin(fd, pin)
        entries = c.obj_get_info_by_fd(fd).get("entries", 0)
    with open(pin, "rb") as f:
        return entries, f.read()


@pytest.mark.fuse
def test_reading_a_huge_empty_fd_array_pin_holds_nothing_up(public_root: Path,
                                                           start_daemon) -> None:
    """red-team review, finding 2: the same attack end to end, as uid 65534 (a 1M-slot
    PROG_ARRAY fits its 8 MiB of memlock)."""
    d = start_daemon(mount=True, root=public_root / "d")
    assert d.mount is not None
    entries, text = under_probe(d, lambda: in_child(
        _empty_prog_array_read, str(d.socket), str(d.mount / "pa"), user=NOBODY),
        "read of an empty 1M-slot PROG_ARRAY pin")
    assert entries == 0
    assert text.startswith(b"# prog_array map id") and text.count(b"\n") == 1


# -- finding 3: tree nodes ----------------------------------------------------------------------
NODE_LIMIT = 40
SYMLINK_BYTES = 20_000
TARGET = "x" * 3999


def _make_until_refused(base: str, make: Callable[[str], None], tries: int) -> tuple[int, int]:
    made = 0
    for i in range(tries):
        try:
            make(os.path.join(base, f"n{i}"))
        except OSError as e:
            return made, e.errno
        made += 1
    return made, 0


def _fill_with_dirs(mount: str) -> tuple[int, int]:
    base = os.path.join(mount, "mine")
    os.mkdir(base)
    made, err = _make_until_refused(base, os.mkdir, 2 * NODE_LIMIT)
    return made + 1, err


def _free_and_symlink(mount: str) -> tuple[int, int]:
    """10 entries freed; symlinks until their bytes are refused; one freed and remade short
    (its bytes are released with it); a hard link to it (an entry too)."""
    base = os.path.join(mount, "mine")
    for i in range(10):
        os.rmdir(os.path.join(base, f"n{i}"))
    made, err = _make_until_refused(base, lambda p: os.symlink(TARGET, p), 10)
    os.unlink(os.path.join(base, "n0"))
    os.symlink("short", os.path.join(base, "n0"))
    os.link(os.path.join(base, "n0"), os.path.join(base, "hard"), follow_symlinks=False)
    return made, err


def _more_dirs(mount: str, prefix: str) -> tuple[int, int]:
    return _make_until_refused(os.path.join(mount, "mine"),
                               lambda p: os.mkdir(p.replace("/n", f"/{prefix}")), NODE_LIMIT)


def _pin_one(socket_path: str, pin: str) -> int:
    with Client(socket_path) as c:
        fd = c.map_create(MapType.HASH, 4, 4, 1)
        try:
            c.obj_pin(fd, pin)
        except OSError as e:
            return e.errno or 0
    return 0


@pytest.mark.fuse
def test_entries_a_user_makes_in_the_tree_are_limited(public_root: Path, start_daemon) -> None:
    """red-team review, finding 3: uid 65534 made symlinks with 4,000-byte targets (and
    directories, hard links) in the world-writable mount root at ~1,130/s, ~4.3 KB of the
    daemon's memory each, charged to nobody and kept in the snapshot. Entries are now counted
    for the uid that makes them (--max-fs-nodes-per-uid) and symlink targets' bytes too
    (--max-symlink-bytes-per-uid): EDQUOT beyond, released when removed, counted again after
    a restart; root is never refused."""
    args = ("--max-fs-nodes-per-uid", str(NODE_LIMIT),
            "--max-symlink-bytes-per-uid", str(SYMLINK_BYTES))
    d = start_daemon(mount=True, root=public_root / "d", args=args)
    assert d.mount is not None
    mount = str(d.mount)
    assert in_child(_fill_with_dirs, mount, user=NOBODY) == (NODE_LIMIT, errno.EDQUOT)
    assert in_child(_pin_one, str(d.socket), f"{mount}/pinned", user=NOBODY) == errno.EDQUOT
    for i in range(NODE_LIMIT + 5):  # root: never refused
        (d.mount / f"root{i}").mkdir()
    made = in_child(_free_and_symlink, mount, user=NOBODY)
    assert made == (SYMLINK_BYTES // len(TARGET), errno.EDQUOT)
    # 40 - 10 freed + 5 symlinks + 1 hard link: 4 entries left
    assert in_child(_more_dirs, mount, "f", user=NOBODY) == (4, errno.EDQUOT)
    os.rmdir(d.mount / "mine" / "n10")  # root removes one of nobody's: released for nobody
    assert in_child(_more_dirs, mount, "g", user=NOBODY) == (1, errno.EDQUOT)

    d.stop()
    d.cleanup_mount()
    d = start_daemon(mount=True, root=public_root / "d", args=args)  # counted again from the state
    assert in_child(_more_dirs, mount, "h", user=NOBODY) == (0, errno.EDQUOT)
    assert len(os.listdir(d.mount / "mine")) == NODE_LIMIT - 1


def test_every_way_an_entry_goes_releases_its_count() -> None:
    """red-team review, finding 3: the counts follow the entries through rename (moved, not
    released), rename over another entry, exchange, unlink of one hard link of several, and
    the drop of a whole unnamed instance (Tree.clear): all back to zero at the end."""
    tree = Tree(hold=lambda obj: None, release=lambda obj: None)
    tree.quota = quota = NodeQuota(10, 100)
    alice, bob = Caller(1000, 1000), Caller(1001, 1001)
    d = tree.mkdir(tree.root, b"d", 0o755, alice)
    link = tree.symlink(d, b"s", b"x" * 30, alice)
    tree.link(link, tree.root, b"hard", bob)
    tree.symlink(tree.root, b"t", b"y" * 20, bob)
    assert (quota.entries, quota.symlink_bytes) == ({1000: 2, 1001: 2}, {1000: 30, 1001: 20})
    tree.rename(d, b"s", tree.root, b"moved")
    tree.rename(tree.root, b"t", tree.root, b"hard")  # bob's "hard" entry replaced by "t"
    assert quota.entries == {1000: 2, 1001: 1} and quota.symlink_bytes == {1000: 30, 1001: 20}
    tree.rename(tree.root, b"moved", tree.root, b"d", RENAME_EXCHANGE)
    tree.unlink(tree.root, b"hard")  # bob's symlink, its last link: its bytes go too
    assert quota.entries == {1000: 2} and quota.symlink_bytes == {1000: 30}
    with pytest.raises(OSError) as refused:
        tree.symlink(tree.root, b"big", b"z" * 71, alice)
    assert refused.value.errno == errno.EDQUOT
    tree.mkdir(tree.root, b"r", 0o755, Caller(0, 0))  # root: neither refused nor counted
    tree.clear()
    assert not quota.entries and not quota.symlink_bytes
