"""What `cat` shows for a pin: the kernel's bpffs answers EIO; we print the object.

A map prints one `key: value` line per element, bytes in hex as bpftool prints them (no BTF in
4.4, so no decoded types unless the loader recorded them); fd arrays print the id of the
object in each slot. A program prints its type, size and disassembly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bpffs import vm
from bpffs.vm.maps import FdArrayMap
from bpffs.vm.uapi import PROG_TYPE_NAMES


def hex_bytes(data: bytes) -> str:
    return " ".join(f"{b:02x}" for b in data)


def render_pin(obj: Any, object_id: Callable[[Any], int]) -> str:
    """obj: the pinned BpfObject; object_id names the objects an fd array holds."""
    impl = obj.impl
    if obj.kind == "map":
        lines = [f"# {impl.type_name} map id {obj.id}{_name(impl.name)}: key {impl.key_size}B"
                 f" value {impl.value_size}B max_entries {impl.max_entries}"]
        if isinstance(impl, FdArrayMap):
            lines += [f"{hex_bytes(k)}: id {object_id(member)}" for k, member in impl.items()]
        else:
            lines += [f"{hex_bytes(k)}: {hex_bytes(v)}" for k, v in impl.items()]
        return "\n".join(lines) + "\n"
    if obj.kind == "prog":
        insns = vm.disassemble(impl.insns, maps=[object_id(m) for m in impl.maps])
        header = (f"# {PROG_TYPE_NAMES[impl.prog_type]} program id {obj.id}{_name(impl.name)}:"
                  f" tag {impl.tag}, {len(impl.insns) // 8} instructions,"
                  f" license {impl.license!r}")
        return "\n".join([header, *insns]) + "\n"
    return f"# {obj.kind} id {obj.id}\n"


def _name(name: str) -> str:
    return f" name {name}" if name else ""
