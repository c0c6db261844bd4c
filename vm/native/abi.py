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
    FAULT_WRITE = 7  # 0 a read, 1 a write, READ_WRITE an atomic's read-modify-write
    ARG_R1 = 8  # the entry's arguments (one pointer is the cheapest call ctypes makes)
    ARG_R2 = 9
    ARG_DEPTH = 10
    PACKET_DATA = 11  # LD_ABS/LD_IND: address of the skb's frame (0 without an skb) ...
    PACKET_START = 12  # ... where offset 0 is in it (SkBuff.data_start) ...
    PACKET_END = 13  # ... and its length; refreshed after every call out, as the table
    NEXT_ID = 14  # the region id the next map value native code maps takes (Memory's next)
    REDIRECT = 15  # bpf_redirect's record (run.redirect_record), or 0
    BATCH_PACKET = 16  # index + 1 of the batch's packet Python has not seen yet, else 0
    BATCH_STOP = 17  # set by Python: the batch driver returns after the packet it runs
    #                  (the repeat loop after the repetition it runs)
    REPEATED = 18  # the repeat loop: repetitions it ran


class Context(ctypes.Structure):
    """One native invocation's context; field order is `Field`'s."""

    _fields_ = [(f.name.lower(), ctypes.c_uint64 if f != Field.BUDGET else ctypes.c_int64)
                for f in Field]


class Batch(IntEnum):
    """Word index of each field of the batch driver's descriptor (vm.native.driver): the
    packets in, the columns out, and where the driver stopped."""

    BUFFER = 0  # address of the packets' bytes
    OFFSETS = 1  # address of a u64 per packet: where it starts in BUFFER ...
    LENGTHS = 2  # ... and a u32 per packet: its length
    COUNT = 3  # packets in the batch
    NEXT = 4  # in: the first packet to run; out: where the driver stopped
    RETVALS = 5  # out columns: a u32 per packet, r0 ...
    CLASSIDS = 6  # ... a u32, skb->tc_classid after the run ...
    REDIRECTS = 7  # ... and a u64, bpf_redirect's record (Field.REDIRECT)
    SKB = 8  # address of the run's __sk_buff (its context buffer)
    DATA_START = 9  # SkBuff.data_start
    BUDGET = 10  # each run's budget (RunEnv.budget)
    R1 = 11  # the context's address in the VM (Run.ctx_addr)
    STOPPED = 12  # out: a Stop


class Stop(IntEnum):
    """Why the batch driver returned; NEXT is the packet it stopped at."""

    DONE = 0  # every packet ran (NEXT == COUNT)
    UNFIT = 1  # the packet at NEXT is too short or too long for an skb: not run
    FINISH = 2  # the packet at NEXT ran but Python finishes it: a status, an effect only
    #             Python records (or reads: mark, priority, ...), or a callback into Python


READ_WRITE = 2


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
