"""Loading objects into bpffsd: maps created and pinned by tc's and libbpf's conventions,
reused when a matching map is already pinned, refused (EINVAL, field by field) when it does not
match, tail-call sections put into their prog_array — and nothing left pinned when any step
fails."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest
from helpers import raises_errno

from bpffs.client import Client
from bpffs.client.libbpf import read_perf_sample
from bpffs.client.loader import read_object
from bpffs.client.loader.load import LoadOptions, load_object
from bpffs.vm.errors import VerifierError
from bpffs.vm.uapi import ProgType

pytestmark = pytest.mark.fuse

ETH_ARP = bytes(12) + b"\x08\x06" + bytes(28)
ETH_IPV4 = bytes(12) + b"\x08\x00" + b"\x45" + bytes(40)
ETH_IPV6 = bytes(12) + b"\x86\xdd" + b"\x60" + bytes(40)
ETH_OTHER = bytes(12) + b"\x88\xcc" + bytes(30)


def tree(root: Path) -> set[str]:
    """Every path under root (pins, directories and links), relative."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def tc(bpf_dir: Path, **kw) -> LoadOptions:
    return LoadOptions(mount=str(bpf_dir), **kw)


def u64(data: bytes) -> int:
    return struct.unpack("<Q", data)[0]


def test_tc_global_pin_and_hierarchy(client: Client, bpf_dir: Path,
                                     examples: dict[str, Path]) -> None:
    spec = read_object(examples["tc_classifier"])
    with load_object(client, spec, tc(bpf_dir, prog_type=ProgType.SCHED_CLS,
                                      sections=["ingress"])) as loaded:
        assert set(loaded.programs) == {"cls_ingress"}
        assert loaded.reused == {}
    assert tree(bpf_dir) == {"tc", "tc/globals", "tc/globals/proto_stats", "xdp", "ip"}
    assert os.readlink(bpf_dir / "xdp") == f"{bpf_dir}/tc/"
    assert (bpf_dir / "tc").stat().st_mode & 0o777 == 0o700
    fd = client.obj_get(bpf_dir / "tc/globals/proto_stats")
    info = client.obj_get_info_by_fd(fd)
    os.close(fd)
    assert (info["type"], info["bytes_key"], info["bytes_value"], info["max_entries"],
            info["name"]) == ("array", 4, 8, 8, "proto_stats")


def test_second_load_reuses_the_pinned_map(client: Client, bpf_dir: Path,
                                           examples: dict[str, Path]) -> None:
    spec = read_object(examples["tc_classifier"])
    opts = tc(bpf_dir, prog_type=ProgType.SCHED_CLS)
    with load_object(client, spec, opts) as first, load_object(client, spec, opts) as second:
        ids = {client.obj_get_info_by_fd(x.maps["proto_stats"])["id"] for x in (first, second)}
        assert len(ids) == 1
        assert second.reused == {"proto_stats": str(bpf_dir / "tc/globals/proto_stats")}
        assert second.created == []


def test_mismatching_pinned_map_is_einval_and_pins_nothing(
        client: Client, bpf_dir: Path, examples: dict[str, Path], build) -> None:
    with load_object(client, read_object(examples["tc_classifier"]),
                     tc(bpf_dir, prog_type=ProgType.SCHED_CLS)):
        pass
    before = tree(bpf_dir)
    other = build("""
struct bpf_elf_map SEC("maps") fresh = { .type = BPF_MAP_TYPE_HASH, .size_key = 4,
    .size_value = 4, .max_elem = 16, .pinning = PIN_GLOBAL_NS };
struct bpf_elf_map SEC("maps") proto_stats = { .type = BPF_MAP_TYPE_ARRAY, .size_key = 4,
    .size_value = 8, .max_elem = 16, .pinning = PIN_GLOBAL_NS };
SEC("classifier") int f(struct __sk_buff *skb) {
    __u32 k = 0;
    return bpf_map_lookup_elem(&fresh, &k) != 0 && bpf_map_lookup_elem(&proto_stats, &k) != 0;
}
char _license[] SEC("license") = "GPL";
""")
    with pytest.raises(OSError, match=r"max_entries 16 != 8") as e:
        load_object(client, read_object(other), tc(bpf_dir))
    assert e.value.errno == errno.EINVAL
    assert "tc/globals/proto_stats" in str(e.value)
    assert tree(bpf_dir) == before  # `fresh` was pinned first and has been taken back


def test_object_namespace_pins_under_the_object_sha1(client: Client, bpf_dir: Path,
                                                     examples: dict[str, Path]) -> None:
    spec = read_object(examples["tunnel"])
    with load_object(client, spec, tc(bpf_dir)):
        pass
    assert f"tc/{spec.uid}/tunnel_ids" in tree(bpf_dir)


def test_libbpf_pin_by_name_under_pin_root(client: Client, bpf_dir: Path,
                                           examples: dict[str, Path]) -> None:
    spec = read_object(examples["redirect_fwd"])
    root = bpf_dir / "root"
    with load_object(client, spec, tc(bpf_dir, pin_root=str(root))) as loaded:
        client.map_update_elem(loaded.maps["fwd_target"], bytes(4), struct.pack("<I", 5))
    assert tree(bpf_dir) == {"root", "root/fwd_target"}
    with load_object(client, spec, tc(bpf_dir, pin_root=str(root))) as again:
        assert again.reused == {"fwd_target": str(root / "fwd_target")}
        assert client.map_lookup_elem(again.maps["fwd_target"], bytes(4)) == struct.pack("<I", 5)


def test_unpinned_maps_leave_no_pins(client: Client, bpf_dir: Path,
                                     examples: dict[str, Path]) -> None:
    with load_object(client, read_object(examples["perf_events"]), tc(bpf_dir)) as loaded:
        assert set(loaded.maps) == {"events", "seq"}
    assert tree(bpf_dir) == set()


def test_tail_call_sections_fill_the_prog_array(client: Client, bpf_dir: Path,
                                                examples: dict[str, Path]) -> None:
    spec = read_object(examples["tail_call"])
    with load_object(client, spec, tc(bpf_dir, sections=["classifier"])) as loaded:
        assert set(loaded.programs) == {"entry", "stage0", "stage1"}
        result = client.prog_test_run(loaded.programs["entry"], ETH_IPV4)
        assert result.retval == 3  # entry -> stage0 -> stage1, each counting in cb[0]


def test_type_needed_for_untyped_sections(client: Client, bpf_dir: Path,
                                          examples: dict[str, Path]) -> None:
    spec = read_object(examples["tc_classifier"])
    with pytest.raises(OSError, match="give `type`") as e:
        load_object(client, spec, tc(bpf_dir))
    assert e.value.errno == errno.EINVAL
    assert tree(bpf_dir) == set()


def test_protocol_classifier_verdicts(client: Client, bpf_dir: Path,
                                      examples: dict[str, Path]) -> None:
    spec = read_object(examples["tc_classifier"])
    with load_object(client, spec, tc(bpf_dir, prog_type=ProgType.SCHED_CLS)) as loaded:
        ingress, stats = loaded.programs["cls_ingress"], loaded.maps["proto_stats"]
        verdicts = [client.prog_test_run(ingress, p).retval
                    for p in (ETH_ARP, ETH_IPV4, ETH_IPV4, ETH_IPV6, ETH_OTHER)]
        assert verdicts == [0, 0, 0, 0, 2]  # TC_ACT_OK x4, TC_ACT_SHOT
        counts = [u64(client.map_lookup_elem(stats, struct.pack("<I", k))) for k in range(8)]
        assert counts == [1, 2, 1, 1, 0, 0, 0, 0]


# -- failures roll back -------------------------------------------------------------------------
def test_impossible_map_sizes(client: Client, bpf_dir: Path, build) -> None:
    for key, value, entries, err in ((0, 4, 1, errno.EINVAL), (4, 0, 1, errno.EINVAL),
                                     (4, 4, 0, errno.EINVAL), (4, 1 << 30, 4, errno.E2BIG)):
        obj = build(f"""
struct bpf_elf_map SEC("maps") ok = {{ .type = BPF_MAP_TYPE_ARRAY, .size_key = 4,
    .size_value = 4, .max_elem = 1, .pinning = PIN_GLOBAL_NS }};
struct bpf_elf_map SEC("maps") bad = {{ .type = BPF_MAP_TYPE_HASH, .size_key = {key},
    .size_value = {value}, .max_elem = {entries}, .pinning = PIN_GLOBAL_NS }};
SEC("classifier") int f(struct __sk_buff *skb) {{
    __u32 k = 0;
    return bpf_map_lookup_elem(&ok, &k) != 0 && bpf_map_lookup_elem(&bad, &k) != 0;
}}
char _license[] SEC("license") = "GPL";
""", name=f"bad{key}_{value}_{entries}")
        with pytest.raises(OSError, match="creating map 'bad'") as e:
            load_object(client, read_object(obj), tc(bpf_dir))
        assert e.value.errno == err, e.value
        assert tree(bpf_dir) == set(), "the pin of `ok` (and tc/) must be rolled back"


def test_failed_verification_shows_the_log_and_pins_nothing(client: Client, bpf_dir: Path,
                                                            build) -> None:
    obj = build("""
struct bpf_elf_map SEC("maps") counts = { .type = BPF_MAP_TYPE_ARRAY, .size_key = 4,
    .size_value = 8, .max_elem = 4, .pinning = PIN_GLOBAL_NS };
SEC("classifier") int f(struct __sk_buff *skb) {
    __u32 k = 0;
    __u64 *v = bpf_map_lookup_elem(&counts, &k);
    return *v;  /* no NULL check: the verifier refuses */
}
char _license[] SEC("license") = "GPL";
""")
    with pytest.raises(VerifierError, match="loading program 'f'") as e:
        load_object(client, read_object(obj), tc(bpf_dir))
    assert e.value.errno == errno.EACCES
    assert "invalid mem access" in e.value.log
    assert tree(bpf_dir) == set()


def test_missing_license_refuses_gpl_only_helpers(client: Client, bpf_dir: Path, build) -> None:
    obj = build('SEC("socket") int f(struct __sk_buff *skb) { return bpf_ktime_get_ns(); }')
    with pytest.raises(OSError, match="no license section") as e:
        load_object(client, read_object(obj), tc(bpf_dir))
    assert e.value.errno == errno.EINVAL
    without_gpl = build('SEC("socket") int f(struct __sk_buff *skb) { return skb->len; }',
                        name="plain")
    with load_object(client, read_object(without_gpl), tc(bpf_dir)) as loaded:
        info = client.obj_get_info_by_fd(loaded.programs["f"])
        assert info["gpl_compatible"] is False


def test_a_missing_tail_call_map_rolls_back(client: Client, bpf_dir: Path, build) -> None:
    obj = build("""
struct bpf_elf_map SEC("maps") jmp = { .type = BPF_MAP_TYPE_PROG_ARRAY, .size_key = 4,
    .size_value = 4, .max_elem = 2, .id = 7, .pinning = PIN_GLOBAL_NS };
SEC("7/5") int far(struct __sk_buff *skb) { return 1; }
SEC("classifier") int f(struct __sk_buff *skb) { bpf_tail_call(skb, &jmp, 0); return 0; }
char _license[] SEC("license") = "GPL";
""")
    with raises_errno(errno.E2BIG):
        load_object(client, read_object(obj), tc(bpf_dir))
    assert tree(bpf_dir) == set()


def test_unknown_pinning_value(client: Client, bpf_dir: Path, build) -> None:
    obj = build("""
struct bpf_elf_map SEC("maps") m = { .type = BPF_MAP_TYPE_ARRAY, .size_key = 4,
    .size_value = 4, .max_elem = 1, .pinning = 77 };
SEC("classifier") int f(struct __sk_buff *skb) {
    __u32 k = 0;
    return bpf_map_lookup_elem(&m, &k) != 0;
}
char _license[] SEC("license") = "GPL";
""")
    with pytest.raises(OSError, match="pinning 77") as e:
        load_object(client, read_object(obj), tc(bpf_dir))
    assert e.value.errno == errno.EINVAL
    assert tree(bpf_dir) == set()


@pytest.mark.parametrize("example", ["tc_classifier", "hash_demux", "redirect_fwd", "vlan",
                                     "tunnel", "perf_events", "tail_call"])
def test_every_example_loads_and_pins(client: Client, bpf_dir: Path,
                                      examples: dict[str, Path], example: str) -> None:
    spec = read_object(examples[example])
    with load_object(client, spec, tc(bpf_dir, prog_type=None if example != "tc_classifier"
                                      else ProgType.SCHED_CLS)) as loaded:
        loaded.pin_programs(client, str(bpf_dir))
        loaded.pin_maps(client, str(bpf_dir / "maps"))
        for prog in spec.programs:
            info = client.obj_get_info_by_fd(loaded.programs[prog.name])
            assert info["name"] == prog.name[:15]
            assert info["bytes_xlated"] == len(prog.insns)
            assert sorted(info["map_ids"]) == sorted(
                {client.obj_get_info_by_fd(loaded.maps[m])["id"] for _, m in prog.relocations})
    for prog in spec.programs:
        assert (bpf_dir / prog.name).exists()
    pinned_maps = {p.name for p in (bpf_dir / "maps").iterdir()}
    assert pinned_maps == set(spec.maps)


def test_perf_event_stream(client: Client, bpf_dir: Path, examples: dict[str, Path]) -> None:
    with load_object(client, read_object(examples["perf_events"]), tc(bpf_dir)) as loaded:
        event_fd = client.perf_event_open(0)
        try:
            client.map_update_elem(loaded.maps["events"], struct.pack("<I", 0),
                                   struct.pack("<I", event_fd))
            for _ in range(3):
                assert client.prog_test_run(loaded.programs["on_write"]).retval == 0
            samples = [read_perf_sample(event_fd) for _ in range(3)]
            events = [struct.unpack("<IIQ", data) for _cpu, _time, data in samples]
        finally:
            os.close(event_fd)
    assert events == [(os.getpid(), os.getpid(), seq) for seq in range(3)]
