"""The bpffsd client library: libbpf's low-level calls on real fds, a dict-like Map, ELF
objects loaded into Map and Program objects (load_object), a synchronous Client and a trio
AsyncClient. See bpffs.client.libbpf for the call list.

    from bpffs.client import Map, MapType, ProgType, load_object
    counts = Map.create(MapType.HASH, 4, 8, 1024, key=int, value=int)
    with load_object("cls.o", prog_type=ProgType.SCHED_CLS) as obj:
        obj.programs["cls_ingress"].test_run(packet)

Finding the daemon: $BPFFS_SOCKET, else your own daemon's socket when it exists, else the
system daemon's (/run/bpffsd/control.sock). Each reply is awaited at most `timeout` seconds
(Client(timeout=...), default 30; None for no limit): BpfError(ETIMEDOUT) after that.

Errors are BpfError (an OSError with the kernel's errno); those that carry more are its
subclasses: VerifierError (a refused program's verifier log, `.log`, when log_level > 0),
BatchError (a batch call's `.count` done before the failure), RunOutputError (a test run
whose data_out did not fit: its results in `.output`).
"""

from typing import TYPE_CHECKING

from bpffs.vm.errors import BatchError, BpfError, RunOutputError, VerifierError
from bpffs.vm.uapi import BPF_ANY, BPF_EXIST, BPF_NOEXIST, MapType, ObjFlag, ProgType

from .calls import ProgFd, TestRun
from .codecs import BytesCodec, Codec, CtypesCodec, IntCodec, StructCodec
from .libbpf import (
    close,
    map_create,
    map_delete_batch,
    map_delete_elem,
    map_get_fd_by_id,
    map_get_next_id,
    map_get_next_key,
    map_lookup_and_delete_batch,
    map_lookup_batch,
    map_lookup_elem,
    map_update_batch,
    map_update_elem,
    obj_get,
    obj_get_info_by_fd,
    obj_pin,
    perf_event_open,
    prog_get_fd_by_id,
    prog_get_next_id,
    prog_load,
    prog_test_run,
    read_perf_sample,
)
from .maps import Map
from .sync import DEFAULT_TIMEOUT, Client, default_client

if TYPE_CHECKING:
    from .aio import AsyncClient
    from .loader.collection import Collection, Program, load_object

__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_NOEXIST",
    "DEFAULT_TIMEOUT",
    "AsyncClient",
    "BatchError",
    "BpfError",
    "BytesCodec",
    "Client",
    "Codec",
    "Collection",
    "CtypesCodec",
    "IntCodec",
    "Map",
    "MapType",
    "ObjFlag",
    "ProgFd",
    "ProgType",
    "Program",
    "RunOutputError",
    "StructCodec",
    "TestRun",
    "VerifierError",
    "close",
    "default_client",
    "load_object",
    "map_create",
    "map_delete_batch",
    "map_delete_elem",
    "map_get_fd_by_id",
    "map_get_next_id",
    "map_get_next_key",
    "map_lookup_and_delete_batch",
    "map_lookup_batch",
    "map_lookup_elem",
    "map_update_batch",
    "map_update_elem",
    "obj_get",
    "obj_get_info_by_fd",
    "obj_pin",
    "perf_event_open",
    "prog_get_fd_by_id",
    "prog_get_next_id",
    "prog_load",
    "prog_test_run",
    "read_perf_sample",
]


def __getattr__(name: str) -> object:
    """AsyncClient and the loader's names on first use: importing trio costs ~0.15 s and
    pyelftools ~20 ms, which every `bpffs` command and synchronous user would otherwise
    pay."""
    if name == "AsyncClient":
        from .aio import AsyncClient

        return AsyncClient
    if name in ("Collection", "Program", "load_object"):
        from .loader import collection

        return getattr(collection, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
