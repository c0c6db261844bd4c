"""The public face of the ELF loader: `load_object(path)` gives a Collection of Map and Program
objects by name, as cilium/ebpf's LoadCollection and bcc's BPF(src_file=...) do.

    with load_object("cls.o", prog_type=ProgType.SCHED_CLS) as obj:
        stats = obj.maps["proto_stats"]                 # a Map (bytes; obj.map(name, key=int, ...))
        run = obj.programs["cls_ingress"].test_run(packet)
        obj.programs["cls_ingress"].pin("/sys/fs/bpf/cls_in")

Maps are created or reused from their pins by the object's conventions (tc's PIN_GLOBAL_NS /
PIN_OBJECT_NS under tc's mount, libbpf's LIBBPF_PIN_BY_NAME under pin_root), exactly as the
`bpffs prog load` command does; a failed load leaves no pin behind and no fd open.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bpffs.vm.errors import BpfError
from bpffs.vm.uapi import ProgType

from ..calls import TestRun
from ..maps import FdObject, Map
from ..sync import Client, default_client
from .elf import ObjectSpec, read_object
from .load import LoadedObject, LoadOptions
from .load import load_object as _load


class Program(FdObject):
    """A loaded program: its fd (owned: closed with the Program), test runs and pins. Wraps
    any program fd, such as prog_load's or obj_get's; `Program.pinned(path)` opens a pin."""

    def __init__(self, fd: int, name: str = "", section: str = "",
                 client: Client | None = None, owned: bool = True, log: str = ""):
        self.client = client or default_client()
        self.fd = fd
        self.name = name
        self.section = section
        self.owned = owned
        self.log = log  # the verifier log, when asked for with log_level

    @classmethod
    def pinned(cls, path: str | bytes, client: Client | None = None) -> Program:
        """The program pinned at path (BPF_OBJ_GET); EINVAL if a map is pinned there."""
        client = client or default_client()
        fd = client.obj_get(path)
        try:
            info = client.obj_get_info_by_fd(fd)
            if "bytes_key" in info:
                raise BpfError(errno.EINVAL, f"{os.fsdecode(path)} is a pinned map, not a"
                               " program (use Map.pinned)")
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, info.get("name", ""), client=client)

    def test_run(self, data_in: bytes = b"", repeat: int = 1, ctx_in: bytes | None = None,
                 data_size_out: int = 0, **options: Any) -> TestRun:
        """BPF_PROG_TEST_RUN: retval, data_out, duration (average ns) and the side effects
        the VM recorded (cilium's Program.Run/Test)."""
        return self.client.prog_test_run(self.fd, data_in, repeat, ctx_in, data_size_out,
                                         **options)

    def info(self) -> dict:
        """BPF_OBJ_GET_INFO_BY_FD: id, type, name, tag, ... as bpftool shows them."""
        return self.client.obj_get_info_by_fd(self.fd)

    def __repr__(self) -> str:
        where = f" section {self.section!r}" if self.section else ""
        return f"<Program {self.name!r}{where} fd {self.fd}>"


class Collection:
    """What load_object loaded: `maps` (name -> Map) and `programs` (name -> Program), owned
    together: close() (or the end of a `with` block) closes every fd, while pinned objects
    live on. `obj["name"]` is the map of that name, as bcc's `b["table"]`."""

    def __init__(self, loaded: LoadedObject, client: Client):
        self.client = client
        self.spec: ObjectSpec = loaded.spec
        self.pinned: list[str] = list(loaded.created)  # pins and directories the load made
        self.reused: dict[str, str] = dict(loaded.reused)  # map name -> pin it came from
        self.logs: dict[str, str] = dict(loaded.logs)
        self.maps: dict[str, Map] = {}
        self.programs: dict[str, Program] = {}
        sections = {p.name: p.section for p in loaded.spec.programs}
        try:
            while loaded.maps:
                name, fd = next(iter(loaded.maps.items()))
                self.maps[name] = Map(fd, client=client)
                del loaded.maps[name]  # owned by the Map from here on
            for name, fd in list(loaded.programs.items()):
                self.programs[name] = Program(fd, name, sections.get(name, ""), client,
                                              log=loaded.logs.get(name, ""))
                del loaded.programs[name]
        except BaseException:
            self.close()
            loaded.close()
            raise

    def map(self, name: str, key: Any = None, value: Any = None) -> Map:
        """A new Map on the named map with codecs (key=int, a struct format, a ctypes type
        ...), on its own fd: it stays usable after the Collection is closed."""
        return Map(os.dup(self[name].fd), key, value, self.client)

    def __getitem__(self, name: str) -> Map:
        try:
            return self.maps[name]
        except KeyError:
            raise KeyError(f"{self.spec.path} has no map {name!r} (maps:"
                           f" {', '.join(self.maps) or 'none'})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.maps)

    def pin_maps(self, directory: str | Path) -> None:
        """Pin every map as DIR/<name> (bpftool's `pinmaps DIR`); DIR is created if
        missing."""
        os.makedirs(directory, exist_ok=True)
        for name, m in self.maps.items():
            m.pin(os.path.join(directory, name))

    def pin_programs(self, directory: str | Path) -> None:
        """Pin every program as DIR/<name> (bpftool's `loadall OBJ DIR`)."""
        os.makedirs(directory, exist_ok=True)
        for name, prog in self.programs.items():
            prog.pin(os.path.join(directory, name))

    def close(self) -> None:
        """Close every map and program fd of the object (pins keep theirs alive)."""
        for obj in [*self.maps.values(), *self.programs.values()]:
            obj.close()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Collection {self.spec.path}: maps {sorted(self.maps)}, programs"
                f" {sorted(self.programs)}>")


def load_object(path: str | Path | bytes, *, sections: list[str] | None = None,
                prog_type: ProgType | int | None = None, mount: str | None = None,
                pin_root: str | None = None, log_level: int = 0,
                client: Client | None = None) -> Collection:
    """Load a clang-built BPF object (`clang -O2 -g -target bpf -c`): create or reuse its
    maps, load its programs, fill tc's tail-call prog_arrays.

    path: the object file (or its bytes). sections: load only these program sections (and
    the tail-call targets they need); default all. prog_type: for sections whose name does
    not say it (tc's `type`; e.g. ProgType.SCHED_CLS for `ingress`). mount: tc's bpffs
    mount for PIN_GLOBAL_NS/PIN_OBJECT_NS pins (default: $TC_BPF_MNT, else the connected
    daemon's mount, else /sys/fs/bpf). pin_root: libbpf's pin_root_path for BTF maps with
    pinning LIBBPF_PIN_BY_NAME (default: the mount). log_level 1 keeps each program's
    verifier log in `Program.log`. Raises BpfError naming the map or program that failed
    (a program the verifier refused: VerifierError, its log in `.log`); nothing stays pinned
    then.
    """
    client = client or default_client()
    spec = read_object(path if isinstance(path, bytes) else os.fspath(path))
    options = LoadOptions(mount=mount, pin_root=pin_root,
                          prog_type=None if prog_type is None else ProgType(prog_type),
                          sections=list(sections) if sections is not None else None,
                          log_level=log_level)
    loaded = _load(client, spec, options)
    return Collection(loaded, client)
