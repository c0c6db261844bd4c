"""The kernel as the oracle: the same object's programs, relocated once to kernel map fds
(loaded with the running kernel's BPF_PROG_LOAD) and once to bpffsd map fds (through the
loader), run over the same packets with BPF_PROG_TEST_RUN: verdicts and map contents agree."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from bpffs.client import Client
from bpffs.client.loader import ProgramSpec, read_object
from bpffs.client.loader.load import LoadOptions, load_object
from bpffs.vm import kernel
from bpffs.vm.uapi import MapType, ProgType

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

PACKETS = [
    bytes(12) + b"\x08\x06" + bytes(28),  # ARP
    bytes(12) + b"\x08\x00" + b"\x45" + bytes(45),  # IPv4
    bytes(12) + b"\x86\xdd" + b"\x60" + bytes(60),  # IPv6
    bytes(12) + b"\x88\xcc" + bytes(30),  # LLDP: dropped by the classifier
    bytes(12) + b"\x81\x00" + b"\x00\x2a\x08\x00" + bytes(40),  # VLAN-tagged in the data
    bytes(14),  # a bare Ethernet header
]
# (example, program type for untyped sections, map values to set first: map -> {key: value})
CASES = [
    ("tc_classifier", ProgType.SCHED_CLS, {}),
    ("redirect_fwd", None, {"fwd_target": {0: 1}}),
    ("redirect_fwd", None, {}),
    ("hash_demux", None, {}),
    ("vlan", None, {}),
    ("tunnel", None, {}),
    ("tail_call", None, {}),
]


def _kernel_run(spec, prog_type_default, setup) -> tuple[dict, dict]:
    fds = {n: kernel.map_create(m.type, m.key_size, m.value_size, m.max_entries, m.flags)
           for n, m in spec.maps.items()}
    progs: dict[str, int] = {}
    try:
        for name, values in setup.items():
            for k, v in values.items():
                kernel.map_update_elem(fds[name], struct.pack("<I", k), struct.pack("<I", v))
        for prog in spec.programs:
            prog_type = prog.prog_type or prog_type_default or ProgType.SCHED_CLS
            progs[prog.name], _ = kernel.prog_load(prog_type, prog.relocated(fds),
                                                   spec.license or "")
        _fill_kernel_tail_calls(spec, fds, progs)
        verdicts = {p.name: [kernel.prog_test_run(progs[p.name], pkt)[0] for pkt in PACKETS]
                    for p in spec.programs if not p.tail_call}
        return verdicts, _contents_kernel(spec, fds)
    finally:
        for fd in [*fds.values(), *progs.values()]:
            os.close(fd)


def _fill_kernel_tail_calls(spec, fds: dict, progs: dict) -> None:
    for prog in spec.programs:
        if prog.tail_call:
            jmp = next(n for n, m in spec.maps.items() if m.tc_id == prog.tail_call[0])
            kernel.map_update_elem(fds[jmp], struct.pack("<I", prog.tail_call[1]),
                                   struct.pack("<I", progs[prog.name]))


def _contents_kernel(spec, fds: dict) -> dict:
    out = {}
    for name, m in spec.maps.items():
        if m.type in (MapType.ARRAY, MapType.HASH):
            out[name] = _walk(lambda k, fd=fds[name], m=m: kernel.map_get_next_key(
                fd, k, m.key_size), lambda k, fd=fds[name], m=m: kernel.map_lookup_elem(
                fd, k, m.value_size))
    return out


def _walk(next_key, lookup) -> dict:
    items, key = {}, None
    while True:
        try:
            key = next_key(key)
        except OSError:
            return items
        items[key] = lookup(key)


def _bpffs_run(client: Client, spec, prog_type_default, setup, mount: Path
               ) -> tuple[dict, dict]:
    entry: list[ProgramSpec] = [p for p in spec.programs if not p.tail_call]
    typed = {p.name: p.prog_type or prog_type_default for p in entry}
    loaded_all = []
    try:
        for prog_type in set(typed.values()):  # one load per type (tc's `type` applies to all)
            sections = [p.section for p in entry if typed[p.name] == prog_type]
            loaded_all.append(load_object(client, spec, LoadOptions(
                mount=str(mount), prog_type=prog_type, sections=sections)))
        maps = loaded_all[0].maps
        for name, values in setup.items():
            for k, v in values.items():
                client.map_update_elem(maps[name], struct.pack("<I", k), struct.pack("<I", v))
        programs = {n: fd for x in loaded_all for n, fd in x.programs.items()}
        verdicts = {p.name: [client.prog_test_run(programs[p.name], pkt).retval
                             for pkt in PACKETS] for p in entry}
        contents = {}
        for name, m in spec.maps.items():
            if m.type in (MapType.ARRAY, MapType.HASH):
                contents[name] = _walk(lambda k, fd=maps[name]: client.map_get_next_key(fd, k),
                                       lambda k, fd=maps[name]: client.map_lookup_elem(fd, k))
        return verdicts, contents
    finally:
        for x in loaded_all:
            x.close()


@pytest.mark.parametrize(("example", "prog_type", "setup"), CASES,
                         ids=[f"{c[0]}{'-' + ','.join(c[2]) if c[2] else ''}" for c in CASES])
def test_same_verdicts_and_maps_as_the_kernel(client: Client, bpf_dir: Path,
                                              examples: dict[str, Path], example, prog_type,
                                              setup) -> None:
    spec = read_object(examples[example])
    expected = _kernel_run(spec, prog_type, setup)
    got = _bpffs_run(client, spec, prog_type, setup, bpf_dir)
    assert got[0] == {k: [v & 0xFFFFFFFF for v in vs] for k, vs in expected[0].items()}
    assert got[1] == expected[1]


def test_batch_replay_matches_the_kernel_packet_by_packet(client: Client, bpf_dir: Path,
                                                          examples: dict[str, Path]) -> None:
    """500 random frames (random Ethernet types, some of the classifier's; each with a whole
    IPv6-sized L3 header, which the kernel's test run insists on, and at most what it takes)
    through the batch op and through the kernel, one by one."""
    import random

    rng = random.Random(6)
    types = [b"\x08\x06", b"\x08\x00", b"\x86\xdd", b"\x81\x00"]
    frames = [rng.randbytes(12) + (rng.choice(types) if rng.random() < 0.8 else rng.randbytes(2))
              + rng.randbytes(rng.randrange(40, 3600)) for _ in range(500)]
    spec = read_object(examples["tc_classifier"])
    prog = spec.program("classifier")
    kfd, _ = kernel.prog_load(ProgType.SCHED_CLS, prog.insns, "GPL")
    try:
        expected = [kernel.prog_test_run(kfd, f)[0] for f in frames]
    finally:
        os.close(kfd)
    with load_object(client, spec, LoadOptions(mount=str(bpf_dir),
                                               sections=["classifier"])) as loaded:
        batch = client.prog_test_run_batch(loaded.programs["cls_main"], frames, chunk=128)
    assert batch.errors == {}
    assert batch.retvals == expected
    assert batch.outputs == {}  # the classifier never changes a packet
