"""PacketBatch.feed_buffer on the native tier: the batch driver (vm.native.driver) runs the
packets of one buffer and writes the columns itself; Python only finishes the packets the
driver stops at (abi.Stop) and starts it again after each.

The columns are the batch's own arrays (grown before the driver runs, never while it runs),
the packets are read where they are (a daemon's mapping of a client's memfd), and the run's
skb is the one PacketBatch made for its first packet, its context reloaded in place.
"""

from __future__ import annotations

import ctypes
from array import array
from typing import TYPE_CHECKING

from ..errors import BpfError, VmFault
from ..isa import U32
from ..memory import FIRST_DYNAMIC_REGION
from ..runtime import PacketExit, TailCall
from .abi import Batch, Stop
from .regions import buffer_address

if TYPE_CHECKING:
    from ..run import Buffer, PacketBatch
    from .glue import NativeProgram, _Invocation

DRIVER = ctypes.PYFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64)  # (ctx, batch)


class Packets:
    """The packets of one driver run: a buffer and where each is in it."""

    __slots__ = ("buffer", "lengths", "offsets", "view")

    def __init__(self, buffer: Buffer, offsets: array, lengths: array):
        self.buffer, self.offsets, self.lengths = buffer, offsets, lengths
        self.view = memoryview(buffer)

    def packet(self, index: int) -> bytes:
        return bytes(self.at(index))

    def at(self, index: int) -> memoryview:
        """Packet `index` where it is (no copy: a packet too large for an skb is refused on
        its length, never copied)."""
        start = self.offsets[index]
        return self.view[start:start + self.lengths[index]]


def run_batch(native: NativeProgram, batch: PacketBatch, buffer: Buffer, offsets: array,
              lengths: array, first: int) -> None:
    """Run the packets into the columns of `batch` from index `first` on."""
    from .glue import _invocation

    packets = Packets(buffer, offsets, lengths)
    count, at = len(offsets), 0
    while at < count and (batch.run is None or batch.run.skb is None):
        batch.run_one(first + at, packets.at(at))  # makes the run (and its skb)
        at += 1
    if at == count:
        return
    run = batch.run
    assert run is not None and run.skb is not None
    call, nested = _invocation(run)
    assert not nested
    desc = (ctypes.c_uint64 * len(Batch))()
    desc[Batch.BUFFER] = buffer_address(packets.view)
    desc[Batch.OFFSETS], desc[Batch.LENGTHS] = offsets.buffer_info()[0], \
        lengths.buffer_info()[0]
    desc[Batch.COUNT] = count
    desc[Batch.RETVALS] = batch.retvals.buffer_info()[0] + 4 * first
    desc[Batch.CLASSIDS] = batch.classids.buffer_info()[0] + 4 * first
    desc[Batch.REDIRECTS] = batch.redirects.buffer_info()[0] + 8 * first
    desc[Batch.BUDGET] = batch.env.budget
    address = ctypes.addressof(desc)
    context, table, mem = call.context, call.table, run.mem
    while at < count:
        run.reset()
        run.prog = batch.prog
        table.sync(mem)
        desc[Batch.NEXT] = at
        desc[Batch.SKB] = buffer_address(run.skb.ctx)
        desc[Batch.DATA_START] = run.skb.data_start
        desc[Batch.R1] = run.ctx_addr
        call.run, call.prog, call.packet, call.maps, call.batch = run, batch.prog, \
            native.uses_packet, native.maps, packets
        context.table, context.table_len = table.address, table.length
        context.next_id, context.batch_stop = mem._next_id, 0
        try:
            native.driver(call.address, address)
            at = desc[Batch.NEXT]
            stopped = desc[Batch.STOPPED]
            if stopped == Stop.FINISH:
                _finish(native, batch, call, first + at, packets.packet(at))
        finally:
            # The map values native code mapped: no later packet may reach them; nor the
            # last packet's redirect record (the driver's column has it) a later run.
            table.clear(FIRST_DYNAMIC_REGION, max(context.next_id, mem._next_id))
            context.batch_packet = context.redirect = 0
            call.run = call.batch = None
        if stopped == Stop.DONE:
            break
        if stopped == Stop.UNFIT:
            batch.run_one(first + at, packets.at(at))
        at += 1


def _finish(native: NativeProgram, batch: PacketBatch, call: _Invocation, index: int,
            data: bytes) -> None:
    """The packet the driver stopped after: its status raised and handled as PacketBatch
    does, its effects and output recorded. Its classid and redirect columns are Python's to
    write now (a fault leaves them 0, a tail call's target decides them)."""
    context = call.context
    run = call.running
    batch.classids[index] = batch.redirects[index] = 0
    call.enter()  # (the packet, and the redirect record as an effect)
    call.batch = None  # a tail call's target runs as any other entry
    try:
        try:
            if context.status:
                if context.next_id != run.mem._next_id:
                    call.adopt()  # for a fault's message
                native._raise(call, run)
        except PacketExit:
            batch.retvals[index] = 0
        except TailCall:
            target, run.tail_target = run.tail_target, None
            call.run = None
            batch.retvals[index] = target.execute(run, batch.tier) & U32
    except (BpfError, VmFault) as e:
        batch.retvals[index] = 0
        batch.refuse(index, e)
        return
    batch.finish(index, data)
