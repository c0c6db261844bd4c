"""Program contexts: the 4.4 `struct __sk_buff` over a packet model, and `struct pt_regs`.

The context a program sees is a small buffer mapped at CTX_REGION. For socket and tc programs
the buffer *is* the skb's metadata: `SkBuff` keeps its fields in that buffer, so a program's
writes (mark, priority, tc_index, cb[], tc_classid) and a helper's changes (vlan tag, length)
are the same state with nothing to copy back. Layout and access rules are 4.4's
(include/uapi/linux/bpf.h; net/core/filter.c sk_filter_is_valid_access,
tc_cls_act_is_valid_access; kernel/trace/bpf_trace.c kprobe_prog_is_valid_access).
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from .errors import BpfError
from .uapi import (
    ETH_ALEN,
    ETH_HLEN,
    ETH_P_8021AD,
    ETH_P_8021Q,
    SKF_LL_OFF,
    SKF_NET_OFF,
    VLAN_HLEN,
    ProgType,
)

VLAN_TAG_PRESENT = 0x1000  # 4.4 kept the "present" bit in vlan_tci (the CFI bit)
PACKET_HOST, PACKET_MULTICAST, PACKET_OTHERHOST = 0, 2, 3  # (PACKET_BROADCAST, 1: see reload)
LOOPBACK_IFINDEX = 1  # BPF_PROG_TEST_RUN runs skbs on the loopback device
# The largest packet a test run takes. The kernel limits data_in to one page minus its
# headroom and tailroom; the VM takes any IP-sized frame (for pcap replay of jumbo frames).
MAX_PACKET = 65535 + ETH_HLEN


@dataclass(frozen=True)
class CtxField:
    name: str
    offset: int
    size: int = 4


SK_BUFF_FIELDS = (
    CtxField("len", 0), CtxField("pkt_type", 4), CtxField("mark", 8),
    CtxField("queue_mapping", 12), CtxField("protocol", 16), CtxField("vlan_present", 20),
    CtxField("vlan_tci", 24), CtxField("vlan_proto", 28), CtxField("priority", 32),
    CtxField("ingress_ifindex", 36), CtxField("ifindex", 40), CtxField("tc_index", 44),
    *(CtxField(f"cb{n}", 48 + 4 * n) for n in range(5)),
    CtxField("hash", 68), CtxField("tc_classid", 72),
)
SK_BUFF_SIZE = 76
SKB = {f.name: f.offset for f in SK_BUFF_FIELDS}
NO_ADDRESS = bytes(ETH_ALEN)
CB_FIELDS = frozenset(f"cb{n}" for n in range(5))

# Per program type: the fields a program may write, and those it may not read.
SKB_WRITABLE = {
    ProgType.SOCKET_FILTER: CB_FIELDS,
    ProgType.SCHED_CLS: CB_FIELDS | {"mark", "tc_index", "priority", "tc_classid"},
    ProgType.SCHED_ACT: CB_FIELDS | {"mark", "tc_index", "priority", "tc_classid"},
}
SKB_UNREADABLE = {ProgType.SOCKET_FILTER: frozenset({"tc_classid"})}
# Fields BPF_PROG_TEST_RUN takes from ctx_in (the rest of ctx_in must be zero), as the
# running kernel's bpf_ctx_init/convert___skb_to_skb.
CTX_IN_FIELDS = CB_FIELDS | {"mark", "priority", "ingress_ifindex", "ifindex"}

# x86_64 struct pt_regs: 21 registers of 8 bytes, in this order.
PT_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
           "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss")
PT_REGS_SIZE = 8 * len(PT_REGS)

CTX_SIZE = {ProgType.SOCKET_FILTER: SK_BUFF_SIZE, ProgType.SCHED_CLS: SK_BUFF_SIZE,
            ProgType.SCHED_ACT: SK_BUFF_SIZE, ProgType.KPROBE: PT_REGS_SIZE}
_FIELD_AT = {f.offset: f for f in SK_BUFF_FIELDS}


def fields_struct(names: tuple[str, ...], whole: bool = False) -> struct.Struct:
    """A struct over __sk_buff that packs or unpacks just `names` (in offset order): one
    call instead of one per field. The bytes between them are skipped by unpack and zeroed
    by pack (with `whole`, up to the end of the struct)."""
    fmt, pos = "<", 0
    for f in SK_BUFF_FIELDS:
        if f.name in names:
            fmt += f"{f.offset - pos}x" + ("H" if f.name == "protocol" else "I")
            pos = f.offset + (2 if f.name == "protocol" else 4)
    if whole:
        fmt += f"{SK_BUFF_SIZE - pos}x"
    return struct.Struct(fmt)


# A fresh skb's fields in one pack: len, pkt_type, protocol (__be16: the frame's bytes as
# they are), ifindex; every other byte zero (struct's pad bytes are written as zeros).
_FRESH = fields_struct(("len", "pkt_type", "protocol", "ifindex"), whole=True)
# Destination address and Ethernet type (as the bytes are: protocol is __be16).
_ETH_HEADER = struct.Struct(f"<{ETH_ALEN}s{ETH_ALEN}xH")


def ctx_access_ok(prog_type: int, off: int, size: int, write: bool) -> bool:
    """The kernel's is_valid_access for a context access of `size` bytes at `off`."""
    if off < 0 or off >= CTX_SIZE.get(prog_type, 0) or off % size:
        return False
    if prog_type == ProgType.KPROBE:
        return not write
    if size != 4:
        return False
    name = _FIELD_AT[off].name
    if name in SKB_UNREADABLE.get(prog_type, ()):
        return False
    return not write or name in SKB_WRITABLE[prog_type]


def is_skb_program(prog_type: int) -> bool:
    return prog_type in (ProgType.SOCKET_FILTER, ProgType.SCHED_CLS, ProgType.SCHED_ACT)


class SkBuff:
    """A packet and its metadata, as BPF_PROG_TEST_RUN builds it: the frame starts with the
    Ethernet header; tc programs see data from the MAC header, socket filters from the network
    header (`data_start`)."""

    def __init__(self, frame: bytes, prog_type: int):
        self.ctx = bytearray(SK_BUFF_SIZE)
        self.data_start = 0 if prog_type in (ProgType.SCHED_CLS, ProgType.SCHED_ACT) else ETH_HLEN
        self.reload(frame)

    def reload(self, frame: bytes) -> None:
        """Start over with another packet: everything a run may have changed (the frame, every
        __sk_buff field, the tunnel key) is set afresh, in place (a batch of test runs reuses
        one SkBuff; the context buffer stays mapped). The fields are eth_type_trans's on the
        loopback device (address 00:00:00:00:00:00): pkt_type, protocol, len; ifindex is
        the loopback's; the others zero."""
        if type(frame) is not bytes:
            frame = bytes(frame)
        self.current: bytes | bytearray = frame  # the packet as it is now (see `frame`)
        self._writable: bytearray | None = None
        self.tunnel_key: dict | None = None
        destination, ethertype = _ETH_HEADER.unpack_from(frame)
        if destination[0] & 1:  # the loopback's broadcast address is 00:..:00, its own
            pkt_type = PACKET_MULTICAST  # address: so ff:..:ff is multicast (as measured)
        else:
            pkt_type = PACKET_HOST if destination == NO_ADDRESS else PACKET_OTHERHOST
        _FRESH.pack_into(self.ctx, 0, len(frame) - self.data_start, pkt_type, ethertype,
                         LOOPBACK_IFINDEX)

    def adopt(self, frame: bytes) -> None:
        """Take the packet whose fresh fields native code wrote into the context already
        (the batch driver's SkBuff.reload): the rest of reload, the context untouched."""
        self.current = frame
        self._writable = None
        self.tunnel_key = None

    @property
    def written(self) -> bool:
        """Whether anything asked for the frame writable (a copy of data_in was made)."""
        return self._writable is not None

    def __getitem__(self, name: str) -> int:
        return int.from_bytes(self.ctx[SKB[name]:SKB[name] + 4], "little")

    def __setitem__(self, name: str, value: int) -> None:
        self.ctx[SKB[name]:SKB[name] + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")

    @property
    def frame(self) -> bytearray:
        """The packet, writable: copied from data_in the first time anything asks for it
        (copy on write: most programs only read, through `current`)."""
        frame = self._writable
        if frame is None:
            frame = self._writable = self.current = bytearray(self.current)
        return frame

    @property
    def data(self) -> memoryview:
        """What the program addresses: from the MAC or the network header."""
        return memoryview(self.frame)[self.data_start:]

    def set_protocol(self, ethertype: int) -> None:
        """skb->protocol is __be16: programs compare it with htons(ETH_P_*)."""
        self["protocol"] = int.from_bytes(ethertype.to_bytes(2, "big"), "little")

    @property
    def protocol(self) -> int:
        """The ethertype in host order."""
        return int.from_bytes(self["protocol"].to_bytes(2, "little"), "big")

    def data_out(self) -> bytes:
        """The frame as BPF_PROG_TEST_RUN returns it: for programs that start at the network
        header, the kernel hands back the link-layer header zeroed (measured on 6.18)."""
        return bytes(self.data_start) + bytes(self.current[self.data_start:])

    def apply_ctx_in(self, ctx_in: bytes) -> None:
        if len(ctx_in) > SK_BUFF_SIZE:
            if any(ctx_in[SK_BUFF_SIZE:]):
                raise BpfError(errno.EINVAL, f"ctx_in sets fields beyond the 4.4 __sk_buff"
                               f" ({SK_BUFF_SIZE} bytes)")
            ctx_in = ctx_in[:SK_BUFF_SIZE]
        padded = bytes(ctx_in).ljust(SK_BUFF_SIZE, b"\0")
        for f in SK_BUFF_FIELDS:
            value = int.from_bytes(padded[f.offset:f.offset + 4], "little")
            if f.name in CTX_IN_FIELDS:
                if value or f.name != "ifindex":
                    self[f.name] = value
            elif value:
                raise BpfError(errno.EINVAL, f"ctx_in may not set __sk_buff.{f.name} (only"
                               f" {', '.join(sorted(CTX_IN_FIELDS))})")

    def load(self, off: int, size: int) -> int | None:
        """LD_ABS/LD_IND: big-endian load at `off` from data (negative: the SKF_*_OFF bases);
        None when out of bounds, which ends the program with 0."""
        if off >= 0:
            start = self.data_start + off
        elif off >= SKF_NET_OFF:
            start = ETH_HLEN + off - SKF_NET_OFF
        elif off >= SKF_LL_OFF:
            start = off - SKF_LL_OFF
        else:
            return None
        if (start < self.data_start and off >= 0) or start + size > len(self.current):
            return None
        return int.from_bytes(self.current[start:start + size], "big")

    # -- vlan (net/core/skbuff.c skb_vlan_push / skb_vlan_pop) ---------------------------
    @property
    def vlan_tag_present(self) -> bool:
        return bool(self["vlan_present"])

    def put_vlan_tag(self, proto_be: int, tci: int) -> None:
        self["vlan_present"] = 1
        self["vlan_tci"] = tci & 0xFFFF & ~VLAN_TAG_PRESENT
        self["vlan_proto"] = proto_be & 0xFFFF

    def insert_vlan_tag(self, proto_be: int, tci: int) -> None:
        """Move a tag into the frame after the MAC addresses."""
        tag = proto_be.to_bytes(2, "little") + tci.to_bytes(2, "big")
        self.frame[2 * ETH_ALEN:2 * ETH_ALEN] = tag
        self.set_protocol(int.from_bytes(proto_be.to_bytes(2, "little"), "big"))
        self["len"] = self["len"] + VLAN_HLEN

    def pop_frame_vlan(self) -> None:
        inner = int.from_bytes(self.frame[16:18], "big")
        del self.frame[2 * ETH_ALEN:2 * ETH_ALEN + VLAN_HLEN]
        self.set_protocol(inner)
        self["len"] = self["len"] - VLAN_HLEN

    def frame_has_vlan(self) -> bool:
        return self.protocol in (ETH_P_8021Q, ETH_P_8021AD) and len(self.current) >= 18


def pt_regs(values: dict[str, int] | bytes | None) -> bytearray:
    """A kprobe context: registers by name, or raw bytes (up to sizeof(struct pt_regs))."""
    if values is None:
        return bytearray(PT_REGS_SIZE)
    if isinstance(values, (bytes, bytearray, memoryview)):
        return bytearray(bytes(values).ljust(PT_REGS_SIZE, b"\0")[:PT_REGS_SIZE])
    regs = [values.get(name, 0) & ((1 << 64) - 1) for name in PT_REGS]
    return bytearray(struct.pack(f"<{len(PT_REGS)}Q", *regs))
