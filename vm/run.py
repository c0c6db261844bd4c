"""One program run: its address space, context, environment and recorded side effects."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .context import CTX_SIZE, ETH_HLEN, MAX_PACKET, SkBuff, is_skb_program, pt_regs
from .env import RunEnv
from .errors import BpfError
from .isa import U32
from .memory import CTX_REGION, FIRST_DYNAMIC_REGION, Memory
from .uapi import ProgType

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
        self.ctx_addr = self.mem.map(CTX_REGION, ctx, True, "context")
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

    def next_packet(self, data_in: bytes) -> None:
        """Reuse this run for another packet (a batch of test runs, as pcap replay makes)."""
        self.skb = new_skb(data_in, self.prog.prog_type)
        self.ctx = self.skb.ctx
        self.mem.map(CTX_REGION, self.ctx, True, "context")
        self.effects = {}

    def reset(self) -> None:
        """Forget per-repetition state: map value regions, tail-call count, budget."""
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
        effects = dict(self.effects)
        if self.skb is not None:
            fields = self.skb.fields()
            for name in ("mark", "priority", "tc_index", "tc_classid"):
                if fields[name]:
                    effects.setdefault(name, fields[name])
            if fields["vlan_present"]:
                proto = int.from_bytes(fields["vlan_proto"].to_bytes(2, "little"), "big")
                effects["vlan"] = {"proto": proto, "tci": fields["vlan_tci"]}
        return TestRunResult(retval & U32, data_out, duration,
                             bytes(self.ctx) if want_ctx else b"", effects)


def new_skb(data_in: bytes, prog_type: int) -> SkBuff:
    if len(data_in) < ETH_HLEN:
        raise BpfError(errno.EINVAL, f"data_in of {len(data_in)} bytes is shorter than an"
                       f" Ethernet header ({ETH_HLEN})")
    if len(data_in) > MAX_PACKET:
        raise BpfError(errno.EINVAL, f"data_in of {len(data_in)} bytes is larger than"
                       f" {MAX_PACKET}")
    return SkBuff(data_in, prog_type)
