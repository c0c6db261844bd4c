"""The batch driver: one native function that runs a program over a buffer of packets
(vm.native.batch), so that the common packet costs no Python at all.

For each packet it does what PacketBatch does in Python: SkBuff.reload (the __sk_buff fields
of a fresh skb on the loopback device), Run.reset (budget, the map values the last run
mapped), the run itself, and the columns of the result: r0, tc_classid and bpf_redirect's
record. It returns to Python at the first packet it cannot finish alone (abi.Stop): one that
does not fit an skb, one whose run ended with a status, set a field only Python reports
(mark, priority, tc_index, a vlan tag), or whose callback into Python left Python holding
part of its outcome (glue._Invocation.leave sets BATCH_STOP). The
context's BATCH_PACKET says which packet a callback is for; Python clears it.
"""

from __future__ import annotations

from llvmlite import ir

from ..context import (
    LOOPBACK_IFINDEX,
    MAX_PACKET,
    PACKET_HOST,
    PACKET_MULTICAST,
    PACKET_OTHERHOST,
    SK_BUFF_SIZE,
    SKB,
)
from ..memory import FIRST_DYNAMIC_REGION
from ..uapi import ETH_ALEN, ETH_HLEN
from .abi import ENTRY_WORDS, Batch, Field, Stop

I1, I8, I16, I32, I64 = (ir.IntType(n) for n in (1, 8, 16, 32, 64))
PTR = ir.PointerType()
DRIVER_NAME = "bpf_batch"  # (ctx, batch) -> 0
DRIVER_TYPE = ir.FunctionType(I64, [PTR, PTR])
REPEAT_NAME = "bpf_repeat"  # (ctx, times, budget) -> r0 of the last repetition
REPEAT_TYPE = ir.FunctionType(I64, [PTR, I64, I64])
# The fields whose value Python turns into effects (Run.all_effects); tc_classid has a column.
PYTHON_REPORTED = ("mark", "vlan_present", "vlan_tci", "vlan_proto", "priority", "tc_index")
_ETHERTYPE_AT = 2 * ETH_ALEN
_ENTRY_BYTES = ENTRY_WORDS * 8


def write_driver(module: ir.Module, main: ir.Function, memset: ir.Function) -> None:
    """Add bpf_batch(ctx, batch) to the module of a program whose entry function is `main`
    (FUNCTION_TYPE of vm.native.ir); `memset` is the module's llvm.memset."""
    fn = ir.Function(module, DRIVER_TYPE, DRIVER_NAME)
    ctx, batch = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))

    def word(base: ir.Value, index: int) -> ir.Value:
        return b.gep(base, [ir.Constant(I64, index)], source_etype=I64)

    def get(f: Batch) -> ir.Value:
        return b.load(word(batch, f), typ=I64)

    def put(f: Field, value: ir.Value | int) -> None:
        b.store(value if isinstance(value, ir.Value) else ir.Constant(I64, value),
                word(ctx, f))

    def skb_word(name: str) -> ir.Value:
        return b.gep(skb, [ir.Constant(I64, SKB[name])], source_etype=I8)

    def const(value: int, typ: ir.IntType = I64) -> ir.Constant:
        return ir.Constant(typ, value)

    buffer = b.inttoptr(get(Batch.BUFFER), PTR)
    offsets = b.inttoptr(get(Batch.OFFSETS), PTR)
    lengths = b.inttoptr(get(Batch.LENGTHS), PTR)
    retvals = b.inttoptr(get(Batch.RETVALS), PTR)
    classids = b.inttoptr(get(Batch.CLASSIDS), PTR)
    redirects = b.inttoptr(get(Batch.REDIRECTS), PTR)
    skb = b.inttoptr(get(Batch.SKB), PTR)
    count, first, data_start = get(Batch.COUNT), get(Batch.NEXT), get(Batch.DATA_START)
    budget, r1 = get(Batch.BUDGET), get(Batch.R1)
    start = b.block

    loop, body, ran, finish, done = (fn.append_basic_block(n) for n in (
        "loop", "body", "ran", "finish", "done"))
    unfit = fn.append_basic_block("unfit")
    b.branch(loop)

    b.position_at_end(loop)
    i = b.phi(I64, name="i")
    i.add_incoming(first, start)
    b.cbranch(b.icmp_unsigned("<", i, count), body, done)

    # SkBuff.reload, when the packet fits (else Python refuses it, or makes a new skb).
    b.position_at_end(body)
    length = b.zext(b.load(b.gep(lengths, [i], source_etype=I32), typ=I32), I64)
    fits = b.and_(b.icmp_unsigned(">=", length, const(ETH_HLEN)),
                  b.icmp_unsigned("<=", length, const(MAX_PACKET)))
    reload = fn.append_basic_block("reload")
    b.cbranch(fits, reload, unfit)
    b.position_at_end(reload)
    frame = b.gep(buffer, [b.load(b.gep(offsets, [i], source_etype=I64), typ=I64)],
                  source_etype=I8)
    b.call(memset, [skb, const(0, I8), const(SK_BUFF_SIZE), const(0, I1)])
    b.store(b.trunc(b.sub(length, data_start), I32), skb_word("len"))
    first_octet = b.load(frame, typ=I8)
    no_address = b.and_(
        b.icmp_unsigned("==", b.load(frame, typ=I32, align=1), const(0, I32)),
        b.icmp_unsigned("==", b.load(b.gep(frame, [const(4)], source_etype=I8), typ=I16,
                                     align=1), const(0, I16)))
    group = b.icmp_unsigned("!=", b.and_(first_octet, const(1, I8)), const(0, I8))
    pkt_type = b.select(group, const(PACKET_MULTICAST, I32),
                        b.select(no_address, const(PACKET_HOST, I32),
                                 const(PACKET_OTHERHOST, I32)))
    b.store(pkt_type, skb_word("pkt_type"))
    ethertype = b.load(b.gep(frame, [const(_ETHERTYPE_AT)], source_etype=I8), typ=I16,
                       align=1)  # as the bytes are: protocol is __be16
    b.store(b.zext(ethertype, I32), skb_word("protocol"))
    b.store(const(LOOPBACK_IFINDEX, I32), skb_word("ifindex"))

    put(Field.PACKET_DATA, b.ptrtoint(frame, I64))
    put(Field.PACKET_START, data_start)
    put(Field.PACKET_END, length)
    put(Field.REDIRECT, 0)
    put(Field.BATCH_PACKET, b.add(i, const(1)))
    r0, python = _reset_and_run(b, ctx, main, memset, r1, budget)
    b.store(b.trunc(r0, I32), b.gep(retvals, [i], source_etype=I32))
    b.store(b.load(skb_word("tc_classid"), typ=I32), b.gep(classids, [i], source_etype=I32))
    b.store(b.load(word(ctx, Field.REDIRECT), typ=I64), b.gep(redirects, [i],
                                                               source_etype=I64))
    zero = const(0)
    for name in PYTHON_REPORTED:
        python = b.or_(python, b.zext(b.load(skb_word(name), typ=I32), I64))
    b.cbranch(b.icmp_unsigned("==", python, zero), ran, finish)

    b.position_at_end(ran)
    i.add_incoming(b.add(i, const(1)), ran)
    b.branch(loop)

    for block, stop, at in ((unfit, Stop.UNFIT, i), (finish, Stop.FINISH, i),
                            (done, Stop.DONE, count)):
        b.position_at_end(block)
        b.store(at, word(batch, Batch.NEXT))
        b.store(const(stop), word(batch, Batch.STOPPED))
        b.ret(zero)


def write_repeat(module: ir.Module, main: ir.Function, memset: ir.Function) -> None:
    """Add bpf_repeat(ctx, times, budget): BPF_PROG_TEST_RUN's repeat loop on one skb, as
    Program.test_run_steps runs it (Run.reset between repetitions: the budget, the map
    values the last one mapped; the skb is not reset, as in the kernel). It stops after a
    repetition that ended with a status or made Python set BATCH_STOP; REPEATED says how
    many ran."""
    fn = ir.Function(module, REPEAT_TYPE, REPEAT_NAME)
    ctx, times, budget = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))

    def word(f: Field) -> ir.Value:
        return b.gep(ctx, [ir.Constant(I64, f)], source_etype=I64)

    zero = ir.Constant(I64, 0)
    r1 = b.load(word(Field.ARG_R1), typ=I64)
    start = b.block
    loop, body, done = (fn.append_basic_block(n) for n in ("loop", "body", "done"))
    b.branch(loop)
    b.position_at_end(loop)
    k, r0 = b.phi(I64, "k"), b.phi(I64, "r0")
    k.add_incoming(zero, start)
    r0.add_incoming(zero, start)
    b.cbranch(b.icmp_unsigned("<", k, times), body, done)

    b.position_at_end(body)
    result, stop = _reset_and_run(b, ctx, main, memset, r1, budget)
    ran = b.add(k, ir.Constant(I64, 1))
    body_end = b.block
    k.add_incoming(ran, body_end)
    r0.add_incoming(result, body_end)
    stopped = fn.append_basic_block("stopped")
    b.cbranch(b.icmp_unsigned("==", stop, zero), loop, stopped)

    b.position_at_end(stopped)
    b.store(ran, word(Field.REPEATED))
    b.ret(result)
    b.position_at_end(done)
    b.store(k, word(Field.REPEATED))
    b.ret(r0)


def _reset_and_run(b: ir.IRBuilder, ctx: ir.Value, main: ir.Function, memset: ir.Function,
                   r1: ir.Value, budget: ir.Value) -> tuple[ir.Value, ir.Value]:
    """Run.reset (the budget; the map values the last run mapped, unmapped) and a run of
    `main` with r1 = ctx: its r0, and non-zero where Python must look (a status, or
    BATCH_STOP from a callback)."""
    def word(f: Field) -> ir.Value:
        return b.gep(ctx, [ir.Constant(I64, f)], source_etype=I64)

    b.store(budget, word(Field.BUDGET))
    mapped = b.sub(b.load(word(Field.NEXT_ID), typ=I64), ir.Constant(I64, FIRST_DYNAMIC_REGION))
    table = b.load(word(Field.TABLE), typ=PTR)
    b.call(memset, [b.gep(table, [ir.Constant(I64, FIRST_DYNAMIC_REGION * ENTRY_WORDS)],
                          source_etype=I64),
                    ir.Constant(I8, 0), b.mul(mapped, ir.Constant(I64, _ENTRY_BYTES)),
                    ir.Constant(I1, 0)])
    b.store(ir.Constant(I64, FIRST_DYNAMIC_REGION), word(Field.NEXT_ID))
    zero = ir.Constant(I64, 0)
    r0 = b.call(main, [ctx, r1, zero, zero, zero, zero, zero])
    python = b.or_(b.load(word(Field.STATUS), typ=I64), b.load(word(Field.BATCH_STOP), typ=I64))
    return r0, python
