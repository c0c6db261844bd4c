"""One program run: its address space, context, environment and recorded side effects."""

from __future__ import annotations

import errno
import itertools
import mmap
import time
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .context import CTX_SIZE, MAX_PACKET, SkBuff, fields_struct, is_skb_program, pt_regs
from .env import RunEnv
from .errors import BpfError, VmFault
from .isa import U32
from .memory import CTX_REGION, FIRST_DYNAMIC_REGION, Memory
from .runtime import PacketExit, TailCall
from .uapi import ETH_HLEN, ProgType

# What a batch of packets may come in: a daemon maps a client's memfd (mmap).
Buffer = bytes | bytearray | memoryview | mmap.mmap

if TYPE_CHECKING:
    from .helpers import HelperSpec
    from .program import Program


@dataclass
class TestRunResult:
    """BPF_PROG_TEST_RUN's outputs plus what the program did to the world."""

    retval: int
    data_out: bytes
    duration: int  # average ns per run
    ctx_out: bytes = b""
    effects: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"retval": self.retval, "data_out": self.data_out, "duration": self.duration,
                "ctx_out": self.ctx_out, **self.effects}


class Run:
    """Per-run state the engine and helpers share. Built once per test run and reused for each
    repetition (as the kernel reruns the program on the same skb)."""

    def __init__(self, prog: Program, env: RunEnv, skb: SkBuff | None, ctx: bytearray):
        from .helpers import HELPERS

        self.prog = prog
        self.env = env
        self.skb = skb
        self.ctx = ctx
        self.mem = Memory()
        self.ctx_addr = self.map_context(ctx)
        self.helpers: dict[int, HelperSpec] = HELPERS
        self.effects: dict[str, Any] = {}
        self.tail_target: Program | None = None
        self.tail_calls = 0
        self.budget = env.budget

    @classmethod
    def for_test(cls, prog: Program, data_in: bytes, ctx_in: bytes | None,
                 env: RunEnv) -> Run:
        """Build the context as BPF_PROG_TEST_RUN does for the program's type."""
        if is_skb_program(prog.prog_type):
            skb = new_skb(data_in, prog.prog_type)
            if ctx_in:
                skb.apply_ctx_in(ctx_in)
            return cls(prog, env, skb, skb.ctx)
        if prog.prog_type == ProgType.KPROBE:
            if ctx_in is not None and len(ctx_in) > CTX_SIZE[ProgType.KPROBE]:
                raise BpfError(errno.EINVAL, f"ctx_in of {len(ctx_in)} bytes is larger than"
                               f" struct pt_regs ({CTX_SIZE[ProgType.KPROBE]})")
            return cls(prog, env, None, pt_regs(ctx_in))
        raise BpfError(errno.EINVAL, f"test runs of program type {prog.prog_type} are not"
                       " supported")

    def map_context(self, ctx: bytearray) -> int:
        """Map the context at CTX_REGION; `ctx_view` (buffer, size) is how the compiled tier
        reaches it directly."""
        addr = self.mem.map(CTX_REGION, ctx, True, "context")
        region = self.mem.regions[CTX_REGION]
        self.ctx_view = (region.buf, region.size)
        return addr

    def next_packet(self, data_in: bytes) -> None:
        """Reuse this run for another packet (a batch of test runs, as pcap replay makes),
        reset() included: the skb starts over in place, so its context stays mapped."""
        skb = self.skb
        if skb is not None and ETH_HLEN <= len(data_in) <= MAX_PACKET:
            skb.reload(data_in)
        else:
            self.skb = skb = new_skb(data_in, self.prog.prog_type)
            self.ctx = skb.ctx
            self.map_context(self.ctx)
        if self.effects:  # (the result copied them)
            self.effects = {}
        self.reset()

    def reset(self) -> None:
        """Forget per-repetition state: map value regions, tail-call count, budget."""
        if self.mem._next_id != FIRST_DYNAMIC_REGION:
            for region in [r for r in self.mem.regions if r >= FIRST_DYNAMIC_REGION]:
                del self.mem.regions[region]
            self.mem._next_id = FIRST_DYNAMIC_REGION
        self.tail_target = None
        self.tail_calls = 0
        self.budget = self.env.budget

    def load_packet(self, off: int, size: int) -> int | None:
        return self.skb.load(off, size) if self.skb is not None else None

    def record(self, effect: str, value: Any) -> None:
        self.effects[effect] = value

    def append(self, effect: str, value: Any) -> None:
        self.effects.setdefault(effect, []).append(value)

    def result(self, retval: int, duration: int, want_ctx: bool) -> TestRunResult:
        data_out = self.skb.data_out() if self.skb is not None else b""
        effects = self.all_effects(_REPORTED.unpack_from(self.skb.ctx)
                                   if self.skb is not None else _NOTHING_REPORTED)
        return TestRunResult(retval & U32, data_out, duration,
                             bytes(self.ctx) if want_ctx else b"", effects)

    def all_effects(self, reported: tuple[int, ...]) -> dict[str, Any]:
        """What the run did: the recorded effects, then the skb fields a result reports
        (`reported`: their values, _REPORTED.unpack_from the context) where set."""
        effects = dict(self.effects) if self.effects else {}
        mark, vlan_present, vlan_tci, vlan_proto, priority, tc_index, tc_classid = reported
        if mark:
            effects.setdefault("mark", mark)
        if priority:
            effects.setdefault("priority", priority)
        if tc_index:
            effects.setdefault("tc_index", tc_index)
        if tc_classid:
            effects.setdefault("tc_classid", tc_classid)
        if vlan_present:
            proto = int.from_bytes(vlan_proto.to_bytes(2, "little"), "big")
            effects["vlan"] = {"proto": proto, "tci": vlan_tci}
        return effects


class PacketBatch:
    """One test run per packet, all on one Run (pcap replay), results in columns so that the
    common packet costs no Python object at all. For every packet: `retvals`, `classids`
    (skb->tc_classid after the run) and `redirects` (bpf_redirect's target as
    REDIRECT_SET | ingress << 32 | ifindex, else 0). Only for the packets that have them:
    `outputs`, data_out where it differs from data_in; `effects`, the other effects of the
    run; `errors`, [errno, message] of the packets refused or stopped (their columns are 0).

    On the native tier a buffer of packets (feed_buffer) runs in native code from one packet
    to the next (vm.native.batch); Python sees only the packets native code leaves to it."""

    def __init__(self, prog: Program, env: RunEnv, tier: str):
        self.prog, self.env, self.tier = prog, env, tier
        self.run: Run | None = None
        self.retvals = array("I")
        self.classids = array("I")
        self.redirects = array("Q")
        self.outputs: dict[int, bytes] = {}
        self.effects: dict[int, dict[str, Any]] = {}
        self.errors: dict[int, list] = {}

    def __len__(self) -> int:
        return len(self.retvals)

    def _grow(self, count: int) -> int:
        """Room for `count` more packets in the columns (zeros); returns the first index."""
        first = len(self.retvals)
        self.retvals.frombytes(bytes(4 * count))
        self.classids.frombytes(bytes(4 * count))
        self.redirects.frombytes(bytes(8 * count))
        return first

    def feed_buffer(self, buffer: Buffer, offsets: array, lengths: array,
                    checked: bool = False) -> None:
        """Run the packets found in `buffer` at `offsets` (array "Q"), `lengths` ("I");
        `checked`: the caller ran check_packets on them and this buffer already (a pass
        over every packet, which native code's batches would otherwise pay twice)."""
        if not checked:
            check_packets(len(buffer), offsets, lengths)
        entry = self.prog.entry(self.tier)
        batch_runner = getattr(entry, "run_batch", None)
        if batch_runner is None or self.prog.prog_type == ProgType.SOCKET_FILTER:
            # Views, not copies: a packet too large for an skb is refused on its length.
            view = memoryview(buffer)
            self.feed([view[o:o + n] for o, n in zip(offsets, lengths, strict=True)])
            return
        first, refused, start = self._grow(len(offsets)), len(self.errors), \
            time.perf_counter_ns()
        batch_runner(self, buffer, offsets, lengths, first)
        self._charge(len(offsets), refused, start)

    def feed(self, packets: Iterable[bytes]) -> None:
        """Run the next packets; the program's run count and time are charged here."""
        if not isinstance(packets, (list, tuple)):
            packets = list(packets)
        prog, tier = self.prog, self.tier
        retvals = self.retvals
        first, refused, start = self._grow(len(packets)), len(self.errors), \
            time.perf_counter_ns()
        entry, budget, finish = prog.entry(tier), self.env.budget, self.finish
        for i, data in enumerate(packets, first):
            run = self.run
            skb = run.skb if run is not None else None
            if skb is None or not ETH_HLEN <= len(data) <= MAX_PACKET:
                self.run_one(i, data)
                continue
            # Run.next_packet, reset and Program.execute, inline for the common case: the
            # program's type has an skb and the packet fits it.
            skb.reload(data)
            if run.effects:
                run.effects = {}
            if run.mem._next_id != FIRST_DYNAMIC_REGION:
                run.reset()  # map values of the last run
            run.tail_target, run.tail_calls, run.budget = None, 0, budget
            run.prog = prog
            try:
                try:
                    retval = entry(run, run.ctx_addr)
                except PacketExit:
                    retval = 0
                except TailCall:
                    target, run.tail_target = run.tail_target, None
                    retval = target.execute(run, tier)
            except (BpfError, VmFault) as e:
                self.refuse(i, e)
                continue
            retvals[i] = retval & U32
            if not skb.data_start:
                finish(i, data)
            else:
                self._finish_result(i, data, retval)
        self._charge(len(packets), refused, start)

    def _charge(self, packets: int, refused: int, start: int) -> None:
        """The program's run count and time for `packets` fed since `start`, those refused
        meanwhile (errors beyond the `refused` there were before) not counted."""
        self.prog.run_cnt += packets - (len(self.errors) - refused)
        self.prog.run_time_ns += time.perf_counter_ns() - start

    def run_one(self, i: int, data: bytes) -> None:
        """Packet `i` the slow way: a new skb where there is none (or the packet does not
        fit the one there)."""
        run = self.run
        try:
            if run is None:
                run = self.run = Run.for_test(self.prog, data, None, self.env)
                run.reset()
            else:
                run.next_packet(data)
            retval = self.prog.execute(run, self.tier)
        except (BpfError, VmFault) as e:
            self.refuse(i, e)
            return
        self.retvals[i] = retval & U32
        self._finish_result(i, data, retval)

    def refuse(self, i: int, error: BpfError | VmFault) -> None:
        """Packet `i` was refused (BpfError) or its run stopped (VmFault: EFAULT)."""
        if isinstance(error, VmFault):
            self.errors[i] = [errno.EFAULT, f"program {self.prog.name or self.prog.tag}"
                              f" stopped: {error}"]
        else:
            self.errors[i] = [error.errno, error.strerror]

    def finish(self, i: int, data: bytes) -> None:
        """Record what the run of packet `i` (data_in `data`, from the MAC header) did
        besides its retval."""
        run = self.run
        assert run is not None and run.skb is not None
        skb = run.skb
        frame = skb.current
        if frame is not data and frame != data:  # written (copied) and changed
            self.outputs[i] = bytes(frame)
        values = _REPORTED.unpack_from(skb.ctx)
        if values != _NOTHING_REPORTED or run.effects:
            self._effects(i, run.all_effects(values))

    def _finish_result(self, i: int, data: bytes, retval: int) -> None:
        assert self.run is not None
        result = self.run.result(retval, 0, want_ctx=False)
        if result.data_out != data:
            self.outputs[i] = result.data_out
        self._effects(i, result.effects)

    def _effects(self, i: int, effects: dict[str, Any]) -> None:
        """The effects of packet `i`: those with a column there, the rest by index."""
        self.classids[i] = effects.pop("tc_classid", 0)
        redirect = effects.pop("redirect", None)
        if redirect is not None:
            self.redirects[i] = redirect_record(redirect["ifindex"], redirect["ingress"])
        if effects:
            self.effects[i] = effects

    def all_effects(self) -> dict[int, dict[str, Any]]:
        """`effects` with the columns' effects put back, by packet index: each packet's
        effects as a single test run reports them (for callers that want dicts)."""
        merged = {i: dict(e) for i, e in self.effects.items()}
        classids, redirects = self.classids, self.redirects
        for i in itertools.compress(range(len(classids)), classids):
            merged.setdefault(i, {})["tc_classid"] = classids[i]
        for i in itertools.compress(range(len(redirects)), redirects):
            merged.setdefault(i, {})["redirect"] = redirect_effect(redirects[i])
        return merged


def check_packets(size: int, offsets: array, lengths: array) -> int:
    """BpfError(EINVAL) unless every packet is inside a buffer of `size` bytes (native code
    trusts these); returns where the last byte of any packet is (the size needed)."""
    if offsets.typecode != "Q" or lengths.typecode != "I":
        raise BpfError(errno.EINVAL, "a batch's offsets are u64 (array 'Q'), its lengths u32"
                       " ('I')")
    if len(offsets) != len(lengths):
        raise BpfError(errno.EINVAL, "a batch needs one offset and one length a packet")
    end = max(map(int.__add__, offsets, lengths), default=0)
    if end > size:
        raise BpfError(errno.EINVAL, f"a packet of the batch ends beyond its buffer of {size}"
                       " bytes")
    return end


# bpf_redirect's record in a batch's `redirects` column (and in native code's context).
REDIRECT_SET = 1 << 40
REDIRECT_INGRESS_SHIFT = 32


def redirect_record(ifindex: int, ingress: bool) -> int:
    return REDIRECT_SET | int(ingress) << REDIRECT_INGRESS_SHIFT | ifindex & U32


def redirect_effect(record: int) -> dict[str, Any]:
    """The "redirect" effect (helpers.skb.redirect's) of a record."""
    return {"ifindex": record & U32, "ingress": bool(record >> REDIRECT_INGRESS_SHIFT & 1)}


# The __sk_buff fields a test run's result reports when a run set them (Run.all_effects).
_REPORTED = fields_struct(("mark", "vlan_present", "vlan_tci", "vlan_proto", "priority",
                           "tc_index", "tc_classid"))
_NOTHING_REPORTED = (0,) * 7


def new_skb(data_in: bytes, prog_type: int) -> SkBuff:
    if len(data_in) < ETH_HLEN:
        raise BpfError(errno.EINVAL, f"data_in of {len(data_in)} bytes is shorter than an"
                       f" Ethernet header ({ETH_HLEN})")
    if len(data_in) > MAX_PACKET:
        raise BpfError(errno.EINVAL, f"data_in of {len(data_in)} bytes is larger than"
                       f" {MAX_PACKET}")
    return SkBuff(data_in, prog_type)
