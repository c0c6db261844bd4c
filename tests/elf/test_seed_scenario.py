"""The user story of Linux 4.4's persistent objects, end to end: two separate processes load
the ingress and egress programs of one tc object; both count packets in the same PIN_GLOBAL_NS
map; after both have exited the map still holds the counts; `rm` of its pin frees it."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import DaemonProcess

from bpffs.client import Client

pytestmark = pytest.mark.fuse

# One tc invocation: load a section of the object, run packets through it, exit.
LOADER = """
import sys
from bpffs.client import Client
from bpffs.client.loader import read_object
from bpffs.client.loader.load import LoadOptions, load_object
from bpffs.vm.uapi import ProgType

socket, obj, mount, section, *protos = sys.argv[1:]
frames = {"arp": b"\\x08\\x06", "ipv4": b"\\x08\\x00", "ipv6": b"\\x86\\xdd", "lldp": b"\\x88\\xcc"}
with Client(socket) as client:
    spec = read_object(obj)
    with load_object(client, spec, LoadOptions(mount=mount, prog_type=ProgType.SCHED_CLS,
                                               sections=[section])) as loaded:
        prog = next(iter(loaded.programs.values()))
        for proto in protos:
            client.prog_test_run(prog, bytes(12) + frames[proto] + bytes(46))
        print(sorted(loaded.reused), flush=True)
"""


def test_two_processes_share_a_global_map_that_outlives_them(
        daemon: DaemonProcess, client: Client, bpf_dir: Path, examples: dict[str, Path]) -> None:
    obj = str(examples["tc_classifier"])
    runs = {"ingress": ["arp", "ipv4", "ipv4", "lldp"], "egress": ["ipv6", "ipv4"]}
    procs = [subprocess.Popen([sys.executable, "-c", LOADER, str(daemon.socket), obj,
                               str(bpf_dir), section, *protos], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for section, protos in runs.items()]  # started together: they race to pin
    reused = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        reused.append(out.strip())
    # whichever pinned first created the map; the other found and reused it
    assert sorted(reused) == ["['proto_stats']", "[]"]
    pin = bpf_dir / "tc" / "globals" / "proto_stats"
    assert pin.exists()
    fd = client.obj_get(pin)
    try:
        map_id = client.obj_get_info_by_fd(fd)["id"]
        counts = [struct.unpack("<Q", client.map_lookup_elem(fd, struct.pack("<I", k)))[0]
                  for k in range(8)]
    finally:
        os.close(fd)
    # ingress: ARP 1, IPv4 2, IPv6 0, dropped 1; egress: ARP 0, IPv4 1, IPv6 1, dropped 0
    assert counts == [1, 2, 0, 1, 0, 1, 1, 0]
    assert [p.name for p in (bpf_dir / "tc" / "globals").iterdir()] == ["proto_stats"]

    subprocess.run(["rm", str(pin)], check=True)
    deadline = time.monotonic() + 10
    while True:
        try:
            os.close(client.get_fd_by_id("map", map_id))
        except OSError as e:
            assert e.errno == errno.ENOENT
            break
        assert time.monotonic() < deadline, "the map outlived its last pin"
        time.sleep(0.05)
