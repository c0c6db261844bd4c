"""libbpf's low-level API (bpf/bpf.h), by name, on fds: each call uses this thread's default
connection to bpffsd. Failures raise BpfError, an OSError carrying the kernel's errno.

    fd = map_create(MapType.HASH, 4, 8, 1024, name="flows")
    map_update_elem(fd, key, value, BPF_NOEXIST)
    obj_pin(fd, "/sys/fs/bpf/flows")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from bpffs import protocol
from bpffs.vm.uapi import BPF_ANY

from .calls import ProgFd, TestRun
from .sync import default_client


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               map_flags: int = 0, name: str = "") -> int:
    """BPF_MAP_CREATE: the new map's fd."""
    return default_client().map_create(map_type, key_size, value_size, max_entries, map_flags,
                                       name)


def map_lookup_elem(fd: int, key: bytes) -> bytes:
    """The value stored at key (BpfError ENOENT when absent)."""
    return default_client().map_lookup_elem(fd, key)


def map_update_elem(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    """Store value at key; flags BPF_ANY, BPF_NOEXIST (EEXIST if present) or BPF_EXIST
    (ENOENT if absent)."""
    default_client().map_update_elem(fd, key, value, flags)


def map_delete_elem(fd: int, key: bytes) -> None:
    """Delete key (ENOENT when absent; EINVAL on arrays, as the kernel)."""
    default_client().map_delete_elem(fd, key)


def map_get_next_key(fd: int, key: bytes | None = None) -> bytes:
    """The key after key (None: the first key); ENOENT after the last."""
    return default_client().map_get_next_key(fd, key)


def map_lookup_batch(fd: int, count: int, cursor: bytes | None = None
                     ) -> tuple[list[bytes], list[bytes], bytes | None]:
    """Up to count (keys, values) after cursor, and the next cursor (None at the end)."""
    return default_client().map_lookup_batch(fd, count, cursor)


def map_lookup_and_delete_batch(fd: int, count: int, cursor: bytes | None = None
                                ) -> tuple[list[bytes], list[bytes], bytes | None]:
    """map_lookup_batch, deleting what it returns."""
    return default_client().map_lookup_batch(fd, count, cursor, delete=True)


def map_update_batch(fd: int, keys: Sequence[bytes], values: Sequence[bytes],
                     flags: int = BPF_ANY) -> int:
    """Store values at keys; returns the count (on failure a BatchError, whose `count` says
    how many were stored)."""
    return default_client().map_update_batch(fd, keys, values, flags)


def map_delete_batch(fd: int, keys: Sequence[bytes]) -> int:
    """Delete keys; returns the count (on failure a BatchError, with the `count` deleted)."""
    return default_client().map_delete_batch(fd, keys)


def prog_load(prog_type: int, insns: bytes, license: str = "GPL", kern_version: int = 0,
              name: str = "", log_level: int = 0, log_size: int = 1 << 20) -> ProgFd:
    """Returns the program fd; with log_level > 0 its `.log` holds the verifier log (on
    rejection, the VerifierError's `.log` does)."""
    return default_client().prog_load(prog_type, insns, license, kern_version, name, log_level,
                                      log_size)


def prog_test_run(fd: int, data_in: bytes = b"", repeat: int = 1, ctx_in: bytes | None = None,
                  data_size_out: int = 0, **options: Any) -> TestRun:
    """BPF_PROG_TEST_RUN: retval, data_out, duration (average ns per run) and the side
    effects the VM recorded; options set the emulated kernel state (see bpffs.vm.RunEnv)."""
    return default_client().prog_test_run(fd, data_in, repeat, ctx_in, data_size_out,
                                          **options)


def obj_pin(fd: int, path: str | bytes) -> None:
    """BPF_OBJ_PIN: pin the object at path on a bpffsd mount (EPERM elsewhere)."""
    default_client().obj_pin(fd, path)


def obj_get(path: str | bytes, file_flags: int = 0) -> int:
    """BPF_OBJ_GET: a new fd on the object pinned at path (BPF_F_RDONLY/WRONLY in
    file_flags)."""
    return default_client().obj_get(path, file_flags)


def obj_get_info_by_fd(fd: int) -> dict:
    """BPF_OBJ_GET_INFO_BY_FD: the object's description (bpftool's field names)."""
    return default_client().obj_get_info_by_fd(fd)


def map_get_next_id(start_id: int = 0) -> int:
    """The next map id after start_id (ENOENT after the last)."""
    return default_client().get_next_id("map", start_id)


def prog_get_next_id(start_id: int = 0) -> int:
    """The next program id after start_id (ENOENT after the last)."""
    return default_client().get_next_id("prog", start_id)


def map_get_fd_by_id(map_id: int) -> int:
    """A new fd on the map with that id."""
    return default_client().get_fd_by_id("map", map_id)


def prog_get_fd_by_id(prog_id: int) -> int:
    """A new fd on the program with that id."""
    return default_client().get_fd_by_id("prog", prog_id)


def perf_event_open(cpu: int = 0) -> int:
    """A perf event fd for cpu: store it in a PERF_EVENT_ARRAY, then read_perf_sample."""
    return default_client().perf_event_open(cpu)


def read_perf_sample(event_fd: int) -> tuple[int, int, bytes] | None:
    """The next sample a program sent to this perf event: (cpu, time in ns, data); blocks
    until one arrives, None when the event is gone."""
    record = os.read(event_fd, protocol.INLINE_MAX)
    if not record:
        return None
    cpu, timestamp, data = protocol.unpack(record)
    return cpu, timestamp, data


def close(fd: int) -> None:
    """Drop this fd's reference (the object goes when no fd, pin or program holds it)."""
    os.close(fd)
