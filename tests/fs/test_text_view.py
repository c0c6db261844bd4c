"""What file tools do with a pin's text view, as the README documents it (issue 12).

The kernel's bpffs fails open() of a map without BTF with EIO, so cp, tar and a
cross-filesystem mv all fail there and the pin stays. Here a pin reads as text, on purpose:
cp copies the text, tar stores an empty file, and a cross-filesystem mv copies the text and
unlinks the pin. Each test runs the same command on a kernel bpffs as the oracle.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bpffs.client import Client
from bpffs.vm import kernel
from bpffs.vm.uapi import MapType

KEY, VALUE = b"\x01\x00\x00\x00", b"\x02\x00\x00\x00"
TEXT_LINE = "01 00 00 00: 02 00 00 00"


def _sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


@pytest.fixture
def pinned(bpf_dir: Path, client: Client) -> Path:
    fd = client.map_create(MapType.HASH, 4, 4, 4)
    client.map_update_elem(fd, KEY, VALUE)
    client.obj_pin(fd, str(bpf_dir / "m"))
    return bpf_dir / "m"


@pytest.mark.fuse
def test_mv_to_another_filesystem_copies_the_text_and_unlinks_the_pin(
        pinned: Path, tmp_path: Path, client: Client) -> None:
    """issue 12, filesystem: documented in the README (deliberate difference). rename(2)
    gives EXDEV, so mv copies the file's text and removes the pin."""
    result = _sh("mv", str(pinned), str(tmp_path / "moved"))
    assert result.returncode == 0, result.stderr
    assert not pinned.exists()
    assert TEXT_LINE in (tmp_path / "moved").read_text()
    with pytest.raises(OSError):
        client.obj_get(str(pinned))


@pytest.mark.fuse
def test_mv_within_the_mount_moves_the_pin(pinned: Path, client: Client) -> None:
    """A rename, as on the kernel: the object keeps its pin under the new name."""
    (pinned.parent / "sub").mkdir()
    assert _sh("mv", str(pinned), str(pinned.parent / "sub" / "m")).returncode == 0
    fd = client.obj_get(str(pinned.parent / "sub" / "m"))
    assert client.map_lookup_elem(fd, KEY) == VALUE


@pytest.mark.fuse
def test_cp_copies_the_text_and_tar_stores_an_empty_file(pinned: Path, tmp_path: Path) -> None:
    """As documented: cp reads to the end (the text), tar trusts st_size (0)."""
    assert _sh("cp", "-r", str(pinned.parent), str(tmp_path / "copy")).returncode == 0
    assert TEXT_LINE in (tmp_path / "copy" / "m").read_text()
    archive = tmp_path / "a.tar"
    assert _sh("tar", "-C", str(pinned.parent), "-cf", str(archive), "m").returncode == 0
    listing = _sh("tar", "-tvf", str(archive)).stdout.split()
    assert listing[2] == "0" and listing[-1] == "m"


@pytest.mark.kernel
def test_on_the_kernels_bpffs_the_same_tools_fail_with_eio(kernel_bpffs: Path,
                                                            tmp_path: Path) -> None:
    """The oracle for the difference: EIO at open, and mv keeps the pin."""
    fd = kernel.map_create(MapType.HASH, 4, 4, 4)
    kernel.obj_pin(fd, str(kernel_bpffs / "m"))
    os.close(fd)
    moved = _sh("mv", str(kernel_bpffs / "m"), str(tmp_path / "moved"))
    copied = _sh("cp", str(kernel_bpffs / "m"), str(tmp_path / "copied"))
    assert moved.returncode and "Input/output error" in moved.stderr
    assert copied.returncode and "Input/output error" in copied.stderr
    assert (kernel_bpffs / "m").exists() and not (tmp_path / "moved").exists()
