"""Abstract state of a program path: the type of every register and stack byte (4.4's
struct reg_state, struct verifier_state)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum

from ..uapi import MAX_BPF_STACK
from .liveness import PRECISE_SHIFT


class T(Enum):
    """enum bpf_reg_type, with the names the kernel's log prints."""

    NOT_INIT = "?"
    UNKNOWN = "inv"
    CONST = "imm"
    CTX = "ctx"
    MAP_PTR = "map_ptr"
    MAP_VALUE = "map_value"
    MAP_VALUE_OR_NULL = "map_value_or_null"
    STACK = "fp"


POINTERS = frozenset({T.CTX, T.MAP_PTR, T.MAP_VALUE, T.MAP_VALUE_OR_NULL, T.STACK})
SCALARS = frozenset({T.UNKNOWN, T.CONST})


@dataclass(frozen=True)
class Reg:
    type: T = T.NOT_INIT
    value: int = 0  # CONST: the value; STACK/MAP_VALUE: the offset
    map: int = -1  # MAP_PTR/MAP_VALUE*: index into the program's maps
    id: int = 0  # MAP_VALUE_OR_NULL: which lookup (a null check resolves all copies)

    def __str__(self) -> str:
        if self.type == T.CONST:
            return f"imm{self.value}"
        if self.type == T.STACK:
            return f"fp{self.value}"
        if self.type in (T.MAP_PTR, T.MAP_VALUE, T.MAP_VALUE_OR_NULL):
            return f"{self.type.value}(map={self.map},off={self.value})"
        return self.type.value

    def covers(self, other: Reg) -> bool:
        """This (explored) register state is at least as general as `other` (states_equal)."""
        return self == other or (self.type == T.UNKNOWN and other.type in SCALARS) \
            or self.type == T.NOT_INIT


UNKNOWN = Reg(T.UNKNOWN)
NOT_INIT = Reg()

# Stack byte states (enum bpf_stack_slot_type).
INVALID, MISC, SPILL = 0, 1, 2
ALL_BYTES = b"\xff" * MAX_BPF_STACK
_LOW_BITS = int.from_bytes(b"\x01" * MAX_BPF_STACK, "little")  # bit 0 of every byte


@dataclass
class State:
    regs: list[Reg]
    stack: bytearray = field(default_factory=lambda: bytearray(MAX_BPF_STACK))
    spills: dict[int, Reg] = field(default_factory=dict)  # 8-byte slot offset -> saved reg

    def copy(self) -> State:
        return State(list(self.regs), bytearray(self.stack), dict(self.spills))

    def covers(self, other: State, live: int = -1, live_stack: bytes = ALL_BYTES) -> bool:
        """This explored state is at least as general as `other` in everything live (states
        that differ only where nothing is read again lead to the same outcome), scalars
        whose value no check uses being all alike. `live` is a mask of liveness.py;
        `live_stack` is 0xFF over each live stack byte."""
        for n, (a, b) in enumerate(zip(self.regs, other.regs, strict=True)):
            if live >> n & 1 and not a.covers(b) and (
                    live >> (PRECISE_SHIFT + n) & 1 or a.type not in SCALARS
                    or b.type not in SCALARS):
                return False
        # Every stack byte this state initialised must be the same in `other`: with the
        # bytes as one integer, the bytes that differ, among the live ones this state set.
        mine = int.from_bytes(self.stack, "little")
        differ = mine ^ int.from_bytes(other.stack, "little")
        if differ & (((mine | mine >> 1) & _LOW_BITS) * 0xFF) & \
                int.from_bytes(live_stack, "little"):
            return False
        return all(other.spills.get(off) == reg for off, reg in self.spills.items()
                   if live_stack[MAX_BPF_STACK + off])

    def widen(self) -> None:
        """Forget constant values (used at loop heads when loops are allowed)."""
        self.regs = [UNKNOWN if r.type == T.CONST else r for r in self.regs]
        self.spills = {o: (UNKNOWN if r.type == T.CONST else r) for o, r in self.spills.items()}

    def describe(self) -> str:
        regs = " ".join(f"R{n}={r}" for n, r in enumerate(self.regs) if r.type != T.NOT_INIT)
        spills = " ".join(f"fp{off}={reg}" for off, reg in sorted(self.spills.items()))
        return f"{regs} {spills}".strip()

    def resolve_null_check(self, lookup_id: int, is_null: bool) -> None:
        """After `if rX == 0` on a map_value_or_null: in one branch every copy is NULL, in
        the other a valid map value pointer (mark_map_regs)."""
        def resolve(r: Reg) -> Reg:
            if r.type == T.MAP_VALUE_OR_NULL and r.id == lookup_id:
                return Reg(T.CONST, 0) if is_null else replace(r, type=T.MAP_VALUE, id=0)
            return r
        self.regs = [resolve(r) for r in self.regs]
        self.spills = {o: resolve(r) for o, r in self.spills.items()}
