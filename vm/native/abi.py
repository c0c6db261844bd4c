"""The contract between native code and its Python glue: the run context struct, the region
table's layout and the status codes native code returns with.

Native code gets one pointer, to a `Context` of 64-bit words. It reads the region table from
it, keeps the budget in it across calls, and on an abnormal end leaves a status there and
returns: Python raises the matching exception, so the other tiers' exception classes and
messages are reused instead of re-spelled in IR. Both sides take these numbers from here.
"""

from __future__ import annotations

import ctypes
from enum import IntEnum


class Field(IntEnum):
    """Word index of each field of the context (all u64, as native code indexes them)."""

    TABLE = 0  # address of the region table
    TABLE_LEN = 1  # entries in the table: region ids at or above it are unmapped
    BUDGET = 2  # instructions left (i64): synced with run.budget around every call out
    STATUS = 3  # a Status, 0 while the program runs
    INFO = 4  # Status.FAULT: index into the program's fault list
    FAULT_ADDR = 5  # Status.MEMORY: the access that faulted ...
    FAULT_SIZE = 6
    FAULT_WRITE = 7
    ARG_R1 = 8  # the entry's arguments (one pointer is the cheapest call ctypes makes)
    ARG_R2 = 9
    ARG_DEPTH = 10
    PACKET_DATA = 11  # LD_ABS/LD_IND: address of the skb's frame (0 without an skb) ...
    PACKET_START = 12  # ... where offset 0 is in it (SkBuff.data_start) ...
    PACKET_END = 13  # ... and its length; refreshed after every call out, as the table
    NEXT_ID = 14  # the region id the next map value native code maps takes (Memory's next)


class Context(ctypes.Structure):
    """One native invocation's context; field order is `Field`'s."""

    _fields_ = [(f.name.lower(), ctypes.c_uint64 if f != Field.BUDGET else ctypes.c_int64)
                for f in Field]


class Status(IntEnum):
    """Why native code returned early; every caller up the native stack returns at once,
    except that a bpf-to-bpf call site handles TAIL_CALL as the other tiers do."""

    OK = 0
    FAULT = 1  # a fault known when the program was translated: (message, pc) by INFO
    MEMORY = 2  # an access outside the region table: Memory.view says what was wrong
    TAIL_CALL = 3  # bpf_tail_call succeeded: run.tail_target replaces the program
    PACKET_EXIT = 4  # LD_ABS/LD_IND beyond the packet: the program returns 0
    PY_EXCEPTION = 5  # a callback raised: the glue re-raises it
    PYTHON = 6  # a native map helper leaves the call to the Python helper (its caller calls
    #             it: this status never reaches Python)


class Entry(IntEnum):
    """Word index of each field of one region table entry. An unmapped id has all zeros, so
    every access to it faults; read-only regions have WRITE_LIMIT 0."""

    BASE = 0  # address of the region's first byte
    READ_LIMIT = 1  # size: an access [off, off + n) may read when off + n <= READ_LIMIT
    WRITE_LIMIT = 2  # size if writable, else 0
    # A map value native code mapped (ids from Memory's next on): index + 1 of its map in the
    # program's maps, for the glue to map it in Memory too; 0 in entries Python wrote. It also
    # makes an entry 32 bytes, so id << ENTRY_SHIFT indexes it.
    MAP = 3


ENTRY_WORDS = 4
ENTRY_SHIFT = 2  # log2(ENTRY_WORDS): entry i starts at word i << ENTRY_SHIFT
