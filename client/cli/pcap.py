"""`bpffs pcap run PROG --pcap IN [--out OUT] [--json]`: replay a capture through a program
(socket filter, SCHED_CLS or SCHED_ACT) and report its verdicts; see bpffs.client.replay."""

from __future__ import annotations

import contextlib
import os
import time

import dpkt
from tqdm import tqdm

from bpffs.vm.errors import BpfError
from bpffs.vm.uapi import PROG_TYPE_NAMES, ProgType

from ..replay import DLT_EN10MB, Replay, open_capture
from ..sync import Client
from .args import Args, parse_int, usage
from .objects import open_one
from .output import Output, named

COMMANDS = ["run", "help"]
USAGE = ("Usage: bpffs pcap run PROG --pcap IN [--out OUT] [--tier TIER]"
         " [--interfaces IFINDEX,...] [--json]\n"
         "       PROG := { id PROG_ID | pinned FILE | name PROG_NAME }\n"
         "       TIER := { compiled | interpreter }")


def run(client: Client, args: Args, out: Output, show_pins: bool) -> None:
    command = args.keyword(COMMANDS, "pcap command") if args else "help"
    if command == "help":
        print(USAGE)
        return
    fd = open_one(client, "prog", *args.object_ref("prog"))
    try:
        replay_capture(client, fd, args, out)
    finally:
        os.close(fd)


def replay_capture(client: Client, fd: int, args: Args, out: Output) -> None:
    files: dict[str, str] = {}
    options: dict[str, object] = {}
    while args:
        word = args.next("option")
        if word in ("--json", "-j", "--pretty", "-p"):
            continue  # already applied by the top-level parser
        if word not in ("--pcap", "--out", "--tier", "--interfaces"):
            raise usage(f"unknown pcap run option '{word}' (--pcap IN, --out OUT, --tier TIER,"
                        " --interfaces IFINDEX,...)")
        value = args.next(f"{word} argument")
        if word == "--tier":
            options["tier"] = value
        elif word == "--interfaces":
            try:
                options["interfaces"] = [parse_int(i, "ifindex", 1, 2**31 - 1)
                                         for i in value.split(",")]
            except BpfError:
                raise usage(f"--interfaces takes ifindexes like 1,2,3, not '{value}'"
                            ) from None
        else:
            files[word] = value
    if "--pcap" not in files:
        raise usage("pcap run needs --pcap IN")
    type_name = client.obj_get_info_by_fd(fd)["type"]
    type_id = next(t for t, name in PROG_TYPE_NAMES.items() if name == type_name)
    with contextlib.ExitStack() as stack:
        with named(files["--pcap"]):
            capture = open_capture(stack.enter_context(open(files["--pcap"], "rb")))
        if type_id != ProgType.SOCKET_FILTER and capture.linktype != DLT_EN10MB:
            raise usage(f"{files['--pcap']}: tc programs take Ethernet frames; the capture's"
                        f" link type is {capture.linktype}")
        write = None
        if "--out" in files:
            with named(files["--out"]):
                sink = stack.enter_context(open(files["--out"], "wb"))
            writer = dpkt.pcap.Writer(sink, linktype=capture.linktype, snaplen=262144)
            write = lambda ts, data: writer.writepkt(data, ts=ts)  # noqa: E731
        replay = Replay(client, fd, type_id, write, **options)
        bar = stack.enter_context(tqdm(total=capture.size, unit="B", unit_scale=True,
                                       delay=1.0, disable=out.json or None, leave=False))
        started = time.perf_counter()
        summary = replay.replay(capture, lambda: bar.update(capture.position() - bar.n))
        summary.seconds = time.perf_counter() - started
        summary.damaged = capture.damaged
    _print(summary, out)
    out.emit(summary.as_dict())


def _print(summary, out: Output) -> None:
    rate = summary.packets / summary.seconds if summary.seconds else 0
    out.line(f"{summary.packets} packets, {summary.bytes} bytes through a {summary.prog_type}"
             f" program in {summary.seconds:.2f}s ({rate:,.0f} packets/s)")
    for verdict, count in summary.verdicts.most_common():
        out.line(f"  {verdict:<20} {count}")
    out.line(f"  accepted {summary.accepted_packets} packets, {summary.accepted_bytes} bytes"
             + (f"; {summary.written} written" if summary.written else ""))
    for classid, count in sorted(summary.classids.items()):
        out.line(f"  classid {classid:<11} {count}")
    for target, count in sorted(summary.redirects.items()):
        out.line(f"  redirect {target}: {count}")
    for target, count in sorted(summary.clone_redirects.items()):
        out.line(f"  clone_redirect {target}: {count}")
    if summary.truncated:
        out.line(f"  {summary.truncated} packets were captured truncated (run as captured)")
    for reason, count in summary.skipped.items():
        out.line(f"  skipped {count}: {reason}")
    for problem in summary.damaged:
        out.line(f"  warning: {problem}")
