"""`bpffs map ...`: bpftool's map commands."""

from __future__ import annotations

import errno
import os
import select
import sys

from bpffs import protocol
from bpffs.vm.errors import BpfError
from bpffs.vm.uapi import BPF_ANY, BPF_EXIST, BPF_NOEXIST, MAP_TYPE_NAMES, MapType

from ..sync import Client
from .args import Args, match, usage
from .objects import open_one, pin_one, show_infos
from .output import Output, hex_bytes, json_bytes

COMMANDS = ["show", "list", "create", "dump", "lookup", "update", "delete", "getnext", "pin",
            "event_pipe", "event-pipe", "help"]
TYPE_BY_NAME = {name: int(t) for t, name in MAP_TYPE_NAMES.items()}
FLAGS = {"any": BPF_ANY, "noexist": BPF_NOEXIST, "exist": BPF_EXIST}
ATTR_WHAT = {"key": "key size", "value": "value size", "entries": "max entries",
             "flags": "flags"}  # bpftool's words in its parse errors


def run(client: Client, args: Args, out: Output, show_pins: bool) -> None:
    command = args.keyword(COMMANDS, "map command") if args else "show"
    handler = {"show": show, "list": show, "create": create, "dump": dump, "lookup": lookup,
               "update": update, "delete": delete, "getnext": getnext, "pin": pin,
               "event_pipe": event_pipe, "event-pipe": event_pipe, "help": help_}[command]
    handler(client, args, out, show_pins)


USAGE = ("Usage: bpffs map { show | list }   [MAP]\n"
         "       bpffs map create     FILE type TYPE key KEY_SIZE value VALUE_SIZE \\\n"
         "                            entries MAX_ENTRIES name NAME [flags FLAGS]\n"
         "       bpffs map dump       MAP\n"
         "       bpffs map update     MAP key DATA value VALUE [UPDATE_FLAGS]\n"
         "       bpffs map lookup     MAP key DATA\n"
         "       bpffs map getnext    MAP [key DATA]\n"
         "       bpffs map delete     MAP key DATA\n"
         "       bpffs map pin        MAP FILE\n"
         "       bpffs map event_pipe MAP [cpu N index M]\n"
         "       MAP := { id MAP_ID | pinned FILE | name MAP_NAME }\n"
         "       DATA := { [hex] BYTES }\n"
         "       VALUE := { DATA | PROG (prog_array) }\n"
         "       UPDATE_FLAGS := { any | exist | noexist }\n"
         f"       TYPE := {{ {' | '.join(TYPE_BY_NAME)} }}")


def help_(client: Client, args: Args, out: Output, show_pins: bool) -> None:
    print(USAGE)


def _open(client: Client, args: Args) -> tuple[int, dict]:
    fd = open_one(client, "map", *args.object_ref("map"))
    return fd, client.obj_get_info_by_fd(fd)


def _print_info(out: Output, info: dict) -> None:
    out.line(f"{info['id']}: {info['type']}  name {info['name']}  flags {info['flags']:#x}")
    out.line(f"\tkey {info['bytes_key']}B  value {info['bytes_value']}B  max_entries"
             f" {info['max_entries']}  memlock {info['bytes_memlock']}B")


def show(client: Client, args: Args, out: Output, show_pins: bool) -> None:
    show_infos(client, args, out, "map", show_pins, _print_info)


def create(client: Client, args: Args, out: Output, show_pins: bool) -> None:
    path = args.next("FILE")
    attrs: dict[str, object] = {"flags": 0, "name": ""}
    while args:
        word = args.keyword(["type", "key", "value", "entries", "name", "flags"], "attribute")
        if word == "type":
            attrs["type"] = TYPE_BY_NAME[match(args.next("map type"), list(TYPE_BY_NAME),
                                               "map type")]
        elif word == "name":
            attrs["name"] = args.next("map name")
        else:
            attrs[word] = args.next_int(ATTR_WHAT[word])
    missing = [a for a in ("type", "key", "value", "entries") if a not in attrs]
    if missing:
        raise usage(f"map create needs {', '.join(missing)}")
    fd = client.map_create(attrs["type"], attrs["key"], attrs["value"], attrs["entries"],
                           attrs["flags"], attrs["name"])
    try:
        client.obj_pin(fd, path)
    finally:
        os.close(fd)
    out.emit(None)


def _is_fd_array(info: dict) -> bool:
    return info["type"] in (MAP_TYPE_NAMES[MapType.PROG_ARRAY],
                            MAP_TYPE_NAMES[MapType.PERF_EVENT_ARRAY])


def dump(client: Client, args: Args, out: Output, show_pins: bool) -> None:
    fd, info = _open(client, args)
    args.done()
    if _is_fd_array(info):
        raise BpfError(errno.EOPNOTSUPP, f"cannot dump {info['type']} map contents")
    entries, cursor = [], None
    while True:
        keys, values, cursor = client.map_lookup_batch(fd, 4096, cursor)
        entries += zip(keys, values, strict=True)
        if cursor is None:
            break
    os.close(fd)
    for key, value in entries:
        out.line(f"key: {hex_bytes(key)}  value: {hex_bytes(value)}")
    out.line(f"Found {len(entries)} element{'s' if len(entries) != 1 else ''}")
    out.emit([{"key": json_bytes(k), "value": json_bytes(v)} for k, v in entries])


def _key(args: Args, info: dict, required: bool = True) -> bytes | None:
    if not args.accept("key"):
        if required:
            raise usage("missing key")
        return None
    return args.data(info["bytes_key"], "key")


def lookup(client: Client, args: Args, out: Output, show_pins: bool) -> None:
    fd, info = _open(client, args)
    key = _key(args, info)
    args.done()
    assert key is not None
    try:
        value = client.map_lookup_elem(fd, key)
    except BpfError as e:
        if e.errno != errno.ENOENT:
            raise
        out.line(f"key:\n{hex_bytes(key)}\n\nNot found")
        out.emit(None)
        out.fail_with(errno.ENOENT)
        return
    finally:
        os.close(fd)
    out.line(f"key: {hex_bytes(key)}  value: {hex_bytes(value)}")
    out.emit({"key": json_bytes(key), "value": json_bytes(value)})


def update(client: Client, args: Args, out: Output, show_pins: bool) -> None:
    fd, info = _open(client, args)
    try:
        key = _key(args, info)
        if not args.accept("value"):
            raise usage("missing value")
        value_fd = None
        if info["type"] == MAP_TYPE_NAMES[MapType.PROG_ARRAY] and args.peek() in ("id", "pinned",
                                                                                   "name"):
            value_fd = open_one(client, "prog", *args.object_ref("prog"))
            value = value_fd.to_bytes(4, "little")
        else:
            value = args.data(info["bytes_value"], "value")
        flags = FLAGS[args.keyword(list(FLAGS), "update flag")] if args else BPF_ANY
        args.done()
        assert key is not None
        client.map_update_elem(fd, key, value, flags)
        if value_fd is not None:
            os.close(value_fd)
    finally:
        os.close(fd)
    out.emit(None)


def delete(client: Client, args: Args, out: Output, show_pins: bool) -> None:
    fd, info = _open(client, args)
    try:
        key = _key(args, info)
        args.done()
        assert key is not None
        client.map_delete_elem(fd, key)
    finally:
        os.close(fd)
    out.emit(None)


def getnext(client: Client, args: Args, out: Output, show_pins: bool) -> None:
    fd, info = _open(client, args)
    try:
        key = _key(args, info, required=False)
        args.done()
        nxt = client.map_get_next_key(fd, key)
    finally:
        os.close(fd)
    out.line("key: None" if key is None else f"key:\n{hex_bytes(key)}")
    out.line(f"next key:\n{hex_bytes(nxt)}")
    out.emit({"key": None if key is None else json_bytes(key), "next_key": json_bytes(nxt)})


def pin(client: Client, args: Args, out: Output, show_pins: bool) -> None:
    pin_one(client, args, out, "map")


def possible_cpus() -> int:
    """How many CPUs a perf event may name: libbpf's count, from the kernel's list of possible
    CPUs (`0-1`, `0-3,5`), else the online count."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            ranges = f.read().strip().split(",")
        return max(int(r.rsplit("-", 1)[-1]) for r in ranges) + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1


def event_pipe(client: Client, args: Args, out: Output, show_pins: bool) -> None:
    """Put a perf event for each CPU (or for `cpu N` at `index M`) into a PERF_EVENT_ARRAY and
    print every sample programs send through it, until interrupted. As bpftool (libbpf's
    perf_buffer), a CPU that does not exist is refused (perf_event_open gives EINVAL), and so
    is an index past the map (E2BIG), rather than waiting for samples that never come."""
    fd, info = _open(client, args)
    try:
        _event_pipe(client, fd, info, args, out)
    except KeyboardInterrupt:
        pass
    finally:
        os.close(fd)


def _event_pipe(client: Client, fd: int, info: dict, args: Args, out: Output) -> None:
    if info["type"] != MAP_TYPE_NAMES[MapType.PERF_EVENT_ARRAY]:
        raise BpfError(errno.EINVAL, f"map {info['id']} is a {info['type']} map, not a"
                       " perf_event_array")
    cpu = index = None
    while args:
        word = args.keyword(["cpu", "index"], "event_pipe option")
        if word == "cpu":
            cpu = args.next_int("cpu")
        else:
            index = args.next_int("index")
    if (cpu is None) != (index is None):
        raise usage("cpu and index must be specified together")
    cpus = possible_cpus()
    if cpu is not None and cpu >= cpus:
        raise BpfError(errno.EINVAL, f"failed to open perf buffer event on cpu #{cpu}: this"
                       f" machine's CPUs are 0-{cpus - 1}")
    if index is not None and index >= info["max_entries"]:
        raise BpfError(errno.E2BIG, f"index {index} is past the end of map {info['id']}"
                       f" (max_entries {info['max_entries']})")
    slots = ([(cpu, index)] if cpu is not None and index is not None
             else [(c, c) for c in range(min(info["max_entries"], cpus))])
    events: dict[int, int] = {}
    try:
        for event_cpu, slot in slots:
            event_fd = client.perf_event_open(event_cpu)
            events[event_fd] = slot
            client.map_update_elem(fd, slot.to_bytes(4, "little"),
                                   event_fd.to_bytes(4, "little"))
        poller = select.poll()
        for event_fd in events:
            poller.register(event_fd, select.POLLIN)
        while True:
            for event_fd, _ in poller.poll():
                record = os.read(event_fd, protocol.INLINE_MAX)
                if not record:
                    return
                sample_cpu, timestamp, data = protocol.unpack(record)
                out.line(f"== @{timestamp / 1e9:.6f} CPU: {sample_cpu}"
                         f" index: {events[event_fd]} ==")
                out.line(hex_bytes(data))
                out.emit({"timestamp": timestamp, "cpu": sample_cpu, "index": events[event_fd],
                          "data": json_bytes(data)})
                sys.stdout.flush()  # a sample shows when it comes, through a pipe too
    finally:
        for event_fd in events:
            os.close(event_fd)
