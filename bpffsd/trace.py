"""The daemon's trace_pipe: trace_printk output of every program run, kept in a bounded ring.

Readers ask for lines after a sequence number and wait for new ones, so several
`bpffs prog tracelog` readers each see every line (unlike the kernel's trace_pipe, whose reads
consume). Lines older than the ring are dropped; a reader that fell behind learns it from the
gap in sequence numbers.
"""

from __future__ import annotations

from collections import deque

import trio

BACKLOG = 4096


class TraceRing:
    def __init__(self, backlog: int = BACKLOG):
        self._lines: deque[tuple[int, str]] = deque(maxlen=backlog)
        self._seq = 0
        self._changed = trio.Event()

    def write(self, line: str) -> None:
        self._seq += 1
        self._lines.append((self._seq, line))
        self._changed.set()
        self._changed = trio.Event()

    def since(self, after: int) -> list[tuple[int, str]]:
        return [(seq, line) for seq, line in self._lines if seq > after]

    async def read(self, after: int) -> list[tuple[int, str]]:
        while True:
            lines = self.since(after)
            if lines:
                return lines
            await self._changed.wait()
