"""Reading clang-built objects: programs, section types, the three map conventions, license,
version, relocations — and every kind of bad object, which must fail with EINVAL and a message
naming the problem (never another exception)."""

from __future__ import annotations

import errno
import io
import struct
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from helpers import raises_errno

from bpffs.client.loader import read_object
from bpffs.client.loader.elf import R_BPF_64_64
from bpffs.vm import isa
from bpffs.vm.uapi import BPF_PSEUDO_MAP_FD, MapType, ProgType

SH_LINK_OFFSET = 40  # of sh_link in an Elf64_Shdr


def test_every_example_parses_with_programs_and_a_license(examples: dict[str, Path]) -> None:
    for name, path in examples.items():
        spec = read_object(path)
        assert spec.programs, name
        assert spec.license in ("GPL", "Dual BSD/GPL"), name
        for prog in spec.programs:
            assert len(prog.insns) % isa.INSN_SIZE == 0
            assert prog.insns[-isa.INSN_SIZE] == isa.EXIT, f"{name}:{prog.name} ends in exit"


def test_section_names_give_program_types(examples: dict[str, Path]) -> None:
    types = {p.section: p.prog_type for name in ("tc_classifier", "vlan", "perf_events",
                                                  "redirect_fwd", "tunnel")
             for p in read_object(examples[name]).programs}
    assert types["classifier"] == ProgType.SCHED_CLS
    assert types["classifier/tunnel_get"] == ProgType.SCHED_CLS
    assert types["tc"] == ProgType.SCHED_CLS
    assert types["action/vlan_push"] == ProgType.SCHED_ACT
    assert types["kprobe/sys_write"] == ProgType.KPROBE
    assert types["ingress"] is None  # tc's `sec ingress`: the type comes from the command


def test_several_programs_per_object(examples: dict[str, Path]) -> None:
    spec = read_object(examples["tc_classifier"])
    assert [(p.name, p.section) for p in spec.programs] == [
        ("cls_main", "classifier"), ("cls_ingress", "ingress"), ("cls_egress", "egress")]
    assert spec.program().name == "cls_main"
    assert spec.program("egress").name == "cls_egress"
    with raises_errno(errno.ENOENT):
        spec.program("nosuchsection")


def test_tc_bpf_elf_map_with_pinning(examples: dict[str, Path]) -> None:
    stats = read_object(examples["tc_classifier"]).maps["proto_stats"]
    assert (stats.convention, stats.type, stats.key_size, stats.value_size, stats.max_entries,
            stats.pinning) == ("tc", MapType.ARRAY, 4, 8, 8, 2)
    jmp = read_object(examples["tail_call"]).maps["jmp_table"]
    assert (jmp.type, jmp.tc_id, jmp.pinning) == (MapType.PROG_ARRAY, 1, 2)
    assert read_object(examples["tunnel"]).maps["tunnel_ids"].pinning == 1  # PIN_OBJECT_NS


def test_samples_bpf_map_def(examples: dict[str, Path]) -> None:
    spec = read_object(examples["perf_events"])
    events, seq = spec.maps["events"], spec.maps["seq"]
    assert (events.convention, events.type, events.max_entries) == (
        "map_def", MapType.PERF_EVENT_ARRAY, 2)
    assert (seq.type, seq.key_size, seq.value_size, seq.pinning) == (MapType.ARRAY, 4, 8, 0)


def test_btf_defined_maps(examples: dict[str, Path], build) -> None:
    fwd = read_object(examples["redirect_fwd"]).maps["fwd_target"]
    assert (fwd.convention, fwd.type, fwd.key_size, fwd.value_size, fwd.max_entries,
            fwd.pinning) == ("btf", MapType.ARRAY, 4, 4, 1, 1)
    obj = build("""
struct flow { __u32 saddr, daddr; __u16 sport, dport; __u8 proto; };
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(key_size, sizeof(struct flow));
    __type(value, __u64[3]);
    __uint(max_entries, 4096);
    __uint(map_flags, 1);
} flows SEC(".maps");
SEC("socket") int count(struct __sk_buff *skb) {
    struct flow f = {};
    __u64 *v = bpf_map_lookup_elem(&flows, &f);
    return v ? 1 : 0;
}
char _license[] SEC("license") = "GPL";
""")
    flows = read_object(obj).maps["flows"]
    assert (flows.type, flows.key_size, flows.value_size, flows.max_entries, flows.flags) == (
        MapType.HASH, 16, 24, 4096, 1)


def test_btf_maps_need_btf(build) -> None:
    obj = build("""
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __type(key, __u32); __type(value, __u32);
         __uint(max_entries, 1); } m SEC(".maps");
SEC("socket") int f(struct __sk_buff *skb) { __u32 k = 0; return bpf_map_lookup_elem(&m, &k) != 0; }
char _license[] SEC("license") = "GPL";
""", debug=False)
    with pytest.raises(OSError, match=r"no \.BTF") as e:
        read_object(obj)
    assert e.value.errno == errno.EINVAL


def test_relocations_name_the_map_on_an_lddw(examples: dict[str, Path]) -> None:
    spec = read_object(examples["perf_events"])
    prog = spec.program()
    assert sorted(name for _, name in prog.relocations) == ["events", "seq"]
    code = prog.relocated({"events": 7, "seq": 9})
    for index, name in prog.relocations:
        opcode, regs, _, imm = isa.INSN.unpack_from(code, index * isa.INSN_SIZE)
        assert opcode == isa.LD_IMM64
        assert regs >> 4 == BPF_PSEUDO_MAP_FD
        assert imm == {"events": 7, "seq": 9}[name]
        assert isa.INSN.unpack_from(code, (index + 1) * isa.INSN_SIZE)[3] == 0
    # only the relocated slots changed
    changed = {i // isa.INSN_SIZE for i in range(len(code)) if code[i] != prog.insns[i]}
    assert changed <= {i for i, _ in prog.relocations}


def test_license_and_version(examples: dict[str, Path], build) -> None:
    assert read_object(examples["perf_events"]).kern_version == 0x040400
    assert read_object(examples["redirect_fwd"]).license == "Dual BSD/GPL"
    obj = build('SEC("socket") int f(struct __sk_buff *skb) { return 0; }')
    assert read_object(obj).license is None  # no license section


def test_object_id_is_sha1_of_the_file(examples: dict[str, Path]) -> None:
    import hashlib

    path = examples["tunnel"]
    assert read_object(path).uid == hashlib.sha1(path.read_bytes()).hexdigest()


# -- bad objects --------------------------------------------------------------------------------
def _expect_einval(data: bytes, match: str | None = None) -> None:
    with pytest.raises(OSError, match=match) as e:
        read_object(data, "bad.o")
    assert e.value.errno == errno.EINVAL, e.value


def test_not_an_elf_file() -> None:
    _expect_einval(b"", "not an ELF")
    _expect_einval(b"#!/bin/sh\necho hi\n", "not an ELF")


def test_missing_file(tmp_path: Path) -> None:
    with raises_errno(errno.ENOENT):
        read_object(tmp_path / "missing.o")


def test_every_truncation_fails_cleanly(examples: dict[str, Path]) -> None:
    data = examples["tc_classifier"].read_bytes()
    for cut in range(0, len(data), 97):
        with pytest.raises(OSError) as e:
            read_object(data[:cut], "cut.o")
        assert e.value.errno == errno.EINVAL, (cut, e.value)


def test_corrupt_bytes_never_crash(examples: dict[str, Path]) -> None:
    """Flipping bytes anywhere either still parses or fails with EINVAL: no other exception.
    Every byte of the ELF header and of the section header table is flipped (the structure
    pyelftools follows); elsewhere every 13th byte, whose place depends on the build path."""
    data = examples["perf_events"].read_bytes()
    elf = ELFFile(io.BytesIO(data))
    table = range(elf["e_shoff"], elf["e_shoff"] + elf["e_shnum"] * elf["e_shentsize"])
    positions = sorted({*range(elf["e_ehsize"]), *table, *range(0, len(data), 13)})
    for pos in positions:
        corrupt = bytearray(data)
        corrupt[pos] ^= 0xA5
        try:
            read_object(bytes(corrupt), "corrupt.o")
        except OSError as e:
            assert e.errno == errno.EINVAL, (pos, e)


@pytest.mark.parametrize("link", ["past the table", "itself", "0xffffffff"])
def test_section_linking_to_no_other_section(examples: dict[str, Path], link: str) -> None:
    """A symbol or relocation table whose sh_link names no other section is EINVAL: pyelftools
    before 0.32 raised TypeError there, or recursed without end on a self-link."""
    data = examples["perf_events"].read_bytes()
    elf = ELFFile(io.BytesIO(data))
    shoff, size, count = elf["e_shoff"], elf["e_shentsize"], elf["e_shnum"]
    linked = [i for i, sec in enumerate(elf.iter_sections())
              if sec["sh_type"] in ("SHT_SYMTAB", "SHT_REL")]
    assert linked
    for index in linked:
        value = {"past the table": count, "itself": index, "0xffffffff": 0xFFFFFFFF}[link]
        corrupt = bytearray(data)
        struct.pack_into("<I", corrupt, shoff + index * size + SH_LINK_OFFSET, value)
        _expect_einval(bytes(corrupt), "links to section")


def test_object_for_another_machine(tmp_path: Path) -> None:
    import subprocess

    src = tmp_path / "x86.c"
    src.write_text("int f(void) { return 0; }\n")
    subprocess.run(["clang", "-O2", "-c", str(src), "-o", str(tmp_path / "x86.o")], check=True)
    _expect_einval((tmp_path / "x86.o").read_bytes(), "not BPF")


def _relocation_entry(data: bytes, section: str) -> int:
    """File offset of the first REL entry of a relocation section."""

    elf = ELFFile(io.BytesIO(data))
    return elf.get_section_by_name(section)["sh_offset"]


def test_unknown_relocation_type(examples: dict[str, Path]) -> None:
    data = bytearray(examples["tc_classifier"].read_bytes())
    entry = _relocation_entry(bytes(data), ".relingress")
    assert data[entry + 8] == R_BPF_64_64  # r_info's low byte is the type
    data[entry + 8] = 10  # R_BPF_64_32
    _expect_einval(bytes(data), "unsupported relocation R_BPF_64_32")


def test_relocation_on_a_non_lddw_instruction(examples: dict[str, Path]) -> None:
    data = bytearray(examples["tc_classifier"].read_bytes())
    entry = _relocation_entry(bytes(data), ".relingress")
    (offset,) = struct.unpack_from("<Q", data, entry)
    struct.pack_into("<Q", data, entry, offset - isa.INSN_SIZE)
    _expect_einval(bytes(data), "non-lddw")


def test_relocation_to_global_data(build) -> None:
    obj = build("""
__u32 counter;
SEC("socket") int f(struct __sk_buff *skb) { return counter; }
char _license[] SEC("license") = "GPL";
""")
    _expect_einval(obj.read_bytes(), "not a map")


def test_functions_left_in_text(build) -> None:
    obj = build("""
static __attribute__((noinline)) int helper(int x) { return x * 3; }
SEC("socket") int f(struct __sk_buff *skb) { return helper(skb->len); }
char _license[] SEC("license") = "GPL";
""")
    _expect_einval(obj.read_bytes(), "bpf-to-bpf calls")


def test_map_definitions_larger_than_bpf_elf_map(build) -> None:
    obj = build("""
struct big { __u32 f[11]; };
struct big SEC("maps") m = { { 2, 4, 4, 1 } };
SEC("socket") int f(struct __sk_buff *skb) { __u32 k = 0; return bpf_map_lookup_elem(&m, &k) != 0; }
char _license[] SEC("license") = "GPL";
""")
    _expect_einval(obj.read_bytes(), "future version")


def test_map_definitions_of_ragged_size(build) -> None:
    obj = build("""
struct odd { __u32 f[4]; __u8 g[2]; } __attribute__((packed));
struct odd SEC("maps") m = { { 2, 4, 4, 1 } };
SEC("socket") int f(struct __sk_buff *skb) { __u32 k = 0; return bpf_map_lookup_elem(&m, &k) != 0; }
char _license[] SEC("license") = "GPL";
""")
    _expect_einval(obj.read_bytes(), "multiples of 4")


def test_license_without_terminator(examples: dict[str, Path]) -> None:

    data = bytearray(examples["hash_demux"].read_bytes())
    sec = ELFFile(io.BytesIO(bytes(data))).get_section_by_name("license")
    start, size = sec["sh_offset"], sec["sh_size"]
    data[start:start + size] = b"X" * size
    _expect_einval(bytes(data), "NUL-terminated")


def test_section_without_a_global_function_is_one_program(build) -> None:
    obj = build("""
static int __attribute__((used)) lb(struct __sk_buff *skb) SEC("cls-lb");
static int lb(struct __sk_buff *skb) { return TC_ACT_OK; }
char _license[] SEC("license") = "GPL";
""")
    (prog,) = read_object(obj).programs
    assert (prog.name, prog.section, prog.prog_type) == ("cls_lb", "cls-lb", None)
