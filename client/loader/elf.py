"""Reading a clang-built BPF object (`clang -O2 -target bpf -c`): its programs, maps, license
and kernel version, and the map relocations of each program — without loading anything.

Conventions understood (see /work/shared/reference/ecosystem.md §3):
- Programs: every executable section other than .text; one program per global function in it
  (or the whole section when it has none). The section name gives the program type where the
  conventions say so (socket*, classifier*/tc*, action*, kprobe/*); a section named `ID/KEY`
  is a tc tail-call target, inserted at KEY of the prog_array whose tc id is ID.
- Maps in `maps`: iproute2's struct bpf_elf_map (type, size_key, size_value, max_elem, flags,
  id, pinning, inner_id, inner_idx) or samples/bpf's struct bpf_map_def (its first five
  fields); the entry size is the section size / the number of map symbols, shorter entries
  are zero-extended, as tc does.
- Maps in `.maps`: libbpf's BTF-defined maps (read from .BTF).
- Relocations: R_BPF_64_64 on an lddw naming a map symbol (or the maps section plus the
  instruction's immediate as addend).
"""

from __future__ import annotations

import errno
import hashlib
import io
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import StringTableSection, SymbolTableSection

from bpffs.vm import isa
from bpffs.vm.errors import BpfError
from bpffs.vm.uapi import BPF_OBJ_NAME_LEN, BPF_PSEUDO_MAP_FD, ProgType

from .btf import Btf

EM_BPF = 247
SHF_EXECINSTR = 0x4
R_BPF_64_64 = 1
RELOCATION_NAMES = {0: "R_BPF_NONE", 1: "R_BPF_64_64", 2: "R_BPF_64_ABS64",
                    3: "R_BPF_64_ABS32", 4: "R_BPF_64_NODYLD32", 10: "R_BPF_64_32"}
LEGACY_MAPS_SECTION = "maps"
BTF_MAPS_SECTION = ".maps"
LICENSE_MAX = 128  # tc's limit on the license string
ELF_MAP_FIELDS = ("type", "key_size", "value_size", "max_entries", "flags", "id", "pinning",
                  "inner_id", "inner_idx")
MAP_DEF_MIN_SIZE = 5 * 4  # samples/bpf's bpf_map_def; also tc's minimum
MAPS_MAX = 64  # tc's ELF_MAX_MAPS
# Section types whose sh_link names another section (a string or symbol table) that pyelftools
# opens while listing sections.
LINKED_SECTION_TYPES = frozenset({"SHT_SYMTAB", "SHT_DYNSYM", "SHT_REL", "SHT_RELA",
                                  "SHT_SYMTAB_SHNDX", "SHT_SUNW_syminfo", "SHT_GNU_verneed",
                                  "SHT_GNU_verdef", "SHT_GNU_versym", "SHT_DYNAMIC",
                                  "SHT_HASH", "SHT_GNU_HASH"})


class Pinning:
    """Values of bpf_elf_map.pinning (tc) and of __uint(pinning, ...) (libbpf)."""

    NONE = 0
    OBJECT_NS = 1  # tc: MOUNT/tc/<object sha1>/NAME
    GLOBAL_NS = 2  # tc: MOUNT/tc/globals/NAME
    BY_NAME = 1  # libbpf (BTF maps): PIN_ROOT/NAME


# Section name prefix -> program type (libbpf's SEC_DEF table and tc's defaults).
SECTION_TYPES: list[tuple[str, ProgType]] = [
    ("socket", ProgType.SOCKET_FILTER),
    ("classifier", ProgType.SCHED_CLS),
    ("tc", ProgType.SCHED_CLS),
    ("action", ProgType.SCHED_ACT),
    ("kprobe/", ProgType.KPROBE),
    ("kretprobe/", ProgType.KPROBE),
]
TAIL_CALL_SECTION = re.compile(r"^(\d+)/(\d+)$")
# Words for a program type on the command line: the section prefixes and bpftool's type names.
PROG_TYPE_WORDS: dict[str, ProgType] = {
    "socket": ProgType.SOCKET_FILTER, "socket_filter": ProgType.SOCKET_FILTER,
    "kprobe": ProgType.KPROBE, "classifier": ProgType.SCHED_CLS, "tc": ProgType.SCHED_CLS,
    "sched_cls": ProgType.SCHED_CLS, "action": ProgType.SCHED_ACT,
    "sched_act": ProgType.SCHED_ACT,
}


def type_of_section(section: str) -> ProgType | None:
    """The program type a section name implies by libbpf's and tc's conventions, or None."""
    for prefix, prog_type in SECTION_TYPES:
        if section.startswith(prefix):
            return prog_type
    return None


@dataclass
class MapSpec:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0
    pinning: int = Pinning.NONE
    tc_id: int = 0  # bpf_elf_map.id: names the map for tc's ID/KEY tail-call sections
    convention: str = "tc"  # "tc" (bpf_elf_map), "map_def" (bpf_map_def) or "btf"

    @property
    def kernel_name(self) -> str:
        """The name as the kernel keeps it (BPF_OBJ_NAME_LEN - 1 characters)."""
        return self.name[:BPF_OBJ_NAME_LEN - 1]


@dataclass
class ProgramSpec:
    name: str  # the function's name
    section: str
    insns: bytes
    prog_type: ProgType | None  # from the section name; None when it says nothing
    relocations: list[tuple[int, str]] = field(default_factory=list)  # (insn index, map name)
    tail_call: tuple[int, int] | None = None  # tc's ID/KEY section: (map tc id, key)

    @property
    def kernel_name(self) -> str:
        """The name as the kernel keeps it (BPF_OBJ_NAME_LEN - 1 characters)."""
        return self.name[:BPF_OBJ_NAME_LEN - 1]

    def relocated(self, map_fds: dict[str, int]) -> bytes:
        """The instructions with each map reference made an lddw of the map's fd
        (src_reg BPF_PSEUDO_MAP_FD), as libbpf and tc do before BPF_PROG_LOAD."""
        code = bytearray(self.insns)
        for index, map_name in self.relocations:
            off = index * isa.INSN_SIZE
            code[off + 1] = (code[off + 1] & isa.DST_MASK) | (BPF_PSEUDO_MAP_FD << isa.SRC_SHIFT)
            struct.pack_into("<i", code, off + 4, map_fds[map_name])
            struct.pack_into("<i", code, off + 12, 0)
        return bytes(code)


@dataclass
class ObjectSpec:
    path: str
    license: str | None  # None: the object has no license section
    kern_version: int
    uid: str  # SHA-1 of the whole file: tc's object id (PIN_OBJECT_NS directory)
    maps: dict[str, MapSpec]
    programs: list[ProgramSpec]

    def program(self, section: str | None = None) -> ProgramSpec:
        """The program of a section (tc's `sec NAME`); default: the first program."""
        if not self.programs:
            raise BpfError(errno.ENOENT, f"{self.path}: the object has no programs")
        if section is None:  # the first program that is not a tail-call target
            return next((p for p in self.programs if not p.tail_call), self.programs[0])
        found = [p for p in self.programs if p.section == section or p.name == section]
        if not found:
            raise BpfError(errno.ENOENT, f"{self.path}: no program section '{section}'"
                           f" (sections: {', '.join(p.section for p in self.programs)})")
        return found[0]


def _bad(path: str, message: str) -> BpfError:
    return BpfError(errno.EINVAL, f"{path}: {message}")


def read_object(source: str | Path | bytes, path: str | None = None) -> ObjectSpec:
    """Parse a BPF object from a file name or its bytes."""
    if isinstance(source, bytes):
        data, path = source, path or "<object>"
    else:
        path = str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise BpfError(e.errno or errno.EIO, f"{path}: {e.strerror}") from None
    try:
        return _Reader(data, path).read()
    except (ELFError, struct.error, ValueError, IndexError, KeyError, AssertionError,
            UnicodeDecodeError, OverflowError, ZeroDivisionError) as e:
        # pyelftools reports truncation and corruption with these; say which object.
        raise _bad(path, f"not a valid ELF object ({type(e).__name__}: {e})") from None


class _Reader:
    def __init__(self, data: bytes, path: str):
        self.data, self.path = data, path
        if data[:4] != b"\x7fELF":
            raise _bad(path, "not an ELF file (bad magic)")
        self.elf = ELFFile(io.BytesIO(data))
        if self.elf["e_machine"] not in ("EM_BPF", EM_BPF):
            raise _bad(path, f"ELF machine is {self.elf['e_machine']}, not BPF (build with"
                       " clang -target bpf)")
        if not self.elf.little_endian:
            raise _bad(path, "big-endian BPF objects are not supported")
        self._check_section_links()
        self.sections = list(self.elf.iter_sections())
        for sec in self.sections:
            if sec["sh_type"] != "SHT_NOBITS" and sec["sh_offset"] + sec["sh_size"] > len(data):
                raise _bad(path, f"section '{sec.name}' extends past the end of the file"
                           " (truncated?)")
        symtabs = [s for s in self.sections if isinstance(s, SymbolTableSection)]
        if not symtabs:
            raise _bad(path, "the object has no symbol table")
        if not isinstance(symtabs[0].stringtable, StringTableSection):
            # pyelftools before 0.32 fails on this with an AttributeError mid-iteration
            raise _bad(path, "the symbol table's sh_link is not a string table")
        self.symbols = list(symtabs[0].iter_symbols())

    def _check_section_links(self) -> None:
        """Refuse a section whose sh_link names no other section before pyelftools follows it:
        releases before 0.32 fail there with TypeError, or recurse without end on a self-link."""
        shoff, size, count = (self.elf[k] for k in ("e_shoff", "e_shentsize", "e_shnum"))
        if self.elf["e_shstrndx"] >= max(count, 1):
            raise _bad(self.path, f"e_shstrndx {self.elf['e_shstrndx']} names no section")
        for index in range(count):
            raw = self.data[shoff + index * size:shoff + (index + 1) * size]
            if len(raw) < size:
                raise _bad(self.path, "the section header table extends past the end of the"
                           " file (truncated?)")
            header = self.elf.structs.Elf_Shdr.parse(raw)
            if header["sh_type"] in LINKED_SECTION_TYPES and not (
                    0 < header["sh_link"] < count and header["sh_link"] != index):
                raise _bad(self.path, f"section {index} ({header['sh_type']}) links to section"
                           f" {header['sh_link']}, which is not another section")

    def _section(self, name: str):
        return next((s for s in self.sections if s.name == name), None)

    def read(self) -> ObjectSpec:
        maps, map_at = self._maps()
        programs = self._programs(maps, map_at)
        return ObjectSpec(self.path, self._license(), self._version(),
                          hashlib.sha1(self.data).hexdigest(), maps, programs)

    # -- license and version ----------------------------------------------------------------
    def _license(self) -> str | None:
        sec = self._section("license")
        if sec is None:
            return None
        raw = sec.data()
        if b"\0" not in raw[:LICENSE_MAX]:
            raise _bad(self.path, f"the license section is not a NUL-terminated string of at"
                       f" most {LICENSE_MAX} bytes")
        return raw[:raw.index(b"\0")].decode(errors="replace")

    def _version(self) -> int:
        sec = self._section("version")
        if sec is None:
            return 0
        if sec.data_size != 4:
            raise _bad(self.path, f"the version section has {sec.data_size} bytes, not 4")
        return struct.unpack("<I", sec.data())[0]

    # -- maps ----------------------------------------------------------------------------------
    def _symbols_in(self, index: int) -> list:
        return [s for s in self.symbols if s["st_shndx"] == index and s.name
                and s["st_info"]["type"] not in ("STT_SECTION", "STT_FILE")]

    def _maps(self) -> tuple[dict[str, MapSpec], dict[tuple[int, int], str]]:
        maps: dict[str, MapSpec] = {}
        at: dict[tuple[int, int], str] = {}  # (section index, offset) -> map name
        for index, sec in enumerate(self.sections):
            if sec.name == LEGACY_MAPS_SECTION:
                self._legacy_maps(index, sec, maps, at)
            elif sec.name == BTF_MAPS_SECTION:
                self._btf_maps(index, maps, at)
        return maps, at

    def _legacy_maps(self, index: int, sec, maps: dict, at: dict) -> None:
        symbols = sorted(self._symbols_in(index), key=lambda s: s["st_value"])
        if not symbols:
            return
        if len(symbols) > MAPS_MAX:
            raise _bad(self.path, f"{len(symbols)} maps in '{sec.name}', at most {MAPS_MAX}")
        size = sec.data_size // len(symbols)
        if size % 4 or size < MAP_DEF_MIN_SIZE or size * len(symbols) != sec.data_size:
            raise _bad(self.path, f"map definitions of {sec.data_size} bytes for"
                       f" {len(symbols)} maps: entries must be equal multiples of 4 bytes of at"
                       f" least {MAP_DEF_MIN_SIZE}")
        if size > len(ELF_MAP_FIELDS) * 4:
            raise _bad(self.path, f"map definitions of {size} bytes are larger than struct"
                       f" bpf_elf_map ({len(ELF_MAP_FIELDS) * 4} bytes): from a future version?")
        raw = sec.data()
        convention = "map_def" if size == MAP_DEF_MIN_SIZE else "tc"
        for sym in symbols:
            offset = sym["st_value"]
            if offset % size or offset + size > len(raw):
                raise _bad(self.path, f"map symbol '{sym.name}' at offset {offset} is not at"
                           f" an entry boundary of '{sec.name}'")
            values = struct.unpack_from(f"<{size // 4}I", raw, offset)
            fields = dict(zip(ELF_MAP_FIELDS, values + (0,) * (len(ELF_MAP_FIELDS) - len(values)),
                              strict=True))
            self._add_map(maps, at, (index, offset), MapSpec(
                sym.name, fields["type"], fields["key_size"], fields["value_size"],
                fields["max_entries"], fields["flags"], fields["pinning"], fields["id"],
                convention))

    def _btf_maps(self, index: int, maps: dict, at: dict) -> None:
        btf_sec = self._section(".BTF")
        if btf_sec is None:
            raise _bad(self.path, "the object has a .maps section but no .BTF (build with -g)")
        btf = Btf(btf_sec.data())
        offsets = {s.name: s["st_value"] for s in self._symbols_in(index)}
        for name, type_id in btf.datasec(BTF_MAPS_SECTION):
            if name not in offsets:
                raise _bad(self.path, f"BTF map '{name}' has no symbol in .maps")
            attrs = btf.map_attributes(name, type_id)
            unknown = set(attrs) - {"type", "key_size", "value_size", "max_entries",
                                    "map_flags", "pinning", "numa_node"}
            if unknown:
                raise _bad(self.path, f"map '{name}': unsupported attributes"
                           f" {', '.join(sorted(unknown))}")
            for needed in ("type", "key_size", "value_size", "max_entries"):
                if needed not in attrs:
                    raise _bad(self.path, f"map '{name}' does not define {needed}")
            self._add_map(maps, at, (index, offsets[name]), MapSpec(
                name, attrs["type"], attrs["key_size"], attrs["value_size"],
                attrs["max_entries"], attrs.get("map_flags", 0), attrs.get("pinning", 0),
                convention="btf"))

    def _add_map(self, maps: dict, at: dict, where: tuple[int, int], spec: MapSpec) -> None:
        if spec.name in maps:
            raise _bad(self.path, f"two maps are named '{spec.name}'")
        maps[spec.name] = spec
        at[where] = spec.name

    # -- programs ------------------------------------------------------------------------------
    def _programs(self, maps: dict[str, MapSpec],
                  map_at: dict[tuple[int, int], str]) -> list[ProgramSpec]:
        relocations = {s["sh_info"]: s for s in self.sections
                       if isinstance(s, RelocationSection)}
        programs = []
        for index, sec in enumerate(self.sections):
            if not sec["sh_flags"] & SHF_EXECINSTR or sec.data_size == 0:
                continue
            if sec.name == ".text":
                raise _bad(self.path, ".text holds code: bpf-to-bpf calls (functions that are"
                           " not inlined) are not supported; mark them __always_inline")
            if sec.data_size % isa.INSN_SIZE:
                raise _bad(self.path, f"section '{sec.name}' is {sec.data_size} bytes, not a"
                           " whole number of instructions")
            code = sec.data()
            refs = self._relocations(sec, relocations.get(index), code, map_at)
            tail = TAIL_CALL_SECTION.match(sec.name)
            for name, start, end in self._functions(index, sec):
                programs.append(ProgramSpec(
                    name, sec.name, code[start:end], type_of_section(sec.name),
                    [((off - start) // isa.INSN_SIZE, m) for off, m in refs if start <= off < end],
                    (int(tail.group(1)), int(tail.group(2))) if tail else None))
        return programs

    def _functions(self, index: int, sec) -> list[tuple[str, int, int]]:
        """(name, start, end) of each global function in the section; the whole section,
        named after its first symbol, when it has none."""
        funcs = sorted((s for s in self._symbols_in(index)
                        if s["st_info"]["type"] == "STT_FUNC"
                        and s["st_info"]["bind"] == "STB_GLOBAL"), key=lambda s: s["st_value"])
        if not funcs:
            return [(re.sub(r"[^A-Za-z0-9_]", "_", sec.name), 0, sec.data_size)]
        out = []
        for sym in funcs:
            start, size = sym["st_value"], sym["st_size"] or sec.data_size - sym["st_value"]
            if start % isa.INSN_SIZE or start + size > sec.data_size:
                raise _bad(self.path, f"function '{sym.name}' lies outside section"
                           f" '{sec.name}'")
            out.append((sym.name, start, start + size))
        return out

    def _relocations(self, sec, rel, code: bytes,
                     map_at: dict[tuple[int, int], str]) -> list[tuple[int, str]]:
        if rel is None:
            return []
        out = []
        for r in rel.iter_relocations():
            kind, offset = r["r_info_type"], r["r_offset"]
            where = f"section '{sec.name}' instruction {offset // isa.INSN_SIZE}"
            if kind != R_BPF_64_64:
                raise _bad(self.path, f"unsupported relocation"
                           f" {RELOCATION_NAMES.get(kind, f'type {kind}')} at {where}"
                           " (only map references, R_BPF_64_64, are supported)")
            if offset % isa.INSN_SIZE or offset + 2 * isa.INSN_SIZE > len(code):
                raise _bad(self.path, f"relocation at offset {offset} of '{sec.name}' is"
                           " outside its instructions")
            if code[offset] != isa.LD_IMM64:
                raise _bad(self.path, f"relocation for a non-lddw instruction"
                           f" (opcode {code[offset]:#04x}) at {where}: compiler bug?")
            sym = self.symbols[r["r_info_sym"]]
            addend = struct.unpack_from("<i", code, offset + 4)[0]
            map_name = map_at.get((sym["st_shndx"], sym["st_value"] + addend))
            if map_name is None:
                target = sym.name or self._section_name(sym["st_shndx"])
                raise _bad(self.path, f"{where} refers to '{target}', which is not a map"
                           " (global variables and .rodata are not supported)")
            out.append((offset, map_name))
        return out

    def _section_name(self, index: int) -> str:
        return self.sections[index].name if isinstance(index, int) and index < len(
            self.sections) else str(index)
