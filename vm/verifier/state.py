"""Abstract state of a program path: the type of every register and stack byte (4.4's
struct reg_state, struct verifier_state), one frame per function on the call stack (the
kernel's struct bpf_func_state in struct bpf_verifier_state, since 4.16)."""

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
    frame: int = 0  # STACK: whose stack (frameno: 0 the main program, 1 its callee, ...)

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
class Frame:
    """One function's registers and stack (struct bpf_func_state)."""

    regs: list[Reg]
    stack: bytearray = field(default_factory=lambda: bytearray(MAX_BPF_STACK))
    spills: dict[int, Reg] = field(default_factory=dict)  # 8-byte slot offset -> saved reg
    callsite: int = -1  # the call insn that made this frame (-1: the main program's)
    function: int = 0  # entry insn of the function running in it

    def copy(self) -> Frame:
        return Frame(list(self.regs), bytearray(self.stack), dict(self.spills), self.callsite,
                     self.function)

    def covers(self, other: Frame, live: int = -1, live_stack: bytes = ALL_BYTES) -> bool:
        """This (explored) frame is at least as general as `other` in everything live (states
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


class State:
    """A path's frames, the current function's last; `regs`, `stack` and `spills` are the
    current frame's."""

    __slots__ = ("frames",)

    def __init__(self, regs: list[Reg] | None = None, *, frames: list[Frame] | None = None):
        self.frames = frames if frames is not None else [Frame(regs or [NOT_INIT] * 11)]

    @property
    def regs(self) -> list[Reg]:
        return self.frames[-1].regs

    @regs.setter
    def regs(self, value: list[Reg]) -> None:
        self.frames[-1].regs = value

    @property
    def stack(self) -> bytearray:
        return self.frames[-1].stack

    @property
    def spills(self) -> dict[int, Reg]:
        return self.frames[-1].spills

    @property
    def depth(self) -> int:
        """The current frame's number (curframe): 0 in the main program."""
        return len(self.frames) - 1

    def copy(self) -> State:
        return State(frames=[f.copy() for f in self.frames])

    def covers(self, other: State, live: int = -1, live_stack: bytes = ALL_BYTES,
               caller_live: tuple[int, ...] = ()) -> bool:
        """As Frame.covers for the current frame; states in different call chains never
        cover each other (states_equal compares every frame and its callsite). A caller's
        frame is compared in the registers live where it resumes (`caller_live`, one mask
        a caller) and in all of its stack, which a callee may read through a pointer."""
        mine, theirs = self.frames, other.frames
        if len(mine) == 1:  # the main program: the common case, kept fast
            return len(theirs) == 1 and mine[0].covers(theirs[0], live, live_stack)
        if len(mine) != len(theirs) or any(
                a.callsite != b.callsite for a, b in zip(mine, theirs, strict=True)):
            return False
        if not mine[-1].covers(theirs[-1], live, live_stack):
            return False
        return all(self.frames[k].covers(other.frames[k],
                                         caller_live[k] if k < len(caller_live) else -1)
                   for k in range(len(self.frames) - 1))

    def widen(self) -> None:
        """Forget constant values (used at loop heads when loops are allowed)."""
        for f in self.frames:
            f.regs = [UNKNOWN if r.type == T.CONST else r for r in f.regs]
            f.spills = {o: (UNKNOWN if r.type == T.CONST else r) for o, r in f.spills.items()}

    def describe(self) -> str:
        """The current frame, as the log prints it; a pointer to another frame's stack is
        fp[frameno]off, and a callee's frame is prefixed with its number."""
        def show(r: Reg) -> str:
            return f"fp[{r.frame}]{r.value}" if r.type == T.STACK and r.frame != self.depth \
                else str(r)
        regs = " ".join(f"R{n}={show(r)}" for n, r in enumerate(self.regs)
                        if r.type != T.NOT_INIT)
        spills = " ".join(f"fp{off}={show(reg)}" for off, reg in sorted(self.spills.items()))
        text = f"{regs} {spills}".strip()
        return f"frame{self.depth}: {text}" if self.depth else text

    def resolve_null_check(self, lookup_id: int, is_null: bool) -> None:
        """After `if rX == 0` on a map_value_or_null: in one branch every copy is NULL, in
        the other a valid map value pointer (mark_map_regs)."""
        def resolve(r: Reg) -> Reg:
            if r.type == T.MAP_VALUE_OR_NULL and r.id == lookup_id:
                return Reg(T.CONST, 0) if is_null else replace(r, type=T.MAP_VALUE, id=0)
            return r
        for f in self.frames:  # copies passed to or from callees too
            f.regs = [resolve(r) for r in f.regs]
            f.spills = {o: resolve(r) for o, r in f.spills.items()}
