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

RENDER_STEP = 256  # map elements rendered at a time while a pin is read


def hex_bytes(data: bytes) -> str:
    return " ".join(f"{b:02x}" for b in data)


def render_object(obj: Any, object_id: Callable[[Any], int]) -> str:
    """The whole text of a pinned object that is not a map (a program's is its disassembly);
    maps are made piece by piece by PinText. object_id names the maps a program uses."""
    impl = obj.impl
    if obj.kind == "prog":
        insns = vm.disassemble(impl.insns, maps=[object_id(m) for m in impl.maps])
        header = (f"# {PROG_TYPE_NAMES[impl.prog_type]} program id {obj.id}{_name(impl.name)}:"
                  f" tag {impl.tag}, {len(impl.insns) // 8} instructions,"
                  f" license {impl.license!r}")
        return "\n".join([header, *insns]) + "\n"
    return f"# {obj.kind} id {obj.id}\n"


class PinText:
    """The text of one open pin, made as it is read (the kernel's seq_file): a map's
    elements are rendered RENDER_STEP at a time from a cursor, and only the text from the
    last read offset on is kept, so an open file costs about one read's worth of memory
    whatever the map's size, and open() costs nothing. Like bpftool's dump (and seq_file),
    the walk is live: elements changed while reading may show either way. Reading from an
    earlier offset starts the walk over."""

    def __init__(self, obj: Any, object_id: Callable[[Any], int]):
        """obj: the pinned BpfObject; object_id names the objects an fd array holds."""
        self.obj, self.object_id = obj, object_id
        self._rewind()

    def _rewind(self) -> None:
        self.text = b""  # rendered, from offset `start` on
        self.start = 0
        self.cursor: Any = None  # the last element rendered (key or slot index)
        self.rendered = 0  # elements rendered so far
        self.header = False  # rendered
        self.done = False

    def read(self, off: int, size: int) -> bytes:
        if off < self.start:
            self._rewind()
        while self.start + len(self.text) < off + size and not self.done:
            self.text += self._more()
        if off > self.start:  # what was before `off` has been read: drop it
            self.text, self.start = self.text[off - self.start:], off
        return self.text[off - self.start:off - self.start + size]

    def _more(self) -> bytes:
        """The next piece of text: the header first, then RENDER_STEP elements."""
        obj, impl = self.obj, self.obj.impl
        if obj.kind != "map":  # programs and others: rendered whole
            self.done = True
            return render_object(obj, self.object_id).encode()
        if not self.header:
            self.header = True
            self.cursor = -1 if isinstance(impl, FdArrayMap) else None
            return (f"# {impl.type_name} map id {obj.id}{_name(impl.name)}: key"
                    f" {impl.key_size}B value {impl.value_size}B max_entries"
                    f" {impl.max_entries}\n").encode()
        lines = []
        if isinstance(impl, FdArrayMap):
            slots = impl.slots
            index = self.cursor + 1
            while index < len(slots) and len(lines) < RENDER_STEP:
                if slots[index] is not None:
                    key = index.to_bytes(impl.key_size, "little")
                    lines.append(f"{hex_bytes(key)}: id {self.object_id(slots[index])}")
                index += 1
            self.cursor = index - 1
            self.done = index >= len(slots)
        else:
            # A walk restarts when its cursor was deleted: never render more than the map
            # can hold, or a map churning under a reader would never end.
            want = min(RENDER_STEP, impl.max_entries - self.rendered)
            keys = impl.walk(self.cursor, want) if want > 0 else []
            for key in keys:
                value = impl.lookup(key)
                if value is not None:
                    lines.append(f"{hex_bytes(key)}: {hex_bytes(value)}")
            if keys:
                self.cursor = keys[-1]
            self.done = len(keys) < want or want <= 0
        self.rendered += len(lines)
        return "".join(line + "\n" for line in lines).encode()


def _name(name: str) -> str:
    return f" name {name}" if name else ""
