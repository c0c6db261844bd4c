"""What `cat` shows for a pin: the kernel's bpffs answers EIO; we print the object.

A map prints one `key: value` line per element, bytes in hex as bpftool prints them (no BTF in
4.4, so no decoded types unless the loader recorded them); fd arrays print the id of the
object in each slot. A program prints its type, size and disassembly.
"""

from __future__ import annotations

import itertools
import operator
import time
from collections.abc import Callable
from typing import Any

from bpffs import vm
from bpffs.vm.maps import FdArrayMap
from bpffs.vm.uapi import PROG_TYPE_NAMES

# What one step of a walk renders at most: RENDER_STEP elements, STEP_BYTES of text (one
# element at least), and for an fd array SCAN_STEP slots looked at, live or empty.
RENDER_STEP = 256
STEP_BYTES = 64 << 10
SCAN_STEP = 16384
# Seconds of rendering one read request may take (one step at least): a request holds the
# daemon's event loop, and its mount's request channel, for about this long at most.
READ_BUDGET = 0.005


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
    elements are rendered a step at a time from a cursor, and only the text from the last
    read offset on is kept, so an open file costs about one read's worth of memory (plus a
    step) whatever the map's size, and open() costs nothing. Like bpftool's dump (and
    seq_file), the walk is live: elements changed while reading may show either way. Reading
    from an earlier offset starts the walk over.

    Each read renders for READ_BUDGET at most. A read at an offset the walk has not reached
    gets None ("not yet"): the mount worker asks again, with other requests served in
    between, so a read far into the text (pread, `dd skip=`) costs what reading up to it
    costs, as on seq_file, and holds nothing up meanwhile."""

    def __init__(self, obj: Any, object_id: Callable[[Any], int]):
        """obj: the pinned BpfObject; object_id names the objects an fd array holds."""
        self.obj, self.object_id = obj, object_id
        self._rewind()

    def _rewind(self) -> None:
        self.text = bytearray()  # rendered, from offset `start` on
        self.start = 0
        self.cursor: Any = None  # the last element rendered (key or slot index)
        self.rendered = 0  # elements rendered so far
        self.header = False  # rendered
        self.done = False

    def read(self, off: int, size: int) -> bytes | None:
        """Up to size bytes at off (fewer when the budget ran out first), b"" past the end,
        or None when the walk has not reached off yet: ask again."""
        if off < self.start:
            self._rewind()
        deadline = time.perf_counter() + READ_BUDGET
        while self.start + len(self.text) < off + size and not self.done:
            self.text += self._more()
            self._drop_before(off)  # far reads keep nothing they skip
            if time.perf_counter() >= deadline:
                break
        self._drop_before(off)
        if off < self.start + len(self.text):
            return bytes(self.text[off - self.start:off - self.start + size])
        return b"" if self.done else None

    def _drop_before(self, off: int) -> None:
        """What lies before `off` has been read (or skipped): forget it."""
        drop = min(off, self.start + len(self.text)) - self.start
        if drop > 0:
            del self.text[:drop]
            self.start += drop

    def _more(self) -> bytes:
        """The next piece of text: the header first, then one step of elements."""
        obj, impl = self.obj, self.obj.impl
        if obj.kind != "map":  # programs and others: rendered whole
            self.done = True
            return render_object(obj, self.object_id).encode()
        if not self.header:
            self.header = True
            self.cursor = -1 if isinstance(impl, FdArrayMap) else None
            self.done = isinstance(impl, FdArrayMap) and impl.live == 0
            return (f"# {impl.type_name} map id {obj.id}{_name(impl.name)}: key"
                    f" {impl.key_size}B value {impl.value_size}B max_entries"
                    f" {impl.max_entries}\n").encode()
        lines = []
        if isinstance(impl, FdArrayMap):
            # Live slots found at C speed among the next SCAN_STEP, live or not: a huge
            # array with few objects costs a bounded scan per step, not the whole array.
            slots = impl.slots
            first = self.cursor + 1
            end = min(len(slots), first + SCAN_STEP)
            live = itertools.compress(range(first, end), map(
                operator.is_not, itertools.islice(slots, first, end), itertools.repeat(None)))
            for index in live:
                key = index.to_bytes(impl.key_size, "little")
                lines.append(f"{hex_bytes(key)}: id {self.object_id(slots[index])}")
                if len(lines) >= RENDER_STEP:
                    end = index + 1
                    break
            self.cursor = end - 1
            self.done = end >= len(slots)
        else:
            # A walk restarts when its cursor was deleted: never render more than the map
            # can hold, or a map churning under a reader would never end.
            line_bytes = 3 * (impl.key_size + impl.value_size) + 1
            want = min(RENDER_STEP, max(1, STEP_BYTES // line_bytes),
                       impl.max_entries - self.rendered)
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
