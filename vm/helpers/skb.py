"""Packet helpers of socket and tc programs (net/core/filter.c, net/core/skbuff.c).

Offsets are relative to the data the program sees (the MAC header for tc programs).
Effects on the world outside the packet (redirects, clones, tunnel metadata) are recorded in
the run's effects, which a test run returns.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from .. import csum
from ..uapi import (
    BPF_F_HDR_FIELD_MASK,
    BPF_F_INGRESS,
    BPF_F_INVALIDATE_HASH,
    BPF_F_MARK_ENFORCE,
    BPF_F_MARK_MANGLED_0,
    BPF_F_PSEUDO_HDR,
    BPF_F_RECOMPUTE_CSUM,
    CSUM_MANGLED_0,
    ETH_P_8021AD,
    ETH_P_8021Q,
    Helper,
    TcAct,
)
from .spec import TC, ArgType, helper, neg

if TYPE_CHECKING:
    from ..context import SkBuff
    from ..run import Run

A = ArgType
MAX_HEADER_OFFSET = 0xFFFF
TUNNEL_KEY = 8  # sizeof(struct bpf_tunnel_key) of 4.4: u32 tunnel_id, u32 remote_ipv4


def _span(skb: SkBuff, offset: int, length: int) -> slice | None:
    """The frame bytes [offset, offset + length) of the program's data, or None outside it."""
    start = skb.data_start + offset
    if offset > MAX_HEADER_OFFSET or start + length > len(skb.frame):
        return None
    return slice(start, start + length)


@helper(Helper.skb_store_bytes, (A.PTR_TO_CTX, A.ANYTHING, A.PTR_TO_STACK, A.CONST_STACK_SIZE,
                                 A.ANYTHING), prog_types=TC)
def skb_store_bytes(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    """RECOMPUTE_CSUM keeps skb->csum (CHECKSUM_COMPLETE) right; a test-run skb has none, so
    only the data changes."""
    if r5 & ~(BPF_F_RECOMPUTE_CSUM | BPF_F_INVALIDATE_HASH):
        return neg(errno.EINVAL)
    span = _span(run.skb, r2 & 0xFFFFFFFF, r4)
    if span is None:
        return neg(errno.EFAULT)
    run.skb.frame[span] = run.mem.read(r3, r4)
    if r5 & BPF_F_INVALIDATE_HASH:
        run.skb["hash"] = 0
    return 0


def _read16(skb: SkBuff, span: slice) -> int:
    return int.from_bytes(skb.frame[span], "little")


@helper(Helper.l3_csum_replace, (A.PTR_TO_CTX, A.ANYTHING, A.ANYTHING, A.ANYTHING,
                                 A.ANYTHING), prog_types=TC)
def l3_csum_replace(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    if r5 & ~BPF_F_HDR_FIELD_MASK:
        return neg(errno.EINVAL)
    span = _span(run.skb, r2 & 0xFFFFFFFF, 2)
    if span is None:
        return neg(errno.EFAULT)
    new = _replace(_read16(run.skb, span), r3, r4, r5 & BPF_F_HDR_FIELD_MASK)
    if new is None:
        return neg(errno.EINVAL)
    run.skb.frame[span] = new.to_bytes(2, "little")
    return 0


@helper(Helper.l4_csum_replace, (A.PTR_TO_CTX, A.ANYTHING, A.ANYTHING, A.ANYTHING,
                                 A.ANYTHING), prog_types=TC)
def l4_csum_replace(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    """A pseudo-header field (BPF_F_PSEUDO_HDR) changes the checksum field the same way on a
    test-run skb (ip_summed is CHECKSUM_NONE); it only matters to skb->csum."""
    allowed = BPF_F_MARK_MANGLED_0 | BPF_F_MARK_ENFORCE | BPF_F_PSEUDO_HDR | BPF_F_HDR_FIELD_MASK
    if r5 & ~allowed:
        return neg(errno.EINVAL)
    span = _span(run.skb, r2 & 0xFFFFFFFF, 2)
    if span is None:
        return neg(errno.EFAULT)
    old = _read16(run.skb, span)
    mangled_zero = r5 & BPF_F_MARK_MANGLED_0 and not r5 & BPF_F_MARK_ENFORCE
    if mangled_zero and old == 0:
        return 0
    new = _replace(old, r3, r4, r5 & BPF_F_HDR_FIELD_MASK)
    if new is None:
        return neg(errno.EINVAL)
    if r5 & BPF_F_MARK_MANGLED_0 and new == 0:
        new = CSUM_MANGLED_0
    run.skb.frame[span] = new.to_bytes(2, "little")
    return 0


def _replace(sum16: int, old: int, new: int, size: int) -> int | None:
    if size == 0:
        return None if old else csum.csum_replace_by_diff(sum16, new & csum.U32)
    if size == 2:
        return csum.csum_replace2(sum16, old & csum.U16, new & csum.U16)
    if size == 4:
        return csum.csum_replace4(sum16, old & csum.U32, new & csum.U32)
    return None


@helper(Helper.clone_redirect, (A.PTR_TO_CTX, A.ANYTHING, A.ANYTHING), prog_types=TC)
def clone_redirect(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    """A copy of the packet as it is now goes to `ifindex` (RunEnv.interfaces must have it)."""
    if r3 & ~BPF_F_INGRESS:
        return neg(errno.EINVAL)
    ifindex = r2 & 0xFFFFFFFF
    if ifindex not in run.env.interfaces:
        return neg(errno.EINVAL)
    run.append("clone_redirects", {"ifindex": ifindex, "ingress": bool(r3 & BPF_F_INGRESS),
                                   "data": bytes(run.skb.frame)})
    return 0


@helper(Helper.redirect, (A.ANYTHING, A.ANYTHING), prog_types=TC)
def redirect(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    """Remembers the target; the redirect happens when the program returns TC_ACT_REDIRECT."""
    if r2 & ~BPF_F_INGRESS:
        return TcAct.SHOT
    run.record("redirect", {"ifindex": r1 & 0xFFFFFFFF, "ingress": bool(r2 & BPF_F_INGRESS)})
    return TcAct.REDIRECT


@helper(Helper.get_cgroup_classid, (A.PTR_TO_CTX,), prog_types=TC)
def get_cgroup_classid(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    return run.env.cgroup_classid & 0xFFFFFFFF


@helper(Helper.get_route_realm, (A.PTR_TO_CTX,), prog_types=TC)
def get_route_realm(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    return run.env.route_realm & 0xFFFFFFFF


def _be16(value: int) -> int:
    """A __be16 argument as the host-order number it stands for."""
    return int.from_bytes((value & 0xFFFF).to_bytes(2, "little"), "big")


@helper(Helper.skb_vlan_push, (A.PTR_TO_CTX, A.ANYTHING, A.ANYTHING), prog_types=TC)
def skb_vlan_push(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    """The new tag goes into the skb's accelerated tag; a tag already there moves into the
    frame first (skb_vlan_push). An unknown protocol becomes 802.1Q."""
    skb = run.skb
    proto = r2 & 0xFFFF
    if _be16(proto) not in (ETH_P_8021Q, ETH_P_8021AD):
        proto = _be16(ETH_P_8021Q)
    if skb.vlan_tag_present:
        skb.insert_vlan_tag(skb["vlan_proto"], skb["vlan_tci"])
    skb.put_vlan_tag(proto, r3 & 0xFFFF)
    return 0


@helper(Helper.skb_vlan_pop, (A.PTR_TO_CTX,), prog_types=TC)
def skb_vlan_pop(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    """Drop the accelerated tag (or the outer tag in the frame), then move the next tag of the
    frame, if any, into the accelerated tag (skb_vlan_pop)."""
    skb = run.skb
    if skb.vlan_tag_present:
        for name in ("vlan_present", "vlan_tci", "vlan_proto"):
            skb[name] = 0
    elif skb.frame_has_vlan():
        skb.pop_frame_vlan()
    else:
        return 0
    if skb.frame_has_vlan():
        proto = skb["protocol"]
        tci = int.from_bytes(skb.frame[14:16], "big")
        skb.pop_frame_vlan()
        skb.put_vlan_tag(proto, tci)
    return 0


@helper(Helper.skb_get_tunnel_key, (A.PTR_TO_CTX, A.PTR_TO_STACK, A.CONST_STACK_SIZE,
                                    A.ANYTHING), prog_types=TC)
def skb_get_tunnel_key(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    """The packet's tunnel metadata: set by skb_set_tunnel_key in this run, else RunEnv's
    tunnel_key (what a collect_md tunnel device would have received)."""
    key = run.skb.tunnel_key or run.env.tunnel_key
    if r3 != TUNNEL_KEY or r4 or key is None:
        return neg(errno.EINVAL)
    data = (int(key.get("tunnel_id", 0)) & 0xFFFFFFFF).to_bytes(4, "little")
    data += (int(key.get("remote_ipv4", 0)) & 0xFFFFFFFF).to_bytes(4, "little")
    run.mem.write(r2, data)
    return 0


@helper(Helper.skb_set_tunnel_key, (A.PTR_TO_CTX, A.PTR_TO_STACK, A.CONST_STACK_SIZE,
                                    A.ANYTHING), prog_types=TC)
def skb_set_tunnel_key(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    if r3 != TUNNEL_KEY or r4:
        return neg(errno.EINVAL)
    raw = run.mem.read(r2, TUNNEL_KEY)
    key = {"tunnel_id": int.from_bytes(raw[:4], "little"),
           "remote_ipv4": int.from_bytes(raw[4:], "little")}
    run.skb.tunnel_key = key
    run.record("tunnel_key", key)
    return 0
