"""Task, time, randomness, trace_printk, probe_read and perf event helpers
(kernel/bpf/helpers.c, kernel/trace/bpf_trace.c). Kernel state comes from the RunEnv."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from ..errors import MemoryFault
from ..maps import PerfEventArrayMap
from ..uapi import (
    BPF_F_CTXLEN_MASK,
    BPF_F_CURRENT_CPU,
    BPF_F_INDEX_MASK,
    TASK_COMM_LEN,
    Helper,
    MapType,
)
from .maps import map_of
from .spec import ALL_TYPES, KPROBE, SOCKET_AND_TC, ArgType, helper, neg

if TYPE_CHECKING:
    from ..run import Run

A = ArgType
PERF_EVENT_MAPS = frozenset({MapType.PERF_EVENT_ARRAY})
TRACE_PRINTK_MAX_ARGS = 3


@helper(Helper.probe_read, (A.PTR_TO_STACK, A.CONST_STACK_SIZE, A.ANYTHING), gpl_only=True,
        prog_types=KPROBE)
def probe_read(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    """Reads the run's own memory (context, stack, map values) or RunEnv.kernel_memory; a
    fault zeroes the destination and returns -EFAULT, as the kernel."""
    try:
        data = run.mem.read(r3, r2)
    except MemoryFault:
        data = _kernel_memory(run, r3, r2)
    if data is None:
        run.mem.write(r1, bytes(r2))
        return neg(errno.EFAULT)
    run.mem.write(r1, data)
    return 0


def _kernel_memory(run: Run, addr: int, size: int) -> bytes | None:
    for base, blob in run.env.kernel_memory.items():
        if base <= addr and addr + size <= base + len(blob):
            return bytes(blob[addr - base:addr - base + size])
    return None


@helper(Helper.ktime_get_ns, gpl_only=True)
def ktime_get_ns(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    return run.env.ktime()


@helper(Helper.get_prandom_u32)
def get_prandom_u32(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    return run.env.rng.getrandbits(32)


@helper(Helper.get_smp_processor_id)
def get_smp_processor_id(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    return run.env.cpu


@helper(Helper.get_current_pid_tgid, prog_types=KPROBE)
def get_current_pid_tgid(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    return (run.env.tgid << 32) | run.env.pid


@helper(Helper.get_current_uid_gid, prog_types=KPROBE)
def get_current_uid_gid(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    return (run.env.gid << 32) | run.env.uid


@helper(Helper.get_current_comm, (A.PTR_TO_STACK, A.CONST_STACK_SIZE), prog_types=KPROBE)
def get_current_comm(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    """strscpy_pad: NUL-terminated, truncated to the buffer, zero-padded."""
    if r2 == 0:
        return neg(errno.EINVAL)
    comm = run.env.comm.encode()[:min(r2, TASK_COMM_LEN) - 1]
    run.mem.write(r1, comm.ljust(r2, b"\0"))
    return 0


@helper(Helper.trace_printk, (A.PTR_TO_STACK, A.CONST_STACK_SIZE), gpl_only=True)
def trace_printk(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    """The 4.4 format rules: NUL-terminated, printable ASCII, at most three of %d %u %x with
    optional l/ll, and %p. Returns the length of the message, like the kernel."""
    fmt = run.mem.read(r1, r2) if r2 else b""
    message = format_trace(fmt, (r3, r4, r5))
    if message is None:
        return neg(errno.EINVAL)
    if run.env.trace is not None:
        env = run.env
        run.env.trace(f"{env.comm:>16}-{env.pid:<7} [{env.cpu:03d}] ....."
                      f" {env.ktime() / 1e9:12.6f}: bpf_trace_printk: {message}")
    run.append("trace", message)
    return len(message)


def format_trace(fmt: bytes, args: tuple[int, int, int]) -> str | None:
    """Format like bpf_trace_printk, or None where the kernel returns -EINVAL."""
    if not fmt or fmt[-1] != 0:
        return None
    fmt = fmt[:-1]
    out, n, i = [], 0, 0
    while i < len(fmt):
        c = chr(fmt[i])
        if not (c.isprintable() or c.isspace()) or fmt[i] > 127:
            return None
        if c != "%":
            out.append(c)
            i += 1
            continue
        if n >= TRACE_PRINTK_MAX_ARGS:
            return None
        i += 1
        longs = 0
        while i < len(fmt) and fmt[i] == ord("l") and longs < 2:
            longs += 1
            i += 1
        conv = chr(fmt[i]) if i < len(fmt) else "\0"
        value = args[n] & ((1 << 64) - 1)
        if conv == "p" and not longs:
            follow = chr(fmt[i + 1]) if i + 1 < len(fmt) else "\0"
            if not (follow.isspace() or _ispunct(follow) or follow == "\0"):
                return None
            out.append(f"{value:016x}")
        elif conv in "dux":
            bits = 64 if longs else 32
            value &= (1 << bits) - 1
            if conv == "d" and value >> (bits - 1):
                value -= 1 << bits
            out.append(f"{value:x}" if conv == "x" else str(value))
        else:
            return None
        n += 1
        i += 1
    return "".join(out)


def _ispunct(c: str) -> bool:
    return c.isascii() and c.isprintable() and not c.isalnum() and not c.isspace()


def _event_slot(run: Run, handle: int, flags: int) -> tuple[object | None, int]:
    """The perf event in the slot `flags` names, with the kernel's errors (negative)."""
    array = map_of(run, handle)
    if flags & ~(BPF_F_INDEX_MASK | BPF_F_CTXLEN_MASK) or not isinstance(array,
                                                                         PerfEventArrayMap):
        return None, neg(errno.EINVAL)
    index = flags & BPF_F_INDEX_MASK
    if index == BPF_F_CURRENT_CPU:
        index = run.env.cpu
    if index >= array.max_entries:
        return None, neg(errno.E2BIG)
    event = array.get(index)
    if event is None:
        return None, neg(errno.ENOENT)
    return event, index


@helper(Helper.perf_event_read, (A.CONST_MAP_PTR, A.ANYTHING), prog_types=KPROBE,
        map_types=PERF_EVENT_MAPS)
def perf_event_read(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    """The counter of the event in slot `flags` (RunEnv.perf_counters, else the event's
    sample count); an event of another CPU is -EINVAL, as the kernel."""
    if r2 & BPF_F_CTXLEN_MASK:
        return neg(errno.EINVAL)
    event, index = _event_slot(run, r1, r2)
    if event is None:
        return index
    if event.cpu != run.env.cpu:
        return neg(errno.EINVAL)
    return run.env.perf_counters.get(index, event.count)


@helper(Helper.perf_event_output, (A.PTR_TO_CTX, A.CONST_MAP_PTR, A.ANYTHING, A.PTR_TO_STACK,
                                   A.CONST_STACK_SIZE), gpl_only=True, prog_types=ALL_TYPES,
        map_types=PERF_EVENT_MAPS)
def perf_event_output(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    """Sends `size` bytes (plus, for skb programs, the first BPF_F_CTXLEN_MASK bytes of the
    packet, as 4.5's skb_event_output) to the event's subscribers. Socket and tc programs have
    it from 4.5 on; the VM offers it to all four 4.4 types."""
    event, index = _event_slot(run, r2, r3)
    if event is None:
        return index
    if event.cpu != run.env.cpu:
        return neg(errno.EOPNOTSUPP)
    ctx_len = (r3 & BPF_F_CTXLEN_MASK) >> 32
    if ctx_len and (run.prog.prog_type not in SOCKET_AND_TC or ctx_len > len(run.skb.data)):
        return neg(errno.EFAULT if run.skb is not None else errno.EINVAL)
    data = run.mem.read(r4, r5)
    if ctx_len:
        data += bytes(run.skb.data[:ctx_len])
    event.output(run.env.cpu, data)
    run.append("events", {"cpu": run.env.cpu, "index": index, "data": data})
    return 0
