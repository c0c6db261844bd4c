"""Opening the object a command names (`id N`, `pinned PATH`, `name NAME`), as bpftool does."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator

from bpffs.vm.errors import BpfError

from ..sync import Client
from .args import Args, parse_int
from .output import Output


def all_ids(client: Client, kind: str) -> Iterator[int]:
    obj_id = 0
    while True:
        try:
            obj_id = client.get_next_id(kind, obj_id)
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return
            raise
        yield obj_id


def open_refs(client: Client, kind: str, how: str, value: str) -> list[int]:
    """Fds of every object the reference names (`name` may name several)."""
    if how == "id":
        return [client.get_fd_by_id(kind, parse_int(value, f"{kind} id"))]
    if how == "pinned":
        fd = client.obj_get(value)
        info = client.obj_get_info_by_fd(fd)
        if _kind_of(info) != kind:
            raise BpfError(errno.EINVAL, f"{value} is a pinned {_kind_of(info)}, not a {kind}")
        return [fd]
    fds = []
    for obj_id in all_ids(client, kind):
        try:
            fd = client.get_fd_by_id(kind, obj_id)
        except BpfError:
            continue  # freed meanwhile
        if client.obj_get_info_by_fd(fd).get("name") == value:
            fds.append(fd)
    if not fds:
        raise BpfError(errno.ENOENT, f"no {kind} named '{value}'")
    return fds


def open_one(client: Client, kind: str, how: str, value: str) -> int:
    fds = open_refs(client, kind, how, value)
    if len(fds) > 1:
        raise BpfError(errno.EINVAL, f"{len(fds)} {kind}s are named '{value}': use id or"
                       " pinned")
    return fds[0]


def pin_one(client: Client, args: Args, out: Output, kind: str) -> None:
    """`map pin` / `prog pin`: MAP|PROG FILE, the object pinned at FILE."""
    fd = open_one(client, kind, *args.object_ref(kind))
    try:
        path = args.next("FILE")
        args.done()
        client.obj_pin(fd, path)
    finally:
        os.close(fd)
    out.emit(None)


def show_infos(client: Client, args: Args, out: Output, kind: str, show_pins: bool,
               print_info: Callable[[Output, dict], None]) -> None:
    """`map show` / `prog show`: the named objects, or every object of `kind`, each as
    print_info writes it, then (bpffs -f) the paths it is pinned at."""
    single = bool(args)
    if args:
        fds = open_refs(client, kind, *args.object_ref(kind))
    else:
        fds = []
        for obj_id in all_ids(client, kind):
            try:
                fds.append(client.get_fd_by_id(kind, obj_id))
            except BpfError:
                continue  # freed meanwhile
    args.done()
    infos = []
    for fd in fds:
        infos.append(client.obj_get_info_by_fd(fd))
        os.close(fd)
    for info in infos:
        print_info(out, info)
        if show_pins:
            for path in info["pinned"]:
                out.line(f"\tpinned {path}")
    docs = [{k: v for k, v in i.items() if k != "entries" and (show_pins or k != "pinned")}
            for i in infos]
    out.emit(docs[0] if single and len(docs) == 1 else docs)


def _kind_of(info: dict) -> str:
    return "map" if "bytes_key" in info else "prog" if "tag" in info else info.get("type", "?")
