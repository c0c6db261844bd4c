"""A caller's capabilities under `bpffs exec`: what bpffsd lets only privileged callers do, a
root caller that dropped its capabilities may not do through the supervisor's root connection.
The oracle is the same bpftool under the same dropped capabilities against the kernel's bpf()
(kernel.unprivileged_bpf_disabled set, as Debian ships it, so the kernel refuses map creation
and program loads too; bpffsd serves those to unprivileged callers, by its own rules)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import NOBODY, DaemonProcess
from seccomp_helpers import Run, normalise
from seccomp_programs import PROG, build_bpf_object

from bpffs.vm.uapi import MapType

pytestmark = [pytest.mark.fuse,
              pytest.mark.skipif(os.geteuid() != 0, reason="dropping root's capabilities"),
              pytest.mark.skipif(not shutil.which("setpriv") or not shutil.which("capsh"),
                                 reason="setpriv (util-linux) and capsh (libcap2-bin) needed")]

# root with no capability at all (and none to regain at exec), and root without the two that
# the kernel's bpf() asks for
NO_CAPS = ("setpriv", "--inh-caps=-all", "--bounding-set=-all", "--")
KEY = ("key", "1", "0", "0", "0")


def _no_caps(*argv: str) -> tuple[str, ...]:
    return (*NO_CAPS, *argv)


def _no_sys_admin(*argv: str) -> tuple[str, ...]:
    return ("capsh", "--drop=cap_sys_admin,cap_bpf", "--", "-c", 'exec "$@"', "sh", *argv)


def _in_user_namespace(*argv: str) -> tuple[str, ...]:
    """root with every capability, in a user namespace of its own: none counts in ours."""
    return ("unshare", "--user", "--map-root-user", "--", *argv)


def _both(under_exec: Run, plain: Run, roots: tuple[Path, Path], *argv: str
          ) -> tuple[tuple[int, str], tuple[int, str]]:
    """(status, normalised output) of argv under bpffs exec and plainly on the kernel; "R" in
    argv stands for the bpffs directory of each side."""
    out = []
    for run, root in ((under_exec, roots[0]), (plain, roots[1])):
        done = run(*(str(root) + a[1:] if a.startswith("R") else a for a in argv))
        out.append((done.returncode, normalise(done.stdout + done.stderr, root)))
    return out[0], out[1]


@pytest.fixture
def roots(bpf_dir: Path, kernel_bpffs: Path, bpftool: str, plain: Run, daemon: DaemonProcess
          ) -> tuple[Path, Path]:
    """The same hash map (key 1 -> 2) pinned at m on both sides, created with root's rights."""
    with daemon.client() as c:
        fd = c.map_create(MapType.HASH, 4, 4, 8, name="m")
        c.map_update_elem(fd, b"\1\0\0\0", b"\2\0\0\0")
        c.obj_pin(fd, str(bpf_dir / "m"))
    assert plain(bpftool, "map", "create", str(kernel_bpffs / "m"), "type", "hash", "key", "4",
                 "value", "4", "entries", "8", "name", "m").returncode == 0
    assert plain(bpftool, "map", "update", "pinned", str(kernel_bpffs / "m"), *KEY, "value",
                 "2", "0", "0", "0").returncode == 0
    return bpf_dir, kernel_bpffs


@pytest.mark.parametrize("drop", [_no_caps, _no_sys_admin, _in_user_namespace],
                         ids=["setpriv", "capsh", "userns"])
def test_listing_and_opening_by_id_need_cap_sys_admin(drop: Callable[..., tuple[str, ...]],
                                                      bpftool: str, under_exec: Run,
                                                      plain: Run, roots: tuple[Path, Path]
                                                      ) -> None:
    """MAP/PROG_GET_NEXT_ID and *_GET_FD_BY_ID: EPERM, bpftool's very words, on both sides;
    with root's capabilities bpffsd lists its map."""
    for argv in (["map", "show"], ["prog", "show"], ["map", "show", "id", "1"],
                 ["prog", "show", "id", "1"]):
        ours, kernels = _both(under_exec, plain, roots, *drop(bpftool, *argv))
        assert ours == kernels, argv
        assert ours[0] != 0 and "Operation not permitted" in ours[1], argv
    listed = under_exec(bpftool, "map", "show")
    assert listed.returncode == 0 and "name m" in listed.stdout, listed.stderr


def test_what_an_object_or_pin_grants_stays_granted(bpftool: str, under_exec: Run,
                                                    plain: Run, roots: tuple[Path, Path]
                                                    ) -> None:
    """Getting a pin the caller may open, and the calls on the fd it gives, need no
    capability: the same answers as the kernel's."""
    for argv in (["map", "show", "pinned", "R/m"], ["map", "lookup", "pinned", "R/m", *KEY],
                 ["map", "update", "pinned", "R/m", *KEY, "value", "3", "0", "0", "0"],
                 ["map", "dump", "pinned", "R/m"], ["map", "getnext", "pinned", "R/m"]):
        ours, kernels = _both(under_exec, plain, roots, *NO_CAPS, bpftool, *argv)
        assert ours == kernels, argv
        assert ours[0] == 0, ours


def test_a_pin_of_another_user_needs_cap_dac_override(bpftool: str, under_exec: Run,
                                                      plain: Run, roots: tuple[Path, Path]
                                                      ) -> None:
    """bpffsd lets root open any pin; the kernel lets root without CAP_DAC_OVERRIDE open only
    what the mode bits allow it: EACCES for nobody's 0600 pin, on both sides."""
    for root in roots:
        os.chown(root / "m", *NOBODY)
        os.chmod(root / "m", 0o600)
    ours, kernels = _both(under_exec, plain, roots, *NO_CAPS, bpftool, "map", "show",
                          "pinned", "R/m")
    assert ours == kernels
    assert ours[0] != 0 and "Permission denied" in ours[1], ours
    ours, kernels = _both(under_exec, plain, roots, bpftool, "map", "show", "pinned", "R/m")
    assert ours[0] == kernels[0] == 0, (ours, kernels)


def test_bpffsd_rules_where_they_differ_from_the_kernel(bpftool: str, under_exec: Run,
                                                        bpf_dir: Path, tmp_path: Path) -> None:
    """bpffsd's own rules for unprivileged callers, which the kernel (unprivileged_bpf_disabled)
    does not share: map creation and socket filters are anyone's; test runs and other program
    types need privilege; a directory of nobody's is nobody else's to pin in."""
    created = under_exec(*NO_CAPS, bpftool, "map", "create", str(bpf_dir / "n"), "type",
                         "hash", "key", "4", "value", "4", "entries", "8", "name", "n")
    assert created.returncode == 0, created.stderr
    obj = build_bpf_object(PROG, tmp_path)
    loaded = under_exec(*NO_CAPS, bpftool, "prog", "load", str(obj), str(bpf_dir / "p"),
                        "type", "socket", "pinmaps", str(bpf_dir / "maps"))
    assert loaded.returncode == 0, loaded.stderr
    classifier = under_exec(*NO_CAPS, bpftool, "prog", "load", str(obj), str(bpf_dir / "c"),
                            "type", "classifier")
    assert classifier.returncode != 0 and "Operation not permitted" in classifier.stderr
    packet = tmp_path / "packet"
    packet.write_bytes(bytes(64))
    ran = under_exec(*NO_CAPS, bpftool, "prog", "run", "pinned", str(bpf_dir / "p"),
                     "data_in", str(packet))
    assert ran.returncode != 0 and "Operation not permitted" in ran.stderr, ran.stdout
    assert under_exec(bpftool, "prog", "run", "pinned", str(bpf_dir / "p"), "data_in",
                      str(packet)).returncode == 0
    private = bpf_dir / "private"
    private.mkdir(mode=0o700)
    os.chown(private, *NOBODY)
    pinned = under_exec(*NO_CAPS, bpftool, "map", "pin", "pinned", str(bpf_dir / "n"),
                        str(private / "n"))
    assert pinned.returncode != 0 and "Permission denied" in pinned.stderr, pinned.stderr
    assert under_exec(bpftool, "map", "pin", "pinned", str(bpf_dir / "n"),
                      str(private / "n")).returncode == 0
