"""Control-flow and instruction-shape checks of the 4.4 verifier (check_cfg and the opcode
checks of do_check), with the kernel's messages."""

from __future__ import annotations

import errno

from ..errors import BpfError
from ..helpers import HELPERS
from ..isa import (
    ISA_4_4_JMPS,
    JA32,
    LD_IMM64,
    PSEUDO_CALL,
    Class,
    Insn,
    Jmp,
    Mode,
)


class Rejected(BpfError):
    """A program the verifier refuses; `.log` holds the verifier log up to the refusal."""

    def __init__(self, err: int, message: str, log: list[str]):
        super().__init__(err, message)
        self.log = "\n".join([*log, message]) + "\n"


def check_cfg(prog_type: int, insns: list[Insn], gpl: bool, allow_loops: bool,
              log: list[str]) -> None:
    """Jumps in range, no jump into LD_IMM64, an exit, helpers callable from this type and
    license, no unreachable instruction, no back-edge (loop) unless allowed."""
    n = len(insns)
    targets: dict[int, list[int]] = {}
    has_exit = False
    pc = 0
    while pc < n:
        i = insns[pc]
        cls = i.cls
        if i.opcode == LD_IMM64:
            pc += 2
            continue
        if cls in (Class.JMP, Class.JMP32):
            if i.op == Jmp.EXIT and cls == Class.JMP:
                has_exit = True
                succ = []
            elif i.op == Jmp.CALL and cls == Class.JMP:
                if i.src == PSEUDO_CALL:
                    succ = [pc + 1, pc + 1 + i.imm]
                else:
                    _check_helper(i.imm, prog_type, gpl, log)
                    succ = [pc + 1]
            elif i.op == Jmp.JA:
                succ = [pc + 1 + (i.imm if i.opcode == JA32 else i.off)]
            elif i.op in ISA_4_4_JMPS or i.op in (Jmp.JLT, Jmp.JLE, Jmp.JSLT, Jmp.JSLE):
                succ = [pc + 1, pc + 1 + i.off]
            else:
                raise Rejected(errno.EINVAL, f"unknown opcode {i.opcode:02x}", log)
            targets[pc] = []
            for t in succ:
                if not 0 <= t < n:
                    raise Rejected(errno.EINVAL, f"jump out of range from insn {pc} to {t}", log)
                if t > 0 and insns[t - 1].opcode == LD_IMM64 and t != pc + 1:
                    raise Rejected(errno.EINVAL, f"jump out of range from insn {pc} to {t}", log)
                targets.setdefault(pc, []).append(t)
        elif cls == Class.LD and i.mode in (Mode.ABS, Mode.IND) and (
                i.dst or i.off or (i.mode == Mode.ABS and i.src) or i.size == 8):
            raise Rejected(errno.EINVAL, "BPF_LD_[ABS|IND] uses reserved fields", log)
        pc += 1
    if not has_exit:
        raise Rejected(errno.EINVAL, "no exit instruction", log)
    _check_reachable_and_loops(insns, targets, allow_loops, log)


def _check_helper(helper_id: int, prog_type: int, gpl: bool, log: list[str]) -> None:
    spec = HELPERS.get(helper_id)
    if spec is None or prog_type not in spec.prog_types:
        raise Rejected(errno.EINVAL, f"invalid func {helper_id}", log)
    if spec.gpl_only and not gpl:
        raise Rejected(errno.EINVAL, "cannot call GPL only function from proprietary program",
                       log)


def _check_reachable_and_loops(insns: list[Insn], targets: dict[int, list[int]],
                               allow_loops: bool, log: list[str]) -> None:
    """Depth-first walk as check_cfg: a back-edge is a loop; an insn never reached is dead."""
    n = len(insns)
    state = [0] * n  # 0 unseen, 1 on the walk's stack, 2 done
    stack = [(0, iter(_successors(insns, targets, 0)))]
    state[0] = 1
    while stack:
        pc, succ = stack[-1]
        nxt = next(succ, None)
        if nxt is None:
            state[pc] = 2
            stack.pop()
            continue
        if state[nxt] == 1 and not allow_loops:
            raise Rejected(errno.EINVAL, f"back-edge from insn {pc} to {nxt}", log)
        if state[nxt] == 0:
            state[nxt] = 1
            stack.append((nxt, iter(_successors(insns, targets, nxt))))
    for pc in range(n):
        if state[pc] == 0 and not (pc > 0 and insns[pc - 1].opcode == LD_IMM64):
            raise Rejected(errno.EINVAL, f"unreachable insn {pc}", log)


def _successors(insns: list[Insn], targets: dict[int, list[int]], pc: int) -> list[int]:
    if pc in targets:
        return targets[pc]
    step = 2 if insns[pc].opcode == LD_IMM64 else 1
    if pc + step >= len(insns):
        raise Rejected(errno.EINVAL, f"jump out of range from insn {pc} to {pc + step}", [])
    return [pc + step]
