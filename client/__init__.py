"""The bpffsd client library: libbpf's low-level calls on real fds, a dict-like Map, and a
trio AsyncClient. See bpffs.client.libbpf for the call list."""

from bpffs.vm.errors import BpfError
from bpffs.vm.uapi import BPF_ANY, BPF_EXIST, BPF_NOEXIST, MapType, ObjFlag, ProgType

from .calls import ProgFd, TestRun
from .codecs import BytesCodec, CtypesCodec, IntCodec, StructCodec
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
from .sync import Client, default_client

__all__ = [
    "BPF_ANY", "BPF_EXIST", "BPF_NOEXIST", "AsyncClient", "BpfError", "BytesCodec", "Client",
    "CtypesCodec", "IntCodec", "Map", "MapType", "ObjFlag", "ProgFd", "ProgType",
    "StructCodec", "TestRun", "close", "default_client", "map_create", "map_delete_batch",
    "map_delete_elem", "map_get_fd_by_id", "map_get_next_id", "map_get_next_key",
    "map_lookup_and_delete_batch", "map_lookup_batch", "map_lookup_elem", "map_update_batch",
    "map_update_elem", "obj_get", "obj_get_info_by_fd", "obj_pin", "perf_event_open",
    "prog_get_fd_by_id", "prog_get_next_id", "prog_load", "prog_test_run", "read_perf_sample",
]


def __getattr__(name: str) -> object:
    """AsyncClient on first use: importing trio costs ~0.15 s, which every `bpffs` command
    and synchronous user would otherwise pay."""
    if name == "AsyncClient":
        from .aio import AsyncClient

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
