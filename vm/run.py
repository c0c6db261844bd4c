"""One program run: its address space, context, environment and recorded side effects."""

from __future__ import annotations

import errno
import time
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
    common packet costs one int: `retvals` of every packet; `outputs`, data_out of the
    packets where it differs from data_in; `effects`, those of the runs that had any;
    `errors`, [errno, message] of the packets refused or stopped (their retval is 0)."""

    def __init__(self, prog: Program, env: RunEnv, tier: str):
        self.prog, self.env, self.tier = prog, env, tier
        self.run: Run | None = None
        self.retvals: list[int] = []
        self.outputs: dict[int, bytes] = {}
        self.effects: dict[int, dict[str, Any]] = {}
        self.errors: dict[int, list] = {}

    def feed(self, packets: Iterable[bytes]) -> None:
        """Run the next packets; the program's run count and time are charged here."""
        prog, tier, run = self.prog, self.tier, self.run
        retvals, outputs, effects, errors = self.retvals, self.outputs, self.effects, self.errors
        execute, reported, nothing = prog.execute, _REPORTED.unpack_from, _NOTHING_REPORTED
        first, failed, start = len(retvals), 0, time.perf_counter_ns()
        entry, budget = prog.entry(tier), self.env.budget
        for i, data in enumerate(packets, first):
            try:
                skb = run.skb if run is not None else None
                if skb is not None and ETH_HLEN <= len(data) <= MAX_PACKET:
                    # next_packet, reset and execute, inline for the common case: the
                    # program's type has an skb and the packet fits it.
                    skb.reload(data)
                    if run.effects:
                        run.effects = {}
                    if run.mem._next_id != FIRST_DYNAMIC_REGION:
                        run.reset()  # map values of the last run
                    run.tail_target, run.tail_calls, run.budget = None, 0, budget
                    run.prog = prog
                    try:
                        retval = entry(run, run.ctx_addr)
                    except PacketExit:
                        retval = 0
                    except TailCall:
                        target, run.tail_target = run.tail_target, None
                        retval = target.execute(run, tier)
                else:
                    if run is None:
                        run = self.run = Run.for_test(prog, data, None, self.env)
                        run.reset()
                    else:
                        run.next_packet(data)
                    retval = execute(run, tier)
            except BpfError as e:
                errors[i] = [e.errno, e.strerror]
                retvals.append(0)
                failed += 1
                continue
            except VmFault as fault:
                errors[i] = [errno.EFAULT, f"program {prog.name or prog.tag} stopped: {fault}"]
                retvals.append(0)
                failed += 1
                continue
            retvals.append(retval & U32)
            skb = run.skb
            if skb is not None and not skb.data_start:  # data_out is the frame
                frame = skb.current
                if frame is not data and frame != data:  # written (copied) and changed
                    outputs[i] = bytes(frame)
                values = reported(skb.ctx)
                if values != nothing or run.effects:
                    found = run.all_effects(values)
                    if found:
                        effects[i] = found
            else:
                result = run.result(retval, 0, want_ctx=False)
                if result.data_out != data:
                    outputs[i] = result.data_out
                if result.effects:
                    effects[i] = result.effects
        prog.run_cnt += len(retvals) - first - failed
        prog.run_time_ns += time.perf_counter_ns() - start


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
