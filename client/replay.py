"""pcap replay: run a socket filter, SCHED_CLS or SCHED_ACT program over every packet of a
capture (BPF_PROG_TEST_RUN per packet, batched: thousands of packets per request), count the
verdicts and write the packets that come out.

Classic pcap files are read with a plain struct loop: measured here, dpkt's reader costs
~3.5 us a packet against ~1 us, which alone would cap replay near the 200k packets/s goal.
pcapng goes through dpkt; output is written with dpkt's pcap Writer.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import operator
import os
import struct
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import dpkt

from bpffs.vm.errors import BpfError
from bpffs.vm.run import redirect_effect
from bpffs.vm.uapi import ETH_HLEN, ProgType, TcAct

from . import calls, pcap_index
from .calls import BufferRun
from .pcap_index import RECORD, Index
from .sync import Client
from .tally import tally

MAX_SNAPLEN = 262144  # tcpdump's MAXIMUM_SNAPLEN: larger records are "giant" and not run
DLT_EN10MB = 1
# Packets per request. Measured on 1M-packet replays: 2048 ran ~20% faster than 4096 (a request
# of ~0.8 MB and its unpacked copy stay in cache) and no slower than 1024 (fixed costs).
CHUNK = 2048
# Packets per request of a classic pcap file, sent where they are (a memfd, no Python per
# packet): large enough that a request's fixed costs vanish, small enough for the pipeline.
SPAN = 32768
PIPELINE_DEPTH = 2  # requests in flight: one running in the daemon, the next one queued
REPLAYABLE = {ProgType.SOCKET_FILTER, ProgType.SCHED_CLS, ProgType.SCHED_ACT}
# magic -> (struct of a record header, divisor of the sub-second field)
_PCAP_MAGIC = {0xA1B2C3D4: ("<IIII", 1e6), 0xA1B23C4D: ("<IIII", 1e9),
               0xD4C3B2A1: (">IIII", 1e6), 0x4D3CB2A1: (">IIII", 1e9)}
_PCAPNG_MAGIC = 0x0A0D0D0A


Chunk = tuple[list[float], list[bytes], list[int]]  # timestamps, captured bytes, wire lengths


@dataclass
class Span:
    """Packets of a classic pcap file where they are: `data` (the file, mapped) and the
    index of a run of its records (offsets from `base`, the first record's header)."""

    data: Any
    base: int
    index: Index

    @property
    def end(self) -> int:
        return self.index.end

    def stamp_at(self, at: int, layout: struct.Struct, divisor: float) -> float:
        """The timestamp of the packet whose bytes start at `at`."""
        sec, frac = layout.unpack_from(self.data, at - RECORD)
        return sec + frac / divisor


@dataclass
class Capture:
    linktype: int
    chunks: Iterator[Chunk]  # the packets, CHUNK at a time (per-packet calls cost too much)
    size: int  # bytes of the file, for progress
    position: Callable[[], int]  # bytes read so far
    damaged: list[str] = field(default_factory=list)  # what was wrong at the end of the file
    # A classic pcap file: its packets as Spans of SPAN packets, read without Python per
    # packet (Replay.replay sends them as they are); chunks and spans share one reader.
    spans: Iterator[Span] | None = None
    stamp: tuple[struct.Struct, float] | None = None  # (ts_sec, ts_frac) layout, divisor

    def packets(self) -> Iterator[tuple[float, bytes, int]]:
        for chunk in self.chunks:
            yield from zip(*chunk, strict=True)


def open_capture(f: BinaryIO, chunk: int = CHUNK) -> Capture:
    head = f.read(4)
    f.seek(0, 2)
    size = f.tell()
    f.seek(0)
    if len(head) < 4:
        raise BpfError(errno.EINVAL, "not a capture: the file is shorter than a pcap header")
    magic = struct.unpack("<I", head)[0]
    if magic in _PCAP_MAGIC:
        return _classic(f, size, chunk, *_PCAP_MAGIC[magic])
    if magic == _PCAPNG_MAGIC:
        return _pcapng(f, size, chunk)
    raise BpfError(errno.EINVAL, f"not a pcap or pcapng capture (magic {magic:#010x})")


def _classic(f: BinaryIO, size: int, chunk: int, layout: str, divisor: float) -> Capture:
    if size < 24:
        raise BpfError(errno.EINVAL, "truncated pcap file header")
    data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    linktype = struct.unpack_from(layout[0] + "I", data, 20)[0] & 0x0FFFFFFF
    state = {"pos": 24}
    capture = Capture(linktype, iter(()), size, lambda: state["pos"],
                      stamp=(struct.Struct(layout[0] + "II"), divisor))
    big_endian = layout[0] == ">"

    def spans(count: int) -> Iterator[Span]:
        pos, end = 24, len(data)
        while pos + RECORD <= end:
            span = Span(data, pos, pcap_index.index(data, pos, pos, count, big_endian))
            pos = state["pos"] = span.end
            if span.index.offsets:
                yield span
            if len(span.index.offsets) < count:
                break
        if pos + RECORD <= end:
            caplen = struct.unpack_from(layout[0] + "I", data, pos + 8)[0]
            capture.damaged.append(f"the last record claims {caplen} bytes, the file has"
                                   f" {end - pos - RECORD}: capture truncated")
        elif pos != end:
            capture.damaged.append(f"{end - pos} stray bytes after the last record")
        state["pos"] = end

    def chunks() -> Iterator[Chunk]:
        stamp = capture.stamp
        assert stamp is not None
        for span in spans(chunk):
            index, base = span.index, span.base
            yield ([span.stamp_at(base + o, *stamp) for o in index.offsets],
                   [data[base + o:base + o + n] for o, n in zip(index.offsets, index.lengths,
                                                                strict=True)],
                   index.wire.tolist())

    capture.chunks = chunks()
    capture.spans = spans(SPAN)
    return capture


def _pcapng(f: BinaryIO, size: int, chunk: int) -> Capture:
    try:
        reader = dpkt.pcapng.Reader(f)
    except (ValueError, dpkt.Error) as e:
        raise BpfError(errno.EINVAL, f"bad pcapng capture: {e}") from None
    capture = Capture(reader.datalink(), iter(()), size, f.tell)

    def chunks() -> Iterator[Chunk]:
        batch: Chunk = ([], [], [])
        try:
            for ts, buf in reader:
                batch[0].append(float(ts))
                batch[1].append(bytes(buf))
                batch[2].append(len(buf))
                if len(batch[1]) >= chunk:
                    yield batch
                    batch = ([], [], [])
        except (dpkt.Error, struct.error, ValueError) as e:
            capture.damaged.append(f"pcapng capture damaged: {e}")
        if batch[1]:
            yield batch

    capture.chunks = chunks()
    return capture


@dataclass
class Summary:
    """What a replay saw: the counts `bpffs pcap run` prints (and --json emits)."""

    prog_type: str
    packets: int = 0
    bytes: int = 0
    verdicts: Counter = field(default_factory=Counter)  # TC_ACT_* name, or accept/drop
    classids: Counter = field(default_factory=Counter)  # "1:2" -> packets
    redirects: Counter = field(default_factory=Counter)  # "ifindex 3 (egress)" -> packets
    clone_redirects: Counter = field(default_factory=Counter)  # target -> clones sent
    accepted_packets: int = 0
    accepted_bytes: int = 0
    written: int = 0
    truncated: int = 0  # captured shorter than on the wire: run on what was captured
    skipped: Counter = field(default_factory=Counter)  # reason -> packets not run
    damaged: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        doc = {k: (dict(v) if isinstance(v, Counter) else v) for k, v in vars(self).items()}
        doc["packets_per_second"] = round(self.packets / self.seconds) if self.seconds else 0
        return doc


def _tc_name(retval: int) -> str:
    value = retval - (1 << 32) if retval >= 1 << 31 else retval
    try:
        return f"TC_ACT_{TcAct(value).name}"
    except ValueError:
        return f"TC_ACT_{value}"


# Verdicts whose packet leaves the filter (written out), as the VM's u32 retval and signed.
_GOES_ON = {v for a in (TcAct.UNSPEC, TcAct.OK, TcAct.RECLASSIFY, TcAct.PIPE, TcAct.REPEAT,
                        TcAct.REDIRECT) for v in (int(a), int(a) & 0xFFFFFFFF)}




def _target(target: dict) -> tuple[int, bool]:
    """The VM's record of a (clone_)redirect, {"ifindex": N, "ingress": bool}, as a key."""
    return target["ifindex"], bool(target.get("ingress"))


def _tally(keys: array, weights: array | None = None) -> dict[int, tuple[int, int]]:
    """tally.tally, counted in Python where native code cannot."""
    counted = tally(keys, weights)
    if counted is None:
        counted = {}
        for key, weight in zip(keys, weights or itertools.repeat(0), strict=False):
            packets, total = counted.get(key, (0, 0))
            counted[key] = (packets + 1, total + weight)
    return counted


def _redirect(ifindex: int, ingress: bool) -> str:
    return f"ifindex {ifindex} ({'ingress' if ingress else 'egress'})"


PacketAt = Callable[[int], tuple[float, bytes]]  # packet i of a request: (timestamp, bytes)


class Replay:
    """Feed packets through a program and account for each result. The packets go to the
    daemon where they are, in a memfd (prog_test_run_buffer), and results come back in
    columns: a classic pcap file is read, sent and accounted for without Python per packet.
    Requests are pipelined on the client's connection (PIPELINE_DEPTH in flight, one memfd
    each): the daemon already runs request N+1 while this side accounts for request N."""

    def __init__(self, client: Client, prog_fd: int, prog_type: int,
                 write: Callable[[float, bytes], None] | None = None, chunk: int = CHUNK,
                 **options: Any):
        if prog_type not in REPLAYABLE:
            raise BpfError(errno.EINVAL, "pcap replay runs socket filters, SCHED_CLS and"
                           f" SCHED_ACT programs, not {ProgType(prog_type).name}")
        self.client, self.fd, self.write = client, prog_fd, write
        self.is_tc = prog_type != ProgType.SOCKET_FILTER
        self.shortest = ETH_HLEN if self.is_tc else 0
        self.summary = Summary(ProgType(prog_type).name.lower())
        self.chunk, self.options = chunk, options
        self._pending: list[bytes] = []
        self._pending_stamps: list[float] = []
        self._memfds: list[int] = []  # one a request in flight, reused in turn
        self._sent = 0
        # each request in flight: its packets' lengths, how to get a packet (to write it
        # out), and what returns its results
        self._in_flight: deque[tuple[array, PacketAt, Callable[[], BufferRun]]] = deque()
        client.run(calls.bind(client.session, prog_fd))  # pipelined calls bind nothing

    def close(self) -> None:
        while self._memfds:
            os.close(self._memfds.pop())

    def replay(self, capture: Capture, progress: Callable[[], None] | None = None) -> Summary:
        """Run every packet of a capture (Spans of a classic pcap file, else its chunks)."""
        stamp = capture.stamp
        if capture.spans is not None and stamp is not None:
            for span in capture.spans:
                self.feed_span(span, stamp)
                if progress is not None:
                    progress()
        else:
            for chunk in capture.chunks:
                self.feed(*chunk)
                if progress is not None:
                    progress()
        return self.finish()

    def feed_span(self, span: Span, stamp: tuple[struct.Struct, float]) -> None:
        """Run the packets of a classic pcap file's Span, sent as they are in the file."""
        if self._pending:
            self._send_pending()
        index, data, base = span.index, span.data, span.base
        offsets, lengths = self._runnable(index)

        def packet_at(i: int) -> tuple[float, bytes]:
            at = base + offsets[i]
            return span.stamp_at(at, *stamp), data[at:at + lengths[i]]

        self._send(memoryview(data)[base:span.end], offsets, lengths, packet_at)

    def feed(self, stamps: list[float], packets: list[bytes], wire: list[int]) -> None:
        """Run a chunk of packets (timestamps, captured bytes, lengths on the wire)."""
        s = self.summary
        lengths = list(map(len, packets))
        s.truncated += sum(map(operator.gt, wire, lengths))
        if lengths and (max(lengths) > MAX_SNAPLEN or min(lengths) < self.shortest):
            keep = self._keep(lengths)
            stamps = list(itertools.compress(stamps, keep))
            packets = list(itertools.compress(packets, keep))
        self._pending_stamps += stamps
        self._pending += packets
        if len(self._pending) >= self.chunk:
            self._send_pending()

    def _runnable(self, index: Index) -> tuple[array, array]:
        """The packets of an index that are run: the others (giants, runts) are counted."""
        self.summary.truncated += index.truncated
        offsets, lengths = index.offsets, index.lengths
        if index.longest > MAX_SNAPLEN or index.shortest < self.shortest:
            keep = self._keep(lengths)
            return array("Q", itertools.compress(offsets, keep)), \
                array("I", itertools.compress(lengths, keep))
        return offsets, lengths

    def _keep(self, lengths: Iterable[int]) -> list[bool]:
        """Which of these packets are run; the others (giants, runts) are counted."""
        keep = []
        for n in lengths:
            runnable = self.shortest <= n <= MAX_SNAPLEN
            keep.append(runnable)
            if not runnable:
                self.summary.skipped[f"giant (over {MAX_SNAPLEN} bytes)" if n > MAX_SNAPLEN
                                     else f"shorter than an Ethernet header ({ETH_HLEN} bytes)"
                                     ] += 1
        return keep

    def _send_pending(self) -> None:
        stamps, packets = self._pending_stamps, self._pending
        self._pending_stamps, self._pending = [], []
        lengths = array("I", map(len, packets))
        offsets = array("Q", itertools.accumulate(lengths, initial=0))
        offsets.pop()
        self._send(b"".join(packets), offsets, lengths, lambda i: (stamps[i], packets[i]))

    def _send(self, data: Any, offsets: array, lengths: array, packet_at: PacketAt) -> None:
        """One request: `data` into the next memfd, the packets at offsets in it."""
        if not offsets:
            return
        slot = self._sent % PIPELINE_DEPTH
        if len(self._memfds) <= slot:
            self._memfds.append(calls.packets_memfd())
        fd, view = self._memfds[slot], memoryview(data)
        at = 0
        while at < len(view):  # (its earlier requests are answered: the pipeline's depth)
            at += os.pwrite(fd, view[at:], at)
        self._sent += 1
        self._in_flight.append((lengths, packet_at, self.client.start(
            calls.prog_test_run_buffer(self.client.session, self.fd, fd, offsets, lengths,
                                       **self.options))))
        if len(self._in_flight) == PIPELINE_DEPTH:
            self._collect()

    def _collect(self) -> None:
        lengths, packet_at, result = self._in_flight.popleft()
        self._account(lengths, packet_at, result())

    def finish(self) -> Summary:
        """Run what is still pending and account for everything; returns the summary."""
        try:
            if self._pending:
                self._send_pending()
            while self._in_flight:
                self._collect()
        finally:
            self.close()
        return self.summary

    def _account(self, lengths: array, packet_at: PacketAt, run: BufferRun) -> None:
        """Count one request's results by value (tally: native), Python only for the packets
        refused, changed or with effects beyond a classid and a redirect."""
        s, errors, outputs, retvals = self.summary, run.errors, run.outputs, run.retvals
        for _err, message in errors.values():
            s.skipped[f"refused by the test run: {message}"] += 1
        refused_bytes = sum(lengths[i] for i in errors)
        s.packets += len(lengths) - len(errors)
        kept: list[bool] | None = None
        if self.is_tc:
            by_retval = _tally(retvals, lengths)
            packets, total = by_retval.get(0, (0, 0))  # (a refused packet's retval is 0)
            by_retval[0] = (packets - len(errors), total - refused_bytes)
            for retval, (packets, total) in by_retval.items():
                s.bytes += total
                if packets:
                    s.verdicts[_tc_name(retval)] += packets
                if retval in _GOES_ON:
                    s.accepted_packets += packets
                    s.accepted_bytes += total
            s.accepted_bytes += sum(len(d) - lengths[i] for i, d in outputs.items()
                                    if retvals[i] in _GOES_ON and i not in errors)
            if self.write is not None:
                kept = list(map(_GOES_ON.__contains__, retvals))
                for i in errors:
                    kept[i] = False
            for classid, (packets, _) in _tally(run.classids).items():
                if classid:
                    s.classids[f"{classid >> 16:x}:{classid & 0xFFFF:x}"] += packets
            for record, (packets, _) in _tally(run.redirects).items():
                if record:
                    s.redirects[_redirect(*_target(redirect_effect(record)))] += packets
            clones: Counter = Counter()
            for effects in run.effects.values():
                clones.update(map(_target, effects.get("clone_redirects", ())))
            for (ifindex, ingress), count in clones.items():
                s.clone_redirects[_redirect(ifindex, ingress)] += count
        else:
            s.bytes += sum(lengths) - refused_bytes
            # A socket filter cannot change the packet; it keeps its first retval bytes. (The
            # test run's data_out is not the packet: the kernel zeroes its Ethernet type.)
            outputs = {}
            sizes = list(map(min, retvals, lengths))
            for i in errors:
                sizes[i] = 0
            kept = list(map(bool, sizes))
            accepted = sum(kept)
            s.accepted_packets += accepted
            s.accepted_bytes += sum(sizes)
            s.verdicts["accept"] += accepted
            s.verdicts["drop"] += len(lengths) - len(errors) - accepted
        if self.write is not None:
            assert kept is not None
            for i in itertools.compress(range(len(kept)), kept):
                ts, data = packet_at(i)
                out = outputs.get(i, data)
                self.write(ts, out if self.is_tc else out[:sizes[i]])
                s.written += 1
