"""`bpffs prog ...`: bpftool's program commands."""

from __future__ import annotations

import os
import sys
import time

from bpffs import vm
from bpffs.vm.errors import VerifierError

from ..loader.elf import PROG_TYPE_WORDS, read_object
from ..loader.load import LoadOptions, load_object
from ..sync import Client
from .args import Args, usage
from .objects import open_one, pin_one, show_infos
from .output import Output, hex_bytes, named

COMMANDS = ["show", "list", "dump", "pin", "run", "load", "loadall", "tracelog", "help"]


def run(client: Client, args: Args, out: Output, show_pins: bool) -> None:
    command = args.keyword(COMMANDS, "prog command") if args else "show"
    handler = {"show": show, "list": show, "dump": dump, "pin": pin, "run": run_prog,
               "load": load, "loadall": load_all, "tracelog": tracelog, "help": help_}[command]
    handler(client, args, out, show_pins)


USAGE = ("Usage: bpffs prog { show | list } [PROG]\n"
         "       bpffs prog dump xlated PROG [opcodes]\n"
         "       bpffs prog pin     PROG FILE\n"
         "       bpffs prog run     PROG data_in FILE [data_out FILE [data_size_out L]]\n"
         "                          [ctx_in FILE [ctx_out FILE [ctx_size_out M]]] [repeat N]\n"
         "       bpffs prog load    OBJ PATH [type TYPE] [section NAME] [pinmaps DIR]"
         " [verbose]\n"
         "       bpffs prog loadall OBJ DIR [type TYPE] [pinmaps DIR] [verbose]\n"
         "       bpffs prog tracelog\n"
         "       PROG := { id PROG_ID | pinned FILE | name PROG_NAME }\n"
         "       TYPE := { socket | kprobe | classifier | tc | action }\n"
         "       tc maps are pinned under $TC_BPF_MNT (default: the bpffs mount)")


def help_(client: Client, args: Args, out: Output, show_pins: bool) -> None:
    print(USAGE)


def _print_info(out: Output, info: dict) -> None:
    gpl = "  gpl" if info["gpl_compatible"] else ""
    out.line(f"{info['id']}: {info['type']}  name {info['name']}  tag {info['tag']}{gpl}")
    loaded = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(info["loaded_at"]))
    runs = (f"  run_time_ns {info['run_time_ns']} run_cnt {info['run_cnt']}"
            if "run_cnt" in info else "")
    out.line(f"\tloaded_at {loaded}  uid {info['uid']}{runs}")
    maps = f"  map_ids {','.join(map(str, info['map_ids']))}" if info["map_ids"] else ""
    out.line(f"\txlated {info['bytes_xlated']}B  not jited  memlock {info['bytes_memlock']}B"
             f"{maps}")
    if "tier" in info:  # (a daemon before tiers sends none)
        out.line(f"\ttier {info['tier']}")


def show(client: Client, args: Args, out: Output, show_pins: bool) -> None:
    show_infos(client, args, out, "prog", show_pins, _print_info)


def dump(client: Client, args: Args, out: Output, show_pins: bool) -> None:
    args.keyword(["xlated"], "dump kind (only xlated: programs are not jited)")
    fd = open_one(client, "prog", *args.object_ref("prog"))
    opcodes = args.accept("opcodes")
    args.done()
    try:
        info = client.obj_get_info_by_fd(fd)
        insns = client.prog_xlated(fd)
    finally:
        os.close(fd)
    lines = vm.disassemble(insns, maps=info["map_ids"])
    if out.json:
        out.emit([{"pc": i, "disasm": line.split(": ", 1)[1] if ": " in line else line}
                  for i, line in enumerate(lines)])
        return
    for pc, line in enumerate(lines):
        out.line(line)
        if opcodes:
            out.line(f"       {hex_bytes(insns[pc * 8:pc * 8 + 8])}")


def pin(client: Client, args: Args, out: Output, show_pins: bool) -> None:
    pin_one(client, args, out, "prog")


def _read_input(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with named(path), open(path, "rb") as f:
        return f.read()


def _write_output(path: str, data: bytes, out: Output) -> None:
    if path == "-":
        out.line(hex_bytes(data))
        return
    with named(path), open(path, "wb") as f:
        f.write(data)


def run_prog(client: Client, args: Args, out: Output, show_pins: bool) -> None:
    fd = open_one(client, "prog", *args.object_ref("prog"))
    options: dict[str, object] = {"repeat": 1, "data_size_out": 32 * 1024}
    while args:
        word = args.keyword(["data_in", "data_out", "data_size_out", "ctx_in", "ctx_out",
                             "ctx_size_out", "repeat"], "run option")
        options[word] = args.next_int(word) if word in ("data_size_out", "ctx_size_out",
                                                        "repeat") else args.next(word)  # u32s
    if "data_in" not in options:
        raise usage("prog run needs data_in FILE")
    try:
        result = client.prog_test_run(fd, _read_input(str(options["data_in"])),
                                      int(options["repeat"]),
                                      _read_input(str(options["ctx_in"]))
                                      if "ctx_in" in options else None,
                                      int(options["data_size_out"]))
    finally:
        os.close(fd)
    if "data_out" in options:
        _write_output(str(options["data_out"]), result.data_out, out)
    if "ctx_out" in options:
        _write_output(str(options["ctx_out"]), result.ctx_out, out)
    average = " (average)" if int(options["repeat"]) > 1 else ""
    out.line(f"Return value: {result.retval}, duration{average}: {result.duration}ns")
    doc = {"retval": result.retval, "duration": result.duration}
    if "data_out" in options:
        doc["data_out"] = list(result.data_out)
    out.emit(doc)


def load_all(client: Client, args: Args, out: Output, show_pins: bool) -> None:
    load(client, args, out, show_pins, every=True)


def load(client: Client, args: Args, out: Output, show_pins: bool, every: bool = False) -> None:
    """`load OBJ PATH`: the object's first program (or `section NAME`, with the tail-call
    targets of the object), pinned at PATH; `loadall OBJ DIR`: every program, pinned as
    DIR/<name>. Maps are created or reused by the object's pinning conventions."""
    obj, path = args.next("OBJ"), args.next("PATH")
    options = LoadOptions()
    pinmaps = None
    while args:
        word = args.keyword(["type", "section", "pinmaps", "verbose"], "load option")
        if word == "type":
            name = args.next("TYPE")
            if name not in PROG_TYPE_WORDS:
                raise usage(f"unknown program type '{name}' (expected one of:"
                            f" {', '.join(PROG_TYPE_WORDS)})")
            options.prog_type = PROG_TYPE_WORDS[name]
        elif word == "section" and not every:
            options.sections = [args.next("section NAME")]
        elif word == "pinmaps":
            pinmaps = args.next("pinmaps DIR")
        elif word == "verbose":
            options.log_level = 1
        else:
            raise usage(f"'{word}' does not go with loadall")
    spec = read_object(obj)
    if not every and options.sections is None:
        options.sections = [spec.program().section]
    try:
        loaded = load_object(client, spec, options)
    except VerifierError as e:
        if e.log:
            print(e.log.rstrip(), file=sys.stderr)
        raise
    with loaded:
        try:
            if every:
                loaded.mkdirs(path)
                loaded.pin_programs(client, path)
            else:
                assert options.sections is not None
                loaded.pin(client, loaded.programs[spec.program(options.sections[0]).name],
                           path)
            if pinmaps:
                loaded.pin_maps(client, pinmaps)
        except BaseException:
            loaded.roll_back()
            raise
        for name, log in loaded.logs.items():
            out.line(f"-- verifier log of {name}:\n{log.rstrip()}")
        out.emit({"programs": {n: client.obj_get_info_by_fd(fd)["id"]
                               for n, fd in loaded.programs.items()},
                  "maps": {n: client.obj_get_info_by_fd(fd)["id"]
                           for n, fd in loaded.maps.items()},
                  "reused": loaded.reused, "pinned": loaded.created,
                  "logs": loaded.logs})


def tracelog(client: Client, args: Args, out: Output, show_pins: bool) -> None:
    """Stream trace_printk output (the daemon's trace_pipe) until interrupted."""
    args.done()
    after = 0
    try:
        while True:
            for seq, line in client.trace_read(after):
                after = seq
                out.line(line[:-1] if line.endswith("\n") else line)  # as trace_pipe: one \n
                out.emit({"seq": seq, "line": line})
                sys.stdout.flush()
    except KeyboardInterrupt:
        pass
