"""Hostile bpf() calls under `bpffs exec`: bad pointers are EFAULT, an attr over a page or with
a non-zero tail E2BIG, garbage commands and stray bytes EINVAL, closed or foreign fds the
kernel's errno, a full fd table EMFILE (and no object left behind); each compared with the
running kernel's answer to the same call. Also the attr rules on their own, without seccomp."""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path

import pytest
from helpers import DaemonProcess
from seccomp_helpers import HERE, Run

from bpffs.client.seccomp import abi, attr, handlers
from bpffs.client.seccomp.target import Fault
from bpffs.vm.uapi import Cmd, MapType

TARGET = str(HERE / "seccomp_hostile_target.py")


@pytest.mark.fuse
def test_hostile_calls_get_the_kernels_errnos(under_exec: Run, plain: Run, bpf_dir: Path,
                                              kernel_bpffs: Path, daemon: DaemonProcess
                                              ) -> None:
    with daemon.client() as c:
        fd = c.map_create(MapType.HASH, 4, 4, 8, name="y")
        c.map_update_elem(fd, b"\3\0\0\0", b"\4\0\0\0")
        c.obj_pin(fd, str(bpf_dir / "y"))
        os.close(fd)
        open_fds = c.status()["object_fds"]
    made = plain("bpftool", "map", "create", str(kernel_bpffs / "y"), "type", "hash", "key",
                 "4", "value", "4", "entries", "8", "name", "y")
    if made.returncode:
        pytest.skip(f"bpftool cannot create a kernel map here: {made.stderr}")
    plain("bpftool", "map", "update", "pinned", str(kernel_bpffs / "y"), "key", "3", "0", "0",
          "0", "value", "4", "0", "0", "0")
    ours = under_exec(sys.executable, TARGET, str(bpf_dir / "y"))
    kernels = plain(sys.executable, TARGET, str(kernel_bpffs / "y"))
    assert ours.returncode == 0, ours.stderr
    assert kernels.returncode == 0, kernels.stderr
    got, want = json.loads(ours.stdout), json.loads(kernels.stdout)
    assert got == want
    with daemon.client() as c:  # the target's fds died with it, the refused one never lived
        deadline = time.monotonic() + 5
        while c.status()["object_fds"] > open_fds and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.status()["object_fds"] == open_fds
    assert want["key unmapped"] == -errno.EFAULT
    assert want["attr over a page"] == -errno.E2BIG
    assert want["garbage command"] == -errno.EINVAL
    assert want["OBJ_GET with a full fd table"] == -errno.EMFILE


# -- the attr rules, with a fake caller ---------------------------------------------------------
class Memory:
    """A caller's address space: one buffer at BASE."""

    BASE = 0x10000

    def __init__(self, data: bytes):
        self.data = bytearray(data)
        self.tid = self.tgid = 1

    def read(self, addr: int, size: int) -> bytes:
        if not self.BASE <= addr <= addr + size <= self.BASE + len(self.data):
            raise Fault
        return bytes(self.data[addr - self.BASE:addr - self.BASE + size])

    def check(self) -> None:
        pass

    def same_credentials(self) -> bool:
        return True


def test_attr_size_rules() -> None:
    mem = Memory(b"\0" * 8192)
    with pytest.raises(attr.AttrError) as big:
        attr.read_attr(Cmd.MAP_LOOKUP_ELEM, mem.BASE, 4097, mem.read)
    assert big.value.errno == errno.E2BIG
    mem.data[attr.ATTR_SIZE + 10] = 1
    with pytest.raises(attr.AttrError) as tail:
        attr.read_attr(Cmd.MAP_LOOKUP_ELEM, mem.BASE, 4096, mem.read)
    assert tail.value.errno == errno.E2BIG
    mem.data[40] = 1  # past MAP_LOOKUP_ELEM's members (flags ends at 32)
    with pytest.raises(attr.AttrError) as stray:
        attr.read_attr(Cmd.MAP_LOOKUP_ELEM, mem.BASE, 48, mem.read)
    assert stray.value.errno == errno.EINVAL
    short = attr.read_attr(Cmd.MAP_LOOKUP_ELEM, mem.BASE, 8, mem.read)  # zero-filled
    assert short.num("map_fd") == 0 and short.num("flags") == 0
    with pytest.raises(Fault):
        attr.read_attr(Cmd.MAP_LOOKUP_ELEM, 8, 32, mem.read)


def test_garbage_and_faults_without_seccomp() -> None:
    """handlers.handle maps a bad attr pointer to EFAULT before refusing an unknown command,
    as __sys_bpf does; an unknown command with a readable attr is EINVAL. No daemon call."""
    mem = Memory(b"\0" * 256)
    ctx = handlers.Context(client=None)  # type: ignore[arg-type]
    nr = abi.Nr.bpf
    assert handlers.handle(mem, nr, (9999, 8, 64, 0, 0, 0), ctx) == \
        handlers.Reply(error=errno.EFAULT)
    assert handlers.handle(mem, nr, (9999, mem.BASE, 64, 0, 0, 0), ctx) == \
        handlers.Reply(error=errno.EINVAL)
    assert handlers.handle(mem, nr, (Cmd.BTF_LOAD, mem.BASE, 28, 0, 0, 0), ctx) == \
        handlers.Reply(error=errno.EINVAL)

