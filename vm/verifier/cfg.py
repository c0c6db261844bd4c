"""Control-flow and instruction-shape checks of the 4.4 verifier (check_cfg and the opcode
checks of do_check), with the kernel's messages."""

from __future__ import annotations

import errno

from ..errors import VerifierError
from ..helpers import HELPERS
from ..insn import (
    Flow,
    call_target,
    is_helper_call,
    is_jump,
    is_local_call,
    is_second_half,
    jump_target,
)
from ..isa import EXIT, ISA_4_4_JMPS, JA, JA32, Class, Insn, Jmp, Mode
from ..uapi import Helper

# The 4.4 jumps and the "less than" ones added later (4.14); no call or exit in JMP32.
KNOWN_JMPS = ISA_4_4_JMPS | {Jmp.JLT, Jmp.JLE, Jmp.JSLT, Jmp.JSLE}


class Rejected(VerifierError):
    """A program the verifier refuses; `.log` holds the verifier log up to the refusal."""

    def __init__(self, err: int, message: str, log: list[str]):
        super().__init__(err, message, "\n".join([*log, message]) + "\n")


def check_cfg(prog_type: int, insns: list[Insn], flow: Flow, gpl: bool, allow_loops: bool,
              log: list[str], privileged: bool) -> None:
    """Functions that end where they should, jumps in range, no jump into LD_IMM64, an exit,
    helpers callable from this type and license, no unreachable instruction, no back-edge
    (loop) unless allowed. bpf-to-bpf calls only for privileged callers."""
    if not privileged and any(is_local_call(i) for i in insns):
        # add_subprog_and_kfunc (5.13+), with its message; from 4.16 check_subprogs refused
        # them the same way, EPERM, as "function calls to other bpf functions are allowed
        # for ..." (root only, then CAP_BPF and CAP_SYS_ADMIN)
        raise Rejected(errno.EPERM, "loading/calling other bpf or kernel functions are allowed"
                       " for CAP_BPF and CAP_SYS_ADMIN", log)
    _check_subprogs(insns, flow, log)
    has_exit = False
    for pc, i in enumerate(insns):
        if is_second_half(insns, pc):
            continue
        if i.cls in (Class.JMP, Class.JMP32):
            _check_jmp(insns, flow, pc, prog_type, gpl, log)
            has_exit |= i.op == Jmp.EXIT
        elif i.cls == Class.LD and i.mode in (Mode.ABS, Mode.IND) and (
                i.dst or i.off or (i.mode == Mode.ABS and i.src) or i.size == 8):
            raise Rejected(errno.EINVAL, "BPF_LD_[ABS|IND] uses reserved fields", log)
    if not has_exit:
        raise Rejected(errno.EINVAL, "no exit instruction", log)
    _check_reachable_and_loops(insns, flow, allow_loops, log)


def _check_jmp(insns: list[Insn], flow: Flow, pc: int, prog_type: int, gpl: bool,
               log: list[str]) -> None:
    """A known jump, a callable helper, and edges that stay in the program and land on no
    LD_IMM64's second half."""
    i = insns[pc]
    if i.op not in KNOWN_JMPS or (i.cls == Class.JMP32 and i.op in (Jmp.CALL, Jmp.EXIT)):
        raise Rejected(errno.EINVAL, f"unknown opcode {i.opcode:02x}", log)
    if i.op == Jmp.CALL and not is_local_call(i):
        _check_helper(i.imm, prog_type, gpl, log)
    for t in _edges(insns, flow, pc):
        if not 0 <= t < len(insns) or (is_second_half(insns, t) and t != pc + 1):
            raise Rejected(errno.EINVAL, f"jump out of range from insn {pc} to {t}", log)


def _check_subprogs(insns: list[Insn], flow: Flow, log: list[str]) -> None:
    """check_subprogs: every call enters the program, no jump leaves its function, and each
    function ends in an exit or a goto, so that none runs on into the next one."""
    n = len(insns)
    for pc, i in enumerate(insns):
        if is_local_call(i) and not 0 <= call_target(i, pc) < n:
            raise Rejected(errno.EINVAL, "call to invalid destination", log)
    for start, end in flow.functions:
        for pc in range(start, end):
            i = insns[pc]
            if is_jump(i) and not start <= jump_target(i, pc) < end:
                raise Rejected(errno.EINVAL,
                               f"jump out of range from insn {pc} to {jump_target(i, pc)}", log)
        if insns[end - 1].opcode not in (EXIT, JA, JA32):
            raise Rejected(errno.EINVAL, "last insn is not an exit or jmp", log)
    # check_abnormal_return: a callee may neither tail-call nor LD_ABS (which may leave the
    # whole program) unless BTF describes it, and programs here carry no BTF
    for start, end in flow.functions[1:]:
        for pc in range(start, end):
            i = insns[pc]
            if i.cls == Class.LD and i.mode in (Mode.ABS, Mode.IND):
                raise Rejected(errno.EINVAL, "LD_ABS is not allowed in subprogs without BTF", log)
            if is_helper_call(i) and i.imm == Helper.tail_call:
                raise Rejected(errno.EINVAL, "tail_call is not allowed in subprogs without BTF",
                               log)


def _check_helper(helper_id: int, prog_type: int, gpl: bool, log: list[str]) -> None:
    spec = HELPERS.get(helper_id)
    if spec is None or prog_type not in spec.prog_types:
        raise Rejected(errno.EINVAL, f"invalid func {helper_id}", log)
    if spec.gpl_only and not gpl:
        raise Rejected(errno.EINVAL, "cannot call GPL only function from proprietary program",
                       log)


def _edges(insns: list[Insn], flow: Flow, pc: int) -> tuple[int, ...]:
    """Where check_cfg's walk goes from pc: the successors, and a callee's entry."""
    i = insns[pc]
    return (*flow.succ[pc], call_target(i, pc)) if is_local_call(i) else flow.succ[pc]


def _check_reachable_and_loops(insns: list[Insn], flow: Flow, allow_loops: bool,
                               log: list[str]) -> None:
    """Depth-first walk as check_cfg: a back-edge is a loop; an insn never reached is dead."""
    n = len(insns)
    state = [0] * n  # 0 unseen, 1 on the walk's stack, 2 done
    stack = [(0, iter(_edges(insns, flow, 0)))]
    state[0] = 1
    while stack:
        pc, succ = stack[-1]
        nxt = next(succ, None)
        if nxt is None:
            state[pc] = 2
            stack.pop()
            continue
        if state[nxt] == 1 and not allow_loops:
            if is_local_call(insns[pc]) and nxt == call_target(insns[pc], pc):
                continue  # recursion: the walk refuses it by its depth, as the kernel (E2BIG)
            raise Rejected(errno.EINVAL, f"back-edge from insn {pc} to {nxt}", log)
        if state[nxt] == 0:
            state[nxt] = 1
            stack.append((nxt, iter(_edges(insns, flow, nxt))))
    for pc in range(n):
        if state[pc] == 0 and not is_second_half(insns, pc):
            raise Rejected(errno.EINVAL, f"unreachable insn {pc}", log)
