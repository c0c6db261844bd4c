"""The batch test run (what pcap replay uses) gives every packet exactly what its own
BPF_PROG_TEST_RUN gives: retval, data_out, effects (classid, mark, vlan, redirects, clones,
tunnel keys, trace lines), errors — and leaves the maps in the same state. Each program is
loaded twice, under two mounts (so with two sets of maps): one copy runs packet by packet, the
other runs the whole capture in one batch, in both tiers. Nothing may leak from one packet of
a batch into the next (cb[], metadata, the packet bytes)."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from bpffs.client import Client
from bpffs.client.loader import read_object
from bpffs.client.loader.load import LoadOptions, load_object
from bpffs.vm.uapi import ProgType

pytestmark = pytest.mark.fuse

# A tc program that touches everything a run can change, depending on one byte of the packet.
META = """
SEC("classifier") int meta(struct __sk_buff *skb) {
    __u32 h = load_byte(skb, 20);
    __u8 b = 0xff;
    char fmt[] = "h %d\\n";
    if (h & 1) skb->mark = h;
    if (h & 2) skb->priority = h + 1;
    if (h & 4) skb->tc_index = h;
    if (h & 8) skb->tc_classid = 0x10000 | h;
    skb->cb[0] += 1;
    if (h & 16) bpf_skb_store_bytes(skb, 30, &b, 1, 0);
    if (h & 32) bpf_trace_printk(fmt, sizeof(fmt), h);
    if (h & 64) bpf_redirect(h, h & 128 ? 1 : 0);
    if (h & 128) bpf_skb_vlan_push(skb, __builtin_bswap16(ETH_P_8021Q), h);
    return skb->cb[0] == 1 ? h & 7 : 99;
}
SEC("socket") int sf(struct __sk_buff *skb) {
    skb->cb[1] += skb->len;
    return skb->cb[1] == skb->len && skb->protocol == __builtin_bswap16(ETH_P_IP) ? 34 : 0;
}
char _license[] SEC("license") = "GPL";
"""
OPTIONS = {"interfaces": [1, 3, 4], "seed": 7, "ktime_ns": 123,
           "tunnel_key": {"tunnel_id": 9, "remote_ipv4": 0x0A000001}}


def capture(count: int = 300) -> list[bytes]:
    rng = random.Random(66)
    types = [b"\x08\x06", b"\x08\x00", b"\x86\xdd", b"\x81\x00", b"\x88\xcc"]
    frames = [rng.choice([bytes(6), b"\xff" * 6, b"\x01" + bytes(5), rng.randbytes(6)])
              + rng.randbytes(6) + rng.choice(types) + rng.randbytes(rng.randrange(20, 200))
              for _ in range(count)]
    return [*frames, bytes(10), bytes(12) + b"\x08\x00" + bytes(70_000), *frames[:5]]


def map_contents(client: Client, fds: dict[str, int]) -> dict[str, dict]:
    out = {}
    for name, fd in fds.items():
        try:
            keys, values, _ = client.map_lookup_batch(fd, 4096)
            out[name] = dict(zip(keys, values, strict=True))
        except OSError as e:  # prog_array: not readable in batches
            out[name] = e.errno
    return out


def loaded_twice(client: Client, obj: Path, bpf_dir: Path, prog_type: ProgType | None):
    spec = read_object(obj)
    return [load_object(client, spec, LoadOptions(mount=str(bpf_dir / side),
                                                  prog_type=prog_type))
            for side in ("single", "batch")]


@pytest.mark.parametrize("tier", ["compiled", "interpreter"])
@pytest.mark.parametrize("example", ["tc_classifier", "hash_demux", "redirect_fwd", "tail_call",
                                     "tunnel", "vlan", "meta"])
def test_batch_matches_one_test_run_per_packet(client: Client, bpf_dir: Path, build,
                                               examples: dict[str, Path], example: str,
                                               tier: str) -> None:
    obj = build(META, "meta") if example == "meta" else examples[example]
    for side in ("single", "batch"):
        (bpf_dir / side).mkdir()
    single, batched = loaded_twice(client, obj, bpf_dir, ProgType.SCHED_CLS
                                   if example == "tc_classifier" else None)
    with single, batched:
        for loaded in (single, batched):
            for name in ("demux_ports", "fwd_target"):
                if name in loaded.maps:
                    for slot in range(4 if name == "demux_ports" else 1):
                        client.map_update_elem(loaded.maps[name], struct.pack("<I", slot),
                                               struct.pack("<I", 3 + slot % 2))
        packets = capture()
        for name, fd in single.programs.items():
            expected_retvals, outputs, effects, errors = [], {}, {}, {}
            for i, p in enumerate(packets):
                try:
                    r = client.prog_test_run(fd, p, tier=tier, **OPTIONS)
                except OSError as e:
                    expected_retvals.append(0)
                    errors[i] = e.errno
                    continue
                expected_retvals.append(r.retval)
                if r.data_out != p:
                    outputs[i] = r.data_out
                if r.effects:
                    effects[i] = r.effects
            got = client.prog_test_run_batch(batched.programs[name], packets, chunk=100,
                                             tier=tier, **OPTIONS)
            assert got.retvals == expected_retvals, name
            assert got.outputs == outputs, name
            assert got.effects == effects, name
            assert {i: e for i, (e, _) in got.errors.items()} == errors, name
            assert len(errors) == 2
        assert map_contents(client, batched.maps) == map_contents(client, single.maps)
