"""Loading an ObjectSpec into bpffsd: maps created or reused from their pins (tc's and
libbpf's pinning conventions), programs relocated and loaded, tc's ID/KEY tail-call sections
put into their prog_array, optional pins of programs and maps — and, when any step fails,
everything this load pinned is unpinned again (no stray pins) and every fd closed.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from bpffs import paths
from bpffs.vm.errors import BpfError, VerifierError
from bpffs.vm.uapi import MAP_TYPE_NAMES, MapType, ProgType

from ..sync import Client
from .elf import MapSpec, ObjectSpec, Pinning, ProgramSpec

TC_DIR = "tc"
TC_GLOBALS = "globals"
TC_LINKS = ("xdp", "ip")  # symlinks to MOUNT/tc/ that tc creates beside it
IPROUTE2_PINNING = "/etc/iproute2/bpf_pinning"  # "ID subpath" lines: tc's custom pinning values
_U32 = struct.Struct("<I")
# Fields compared before reusing a pinned map (libbpf's map_is_reuse_compat, tc's fdinfo check).
_REUSE_FIELDS = (("type", "type"), ("key_size", "bytes_key"), ("value_size", "bytes_value"),
                 ("max_entries", "max_entries"), ("flags", "flags"))


def bpffsd_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """The bpffsd (FUSE) mounts this process sees, in mount order: tc looks for its bpffs the
    same way, in /proc/mounts."""
    found = []
    try:
        with open(mountinfo, "rb") as f:
            for line in f:
                fields = line.split()
                try:
                    fstype = fields[fields.index(b"-") + 1]
                except (ValueError, IndexError):
                    continue
                if fstype == b"fuse.bpffsd":
                    found.append(_unescape(fields[4]))
    except OSError:
        return []
    return found


def _unescape(field: bytes) -> str:
    """A mountinfo path: spaces, tabs, newlines and backslashes are octal escapes."""
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field))


def tc_mount(client: Client | None = None) -> str:
    """The bpffs tc pins under, found as tc finds it: $TC_BPF_MNT; else the connected
    daemon's mount in this process's mount namespace (one of the bpffsd mounts in
    /proc/self/mountinfo that the daemon reports, or without a client the first bpffsd
    mount there); else /sys/fs/bpf."""
    env = os.environ.get("TC_BPF_MNT")
    if env:
        return env
    mounts = bpffsd_mounts()
    if client is not None and mounts:
        try:
            instances = client.status().get("instances") or []
        except BpfError:
            instances = []
        # Compared as strings, never stat'ed: another bpffsd mount here may hang (a stopped
        # daemon), and a stat of it would hang with it.
        served = {os.path.normpath(m) for inst in instances for m in inst.get("mounts", ())
                  if isinstance(m, str)}
        for mount in mounts:
            if os.path.normpath(mount) in served:
                return mount
        return paths.SYSTEM_MOUNT if paths.SYSTEM_MOUNT in mounts else mounts[0]
    if mounts and paths.SYSTEM_MOUNT not in mounts:
        return mounts[0]
    return paths.SYSTEM_MOUNT


@dataclass
class LoadOptions:
    """How to load an object (the CLI's `type`, `section`, `verbose`; tc's mount)."""

    mount: str | None = None  # tc's MOUNT (default tc_mount())
    pin_root: str | None = None  # libbpf's pin_root_path for BTF maps (default: mount)
    prog_type: ProgType | None = None  # for sections whose name says nothing (tc's `type`)
    sections: list[str] | None = None  # load only these (tail-call targets come along)
    log_level: int = 0  # 1: keep the verifier log of every program (`verbose`)

    @property
    def tc_root(self) -> str:
        """MOUNT/tc, where tc's PIN_GLOBAL_NS and PIN_OBJECT_NS pins go."""
        return os.path.join(self.mount or tc_mount(), TC_DIR)


@dataclass
class LoadedObject:
    """The raw result of loader.load.load_object: fds by name (the public load_object wraps
    them in Map and Program objects)."""

    spec: ObjectSpec
    maps: dict[str, int] = field(default_factory=dict)  # name -> fd
    programs: dict[str, int] = field(default_factory=dict)  # program name -> fd
    logs: dict[str, str] = field(default_factory=dict)  # program name -> verifier log
    created: list[str] = field(default_factory=list)  # pins and directories this load made
    reused: dict[str, str] = field(default_factory=dict)  # map name -> pin it came from

    def close(self) -> None:
        """Close every fd of the load (pins keep their objects)."""
        for fd in [*self.maps.values(), *self.programs.values()]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.maps.clear()
        self.programs.clear()

    def __enter__(self) -> LoadedObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pin_programs(self, client: Client, directory: str) -> None:
        """bpftool's loadall: each program pinned as DIR/<program name>."""
        for name, fd in self.programs.items():
            self.pin(client, fd, os.path.join(directory, name))

    def pin_maps(self, client: Client, directory: str) -> None:
        """bpftool's `pinmaps DIR`: each map pinned as DIR/<map name>."""
        self.mkdirs(directory)
        for name, fd in self.maps.items():
            self.pin(client, fd, os.path.join(directory, name))

    def pin(self, client: Client, fd: int, path: str) -> None:
        """Pin fd at path, remembering it for the roll back."""
        client.obj_pin(fd, path)
        self.created.append(path)

    def mkdirs(self, path: str, mode: int = 0o755) -> None:
        """Create path and its missing parents, remembering them for the roll back."""
        missing = []
        p = Path(path)
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            try:
                os.mkdir(d, mode)
            except FileExistsError:
                continue  # another loader made it meanwhile
            except OSError as e:
                raise BpfError(e.errno or errno.EIO, f"mkdir {d}: {e.strerror}") from None
            self.created.append(str(d))

    def roll_back(self) -> None:
        """Undo every pin and directory this load created (newest first) and close the fds."""
        for path in reversed(self.created):
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    os.rmdir(path)
                else:
                    os.unlink(path)
            except OSError:
                pass  # a directory someone else has filled meanwhile stays
        self.created.clear()
        self.close()


def load_object(client: Client, spec: ObjectSpec, options: LoadOptions | None = None
                ) -> LoadedObject:
    """Create (or reuse) the maps and load the programs of an object. On failure nothing this
    call pinned remains and its fds are closed; the error says which map or program failed."""
    options = options or LoadOptions()
    if options.mount is None and any(m.pinning for m in spec.maps.values()):
        options = dataclasses.replace(options, mount=tc_mount(client))  # asked once
    loaded = LoadedObject(spec)
    programs = _selected(spec, options)
    types = [_program_type(spec, prog, options) for prog in programs]
    try:
        used = {name for p in programs for _, name in p.relocations}
        for name, map_spec in spec.maps.items():
            if name in used or options.sections is None:
                loaded.maps[name] = _open_map(client, spec, map_spec, options, loaded)
        for prog, prog_type in zip(programs, types, strict=True):
            _load_program(client, spec, prog, prog_type, options, loaded)
        _fill_tail_calls(client, spec, programs, loaded)
    except BaseException:
        loaded.roll_back()
        raise
    return loaded


def _selected(spec: ObjectSpec, options: LoadOptions) -> list[ProgramSpec]:
    if options.sections is None:
        return list(spec.programs)
    chosen = [spec.program(s) for s in options.sections]
    # tc loads the object's tail-call sections with the program that jumps to them.
    return chosen + [p for p in spec.programs if p.tail_call and p not in chosen]


def _program_type(spec: ObjectSpec, prog: ProgramSpec, options: LoadOptions) -> ProgType:
    if options.prog_type is not None:
        return options.prog_type
    if prog.prog_type is not None:
        return prog.prog_type
    if prog.tail_call:  # a tail-call target has the type of the programs that jump to it
        types = {p.prog_type for p in spec.programs if p.prog_type is not None}
        if len(types) == 1:
            return types.pop()
    raise BpfError(errno.EINVAL, f"{spec.path}: cannot tell the program type of section"
                   f" '{prog.section}' from its name: give `type` (socket, classifier,"
                   " action, kprobe; prog_type= from Python)")


# -- maps ---------------------------------------------------------------------------------------
def pin_path(spec: ObjectSpec, map_spec: MapSpec, options: LoadOptions) -> str | None:
    """Where a map is pinned by its definition's convention, or None when it is not."""
    if not map_spec.pinning:
        return None
    if map_spec.convention == "btf":
        if map_spec.pinning != Pinning.BY_NAME:
            raise BpfError(errno.EINVAL, f"map '{map_spec.name}': unknown pinning"
                           f" {map_spec.pinning} (LIBBPF_PIN_NONE 0, LIBBPF_PIN_BY_NAME 1)")
        return os.path.join(options.pin_root or options.mount or tc_mount(), map_spec.name)
    if map_spec.pinning == Pinning.GLOBAL_NS:
        return os.path.join(options.tc_root, TC_GLOBALS, map_spec.name)
    if map_spec.pinning == Pinning.OBJECT_NS:
        return os.path.join(options.tc_root, spec.uid, map_spec.name)
    subpath = _custom_pinning(map_spec.pinning)
    if subpath is None:
        raise BpfError(errno.EINVAL, f"map '{map_spec.name}': pinning {map_spec.pinning} is"
                       f" neither PIN_OBJECT_NS (1), PIN_GLOBAL_NS (2) nor listed in"
                       f" {IPROUTE2_PINNING}")
    return os.path.join(options.mount or tc_mount(), subpath.strip("/"), map_spec.name)


def _custom_pinning(value: int) -> str | None:
    try:
        with open(IPROUTE2_PINNING) as f:
            for line in f:
                words = line.split("#", 1)[0].split()
                if len(words) == 2 and words[0].isdigit() and int(words[0]) == value:
                    return words[1]
    except OSError:
        return None
    return None


def _open_map(client: Client, spec: ObjectSpec, m: MapSpec, options: LoadOptions,
              loaded: LoadedObject) -> int:
    path = pin_path(spec, m, options)
    for _attempt in range(2):  # a concurrent loader may pin the same map between our steps
        if path is not None:
            fd = _reuse(client, m, path)
            if fd is not None:
                loaded.reused[m.name] = path
                return fd
        fd = _create(client, spec, m)
        if path is None:
            return fd
        if m.convention == "tc":
            _tc_hierarchy(options, loaded)
        loaded.mkdirs(os.path.dirname(path), 0o700 if m.convention == "tc" else 0o755)
        try:
            loaded.pin(client, fd, path)
            return fd
        except BpfError as e:
            os.close(fd)
            if e.errno != errno.EEXIST:
                raise BpfError(e.errno, f"pinning map '{m.name}' at {path}: {e.strerror}"
                               ) from None
    raise BpfError(errno.EEXIST, f"map '{m.name}': {path} keeps changing; giving up")


def _create(client: Client, spec: ObjectSpec, m: MapSpec) -> int:
    try:
        return client.map_create(m.type, m.key_size, m.value_size, m.max_entries, m.flags,
                                 m.kernel_name)
    except BpfError as e:
        raise BpfError(e.errno, f"{spec.path}: creating map '{m.name}' ({_describe(m)}):"
                       f" {e.strerror}") from None


def _describe(m: MapSpec) -> str:
    kind = MAP_TYPE_NAMES.get(m.type, f"type {m.type}")  # type: ignore[call-overload]
    return (f"{kind}, key {m.key_size}, value {m.value_size}, max_entries {m.max_entries},"
            f" flags {m.flags:#x}")


def _reuse(client: Client, m: MapSpec, path: str) -> int | None:
    """The pinned map at path when it matches the definition; None when nothing is pinned
    there; EINVAL naming every differing field when it does not match."""
    try:
        fd = client.obj_get(path)
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return None
        raise BpfError(e.errno, f"map '{m.name}': cannot open pin {path}: {e.strerror}"
                       ) from None
    try:
        info = client.obj_get_info_by_fd(fd)
        if "bytes_key" not in info:
            raise BpfError(errno.EINVAL, f"map '{m.name}': {path} is a pinned {info['type']},"
                           " not a map")
        type_ids = {name: int(t) for t, name in MAP_TYPE_NAMES.items()}
        pinned = {**info, "type": type_ids.get(info["type"], -1)}
        diffs = [f"{ours} {getattr(m, ours)} != {pinned[theirs]}"
                 for ours, theirs in _REUSE_FIELDS if getattr(m, ours) != pinned[theirs]]
        if diffs:
            raise BpfError(errno.EINVAL, f"map '{m.name}': the map pinned at {path} does not"
                           f" match the object's definition ({'; '.join(diffs)}; object"
                           " != pinned)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _tc_hierarchy(options: LoadOptions, loaded: LoadedObject) -> None:
    """MOUNT/tc/globals (0700) and the xdp and ip links to MOUNT/tc/, as tc makes them."""
    root = options.tc_root
    if os.path.isdir(os.path.join(root, TC_GLOBALS)):
        return
    loaded.mkdirs(os.path.join(root, TC_GLOBALS), 0o700)
    for link in TC_LINKS:
        target = os.path.join(os.path.dirname(root), link)
        try:
            os.symlink(root + "/", target)
        except OSError:
            continue  # already there (or symlinks refused): tc carries on too
        loaded.created.append(target)


# -- programs -----------------------------------------------------------------------------------
def _load_program(client: Client, spec: ObjectSpec, prog: ProgramSpec, prog_type: ProgType,
                  options: LoadOptions, loaded: LoadedObject) -> None:
    insns = prog.relocated(loaded.maps)
    license = spec.license if spec.license is not None else ""
    try:
        fd = client.prog_load(prog_type, insns, license, spec.kern_version, prog.kernel_name,
                              options.log_level)
    except BpfError as e:
        why = e
        if not options.log_level:  # load again with a log to say why, as libbpf does
            try:
                os.close(client.prog_load(prog_type, insns, license, spec.kern_version,
                                          prog.kernel_name, 1))
            except BpfError as again:
                why = again
        hint = (" (the object has no license section: GPL-only helpers are refused)"
                if spec.license is None else "")
        message = (f"{spec.path}: loading program '{prog.name}' (section '{prog.section}'):"
                   f" {e.strerror}{hint}")
        if isinstance(why, VerifierError):
            raise VerifierError(e.errno, message, why.log) from None
        raise BpfError(e.errno, message) from None
    loaded.programs[prog.name] = fd
    if fd.log:
        loaded.logs[prog.name] = fd.log


def _fill_tail_calls(client: Client, spec: ObjectSpec, programs: list[ProgramSpec],
                     loaded: LoadedObject) -> None:
    """tc's `ID/KEY` sections: program -> slot KEY of the prog_array with tc id ID."""
    for prog in programs:
        if prog.tail_call is None:
            continue
        map_id, key = prog.tail_call
        arrays = [m for m in spec.maps.values()
                  if m.tc_id == map_id and m.type == MapType.PROG_ARRAY and m.name in loaded.maps]
        if not arrays:
            raise BpfError(errno.ENOENT, f"{spec.path}: section '{prog.section}' is a tail"
                           f" call target for map id {map_id}, but no prog_array has that id")
        m = arrays[0]
        if key >= m.max_entries:
            raise BpfError(errno.E2BIG, f"{spec.path}: tail call key {key} for map"
                           f" '{m.name}' out of bounds (max_entries {m.max_entries})")
        client.map_update_elem(loaded.maps[m.name], _U32.pack(key),
                               _U32.pack(loaded.programs[prog.name]))
