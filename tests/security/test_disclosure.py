"""Red-team review, findings 8 and 9: what another user can learn or provoke through
obj_info and prog_load's arguments."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from helpers import NOBODY, in_child

from bpffs.client import Client, calls
from bpffs.vm import asm
from bpffs.vm.uapi import MapType, ObjFlag, ProgType


@pytest.mark.fuse
def test_pinned_paths_below_a_private_directory_stay_private(public_root: Path,
                                                             start_daemon) -> None:
    """Red-team review, finding 9: root pinned one map in a 0700 directory and at a public
    0644 pin; uid 65534, holding the public pin read-only, saw the private path in obj_info's
    `pinned` although listing that directory is EACCES. Now `pinned` names only paths the
    caller could look up; root still sees every one."""
    daemon = start_daemon(mount=True, root=public_root / "d")
    assert daemon.mount is not None
    private = daemon.mount / "private"
    private.mkdir(mode=0o700)
    public, secret = daemon.mount / "public", private / "customer-acme-ratelimit"
    with daemon.client() as c:
        fd = c.map_create(MapType.ARRAY, 4, 8, 1)
        c.obj_pin(fd, str(secret))
        c.obj_pin(fd, str(public))
        os.chmod(public, 0o644)
        assert c.obj_get_info_by_fd(fd)["pinned"] == sorted([str(public), str(secret)])
        os.close(fd)

    def info_as_nobody() -> list[str]:
        with Client(str(daemon.socket)) as c:
            theirs = c.obj_get(str(public), int(ObjFlag.RDONLY))
            return c.obj_get_info_by_fd(theirs)["pinned"]

    assert in_child(info_as_nobody, user=NOBODY) == [str(public)]


def test_map_fds_that_are_not_integers_are_einval(public_root: Path, start_daemon) -> None:
    """Red-team review, finding 8: prog_load with a map_fds value that is a list gave
    "internal error: TypeError" and a traceback in the log for every request (6,000
    tracebacks from 3,000 requests). Now it is EINVAL (the fixture fails the test if the
    daemon logged a traceback)."""
    daemon = start_daemon(root=public_root / "d")
    insns = asm.program(asm.mov64_imm(0, 0), asm.exit())

    def load(map_fds: dict) -> calls.Call:
        return (yield calls.Request("prog_load", (int(ProgType.SOCKET_FILTER), insns, "GPL", 0,
                                                  "", 0, 0, map_fds)))

    def load_as_nobody() -> list[int]:
        refused = []
        with Client(str(daemon.socket)) as c:
            for map_fds in ({3: [1]}, {3: {1: 2}}, {"3": 1}, {3: None}):
                try:
                    c.run(load(map_fds))
                except OSError as e:
                    refused.append(e.errno)
        return refused

    assert in_child(load_as_nobody, user=NOBODY) == [errno.EINVAL] * 4
    assert "Traceback" not in daemon.log_text()
