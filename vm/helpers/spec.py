"""Helper prototypes (struct bpf_func_proto) and the table every helper registers into."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto
from typing import TYPE_CHECKING

from ..uapi import Helper, MapType, ProgType

if TYPE_CHECKING:
    from ..run import Run


class ArgType(Enum):
    """enum bpf_arg_type of 4.4."""

    ANYTHING = auto()  # any initialised value
    CONST_MAP_PTR = auto()  # a map loaded with LD_IMM64 (BPF_PSEUDO_MAP_FD)
    PTR_TO_MAP_KEY = auto()  # stack memory of the map's key_size, initialised
    PTR_TO_MAP_VALUE = auto()  # stack memory of the map's value_size, initialised
    PTR_TO_STACK = auto()  # stack memory, size in the next argument
    CONST_STACK_SIZE = auto()  # a constant: the size of the preceding PTR_TO_STACK
    PTR_TO_CTX = auto()  # the program's context (r1 at entry)


class RetType(Enum):
    INTEGER = auto()
    VOID = auto()
    PTR_TO_MAP_VALUE_OR_NULL = auto()


ALL_TYPES = frozenset({ProgType.SOCKET_FILTER, ProgType.KPROBE, ProgType.SCHED_CLS,
                       ProgType.SCHED_ACT})
SOCKET_AND_TC = frozenset({ProgType.SOCKET_FILTER, ProgType.SCHED_CLS, ProgType.SCHED_ACT})
TC = frozenset({ProgType.SCHED_CLS, ProgType.SCHED_ACT})
KPROBE = frozenset({ProgType.KPROBE})

HelperFn = Callable[["Run", int, int, int, int, int], int]


@dataclass(frozen=True)
class HelperSpec:
    id: int
    name: str
    fn: HelperFn
    ret: RetType
    args: tuple[ArgType, ...]
    gpl_only: bool
    prog_types: frozenset[int]
    map_types: frozenset[int] | None = None  # maps its CONST_MAP_PTR may be (None: data maps)


HELPERS: dict[int, HelperSpec] = {}
DATA_MAPS = frozenset({MapType.HASH, MapType.ARRAY})


def helper(helper_id: Helper, args: tuple[ArgType, ...] = (), ret: RetType = RetType.INTEGER,
           gpl_only: bool = False, prog_types: frozenset[int] = ALL_TYPES,
           map_types: frozenset[int] | None = None) -> Callable[[HelperFn], HelperFn]:
    """Register an implementation with its prototype."""
    def register(fn: HelperFn) -> HelperFn:
        HELPERS[helper_id] = HelperSpec(helper_id, f"bpf_{helper_id.name}", fn, ret, args,
                                        gpl_only, prog_types, map_types)
        return fn
    return register


def neg(errno_value: int) -> int:
    """A negative errno as the u64 a helper leaves in r0."""
    return -errno_value & ((1 << 64) - 1)
