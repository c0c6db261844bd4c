"""Listing directories larger than one kernel readdir page and one daemon chunk: every entry
exactly once, `rewinddir` starts over, and entries that stay put during concurrent changes are
neither skipped nor repeated (entries added or removed meanwhile may or may not appear, as
POSIX allows)."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import stat
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from fs_helpers import cli, wait_for

from bpffs.client import Client
from bpffs.daemon.fs.worker import READDIR_CHUNK

pytestmark = pytest.mark.fuse

MANY = 2 * READDIR_CHUNK + 500  # three daemon chunks, about a hundred kernel pages

_libc = ctypes.CDLL(None, use_errno=True)
_libc.opendir.restype = ctypes.c_void_p
_libc.readdir.restype = ctypes.c_void_p
_libc.readdir.argtypes = _libc.rewinddir.argtypes = _libc.closedir.argtypes = [ctypes.c_void_p]
D_NAME_OFFSET = 19  # struct dirent (glibc, 64-bit): d_ino 8, d_off 8, d_reclen 2, d_type 1


@pytest.fixture(scope="module")
def big_dir(mounted_daemon, tmp_path_factory) -> Path:
    directory = mounted_daemon.mount / "big"
    directory.mkdir()
    with Client(str(mounted_daemon.socket)) as client:
        fd = client.map_create(1, 4, 4, 1)
        for k in range(MANY):
            client.obj_pin(fd, str(directory / f"m{k}"))
        os.close(fd)
    return directory


def expected_names() -> list[str]:
    return sorted(f"m{k}" for k in range(MANY))


def test_a_large_directory_lists_every_entry_once(big_dir: Path) -> None:
    assert sorted(os.listdir(big_dir)) == expected_names()


def test_ls_l_shows_every_pin_with_its_attributes(big_dir: Path) -> None:
    lines = subprocess.run(["ls", "-l", str(big_dir)], capture_output=True, text=True,
                           check=True).stdout.splitlines()[1:]  # after "total 0"
    assert len(lines) == MANY
    assert all(line.startswith("-rw-------") for line in lines)


def _read_names(dirp: int, limit: int | None = None) -> list[str]:
    names = []
    while limit is None or len(names) < limit:
        entry = _libc.readdir(dirp)
        if not entry:
            break
        name = ctypes.string_at(entry + D_NAME_OFFSET).decode()
        if name not in (".", ".."):
            names.append(name)
    return names


def test_rewinddir_in_the_middle_starts_the_listing_over(big_dir: Path) -> None:
    dirp = _libc.opendir(os.fsencode(big_dir))
    assert dirp, os.strerror(ctypes.get_errno())
    try:
        first_part = _read_names(dirp, limit=READDIR_CHUNK + 7)
        _libc.rewinddir(dirp)
        whole = _read_names(dirp)
    finally:
        _libc.closedir(dirp)
    assert sorted(whole) == expected_names()
    assert whole[:len(first_part)] == first_part


def _churn(mount: str, socket_path: str, rounds: int) -> None:
    """Pins and unlinks names of its own in the listed directory, as fast as it can."""
    with Client(socket_path) as client:
        fd = client.map_create(1, 4, 4, 1)
        for n in range(rounds):
            client.obj_pin(fd, f"{mount}/big/churn{n}")
            if n >= 5:
                os.unlink(f"{mount}/big/churn{n - 5}")
        for n in range(max(rounds - 5, 0), rounds):
            os.unlink(f"{mount}/big/churn{n}")
        os.close(fd)


def test_listing_during_concurrent_changes_skips_and_repeats_nothing(daemon,
                                                                     big_dir: Path) -> None:
    churner = multiprocessing.Process(target=_churn,
                                      args=(str(daemon.mount), str(daemon.socket), 400))
    churner.start()
    listings = []
    try:
        while churner.is_alive() or len(listings) < 3:
            listings.append(os.listdir(big_dir))
    finally:
        churner.join(timeout=120)
    assert churner.exitcode == 0
    assert any(n.startswith("churn") for names in listings for n in names)  # it overlapped
    for names in listings:
        counts = Counter(names)
        assert [name for name, count in counts.items() if count > 1] == []
        assert sorted(n for n in names if not n.startswith("churn")) == expected_names()
    assert sorted(os.listdir(big_dir)) == expected_names()


def test_names_removed_during_a_listing_do_not_linger(daemon, big_dir: Path, tmp_path) -> None:
    """Entries the worker fetched ahead must not reach the kernel after their name is gone
    (READDIRPLUS would make a dentry for it): neither after a removal through this mount nor
    after one through another mount of the instance, which arrives as an invalidation."""
    second = tmp_path / "second"
    second.mkdir()
    cli(daemon, "mount", str(second))
    try:
        listing = os.scandir(big_dir)
        next(listing)  # the first page is read; the worker holds the rest of a chunk
        os.unlink(big_dir / "m900")
        os.unlink(second / "big" / "m901")
        wait_for(lambda: not os.path.exists(big_dir / "m901"), "the invalidation")
        rest = [entry.name for entry in listing]
        listing.close()
        assert len(rest) > MANY - 10  # the listing went on
        assert not os.path.exists(big_dir / "m900")
        assert not os.path.exists(big_dir / "m901")
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(second)], check=False)
        with Client(str(daemon.socket)) as client:  # put them back for the other tests
            fd = client.map_create(1, 4, 4, 1)
            for name in ("m900", "m901"):
                if not os.path.exists(big_dir / name):
                    client.obj_pin(fd, str(big_dir / name))
            os.close(fd)


def test_a_chmod_during_a_listing_is_not_undone_by_it(big_dir: Path) -> None:
    """Attributes fetched ahead with the entries must not overwrite a newer chmod in the
    kernel's attribute cache."""
    pin = big_dir / "m600"  # listed after the first page, in the chunk fetched first
    os.stat(pin)  # its attributes are cached
    listing = os.scandir(big_dir)
    next(listing)  # the worker holds the rest of a chunk, with the pin's old mode
    os.chmod(pin, 0o640)
    try:
        assert len([entry.name for entry in listing]) > MANY - 10
        listing.close()
        assert stat.S_IMODE(os.stat(pin).st_mode) == 0o640
    finally:
        os.chmod(pin, 0o600)
