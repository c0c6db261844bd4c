"""Map helpers (kernel/bpf/helpers.c) and bpf_tail_call (kernel/bpf/core.c)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from ..errors import BpfError, VmFault
from ..maps import BpfMap, ProgArrayMap
from ..memory import map_index
from ..uapi import MAX_TAIL_CALL_CNT, Helper, MapType
from .spec import DATA_MAPS, ArgType, RetType, helper, neg

if TYPE_CHECKING:
    from ..run import Run

A = ArgType


def map_of(run: Run, handle: int) -> BpfMap:
    index = map_index(handle)
    maps = run.prog.maps
    if index is None or index >= len(maps):
        raise VmFault(f"{handle:#x} is not a map of this program")
    return maps[index]


@helper(Helper.map_lookup_elem, (A.CONST_MAP_PTR, A.PTR_TO_MAP_KEY),
        RetType.PTR_TO_MAP_VALUE_OR_NULL, map_types=DATA_MAPS)
def map_lookup_elem(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    m = map_of(run, r1)
    value = m.lookup(run.mem.read(r2, m.key_size))
    if value is None:
        return 0
    return run.mem.add(value, True, f"value of {m.describe()}")


@helper(Helper.map_update_elem, (A.CONST_MAP_PTR, A.PTR_TO_MAP_KEY, A.PTR_TO_MAP_VALUE,
                                 A.ANYTHING), map_types=DATA_MAPS)
def map_update_elem(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    m = map_of(run, r1)
    try:
        m.update(run.mem.read(r2, m.key_size), run.mem.read(r3, m.value_size), r4)
    except BpfError as e:
        return neg(e.errno)
    return 0


@helper(Helper.map_delete_elem, (A.CONST_MAP_PTR, A.PTR_TO_MAP_KEY), map_types=DATA_MAPS)
def map_delete_elem(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    m = map_of(run, r1)
    try:
        m.delete(run.mem.read(r2, m.key_size))
    except BpfError as e:
        return neg(e.errno)
    return 0


@helper(Helper.tail_call, (A.PTR_TO_CTX, A.CONST_MAP_PTR, A.ANYTHING), RetType.VOID,
        map_types=frozenset({MapType.PROG_ARRAY}))
def tail_call(run: Run, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    """On success the engine continues in the target program (run.tail_target); on failure
    the caller goes on with its next instruction, as the kernel's BPF_TAIL_CALL."""
    array = map_of(run, r2)
    index = r3 & 0xFFFFFFFF
    if not isinstance(array, ProgArrayMap) or index >= array.max_entries:
        return neg(errno.EINVAL)
    if run.tail_calls > MAX_TAIL_CALL_CNT:  # 4.4's check: 33 tail calls (as today's kernel)
        return neg(errno.EINVAL)
    target = array.get(index)
    if target is None:
        return neg(errno.ENOENT)
    run.tail_calls += 1
    run.tail_target = target
    run.prog = target
    return 0
