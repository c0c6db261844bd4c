"""do_check: walk every path of the program with an abstract state and refuse anything that
could read uninitialised registers or stack, touch memory out of bounds, dereference a possibly
NULL map value, access a context field the program type may not, call a helper with wrong
arguments, or (unprivileged) leak a pointer. Messages are the 4.4 kernel's.

A bpf-to-bpf call is walked as the kernel walks it (check_func_call, prepare_func_exit,
check_max_stack_depth): the call pushes a frame, whose r1-r5 are the caller's, r6-r9 not
initialised, r10 its own fresh 512-byte stack; the callee's code is walked once per call chain
(pruning compares states of the same chain only); its exit pops the frame, gives the caller its
r0 and leaves the caller's r1-r5 unreadable, r6-r9 and stack as they were. A pointer to a
caller's stack may be passed down, and used, as in the kernel; it may not come back up (r0, or
a spill into a caller's stack). At most MAX_CALL_FRAMES frames; all frames of a call chain
share MAX_BPF_STACK bytes, each function counting the deepest byte it touches."""

from __future__ import annotations

import errno
import time
from dataclasses import replace

from ..context import ctx_access_ok, is_skb_program
from ..disasm import format_insn
from ..helpers import HELPERS, ArgType, HelperSpec, RetType
from ..insn import Flow, call_target, is_local_call, width
from ..isa import (
    LD_IMM64,
    R0,
    R1,
    R6,
    R10,
    U32,
    Alu,
    Atomic,
    Class,
    Insn,
    Jmp,
    Mode,
    Source,
)
from ..maps import BpfMap
from ..runtime import MAX_CALL_FRAMES
from ..uapi import BPF_COMPLEXITY_LIMIT_INSNS, BPF_PSEUDO_MAP_FD, MAX_BPF_STACK, Helper
from .cfg import Rejected
from .liveness import CALL_CLOBBERED, stack_mask
from .state import INVALID, MISC, NOT_INIT, POINTERS, SPILL, UNKNOWN, Frame, Reg, State, T

# The bounds of one verification. The kernel stops after a number of processed instructions:
# 32768 in 4.4 (BPF_COMPLEXITY_LIMIT_INSNS from 4.7: 65536, 131072 from 4.14, 1M from 5.2).
# Unprivileged programs keep 4.4's bound, as they keep its size limit (BPF_MAXINSNS): this is
# the 4.4 object model, and this verifier processes ~80k instructions a second where the
# kernel's does millions. Root may load programs of up to 1M instructions (5.2+, see
# load_program), so it gets the kernel's 1M: a bound below the size limit would refuse every
# large program by construction. For both, CPU_LIMIT_S is the bound that matters in time.
COMPLEXITY_LIMIT_INSNS_UNPRIV = 32_768
# Explored states kept per instruction for unprivileged programs (BPF_COMPLEXITY_LIMIT_STATES,
# 5.x): bounds the comparisons each prune point costs.
COMPLEXITY_LIMIT_STATES = 64
# CPU seconds of the verifying thread, checked every CPU_CHECK_EVERY instructions: what is
# left of a verification's cost once instructions and states are bounded (a Python verifier's
# cost per instruction varies), so that no load holds a core for long. Thread CPU rather than
# wall time: a busy machine must not turn a valid program away.
CPU_LIMIT_S = 1.5
CPU_CHECK_EVERY = 256
ALU_OPS = frozenset(Alu)
JMP_OPS = frozenset(Jmp)
WIDEN_AFTER = 8  # visits of one instruction before constants are forgotten (loops allowed)
# Helpers whose buffer argument they fill (modern ARG_PTR_TO_UNINIT_MEM): the buffer may be
# uninitialised and is initialised after the call.
FILLS = {Helper.probe_read: 0, Helper.get_current_comm: 0, Helper.skb_get_tunnel_key: 1}
# check_max_stack_depth: each function's stack counts rounded up to this (round_up_stack_depth
# of a JITed program, as the running kernel's: 16 bytes, and 0 for a function that touches
# none; a kernel interpreting the program rounds up to 32, at least 32).
STACK_ALIGN = 16


class Checker:
    def __init__(self, prog_type: int, insns: list[Insn], flow: Flow, live: list[int],
                 maps: list[BpfMap], privileged: bool, allow_loops: bool, log: list[str],
                 verbose: bool):
        self.prog_type = prog_type
        self.insns = insns
        self.flow = flow
        self.live = live
        self.live_stack: dict[int, bytes] = {}
        self.maps = maps
        self.privileged = privileged
        self.allow_loops = allow_loops
        self.log = log
        self.verbose = verbose
        self.explored: dict[int, list[Frame]] = {}  # pc -> main program frames seen there
        # (pc, call chain) -> states seen there in a callee
        self.explored_in_calls: dict[tuple[int, tuple[int, ...]], list[State]] = {}
        self.visits: dict[int, int] = {}
        self.next_id = 1
        self.processed = 0
        self.stack_depth: dict[int, int] = {}  # function entry -> deepest stack byte touched
        self.max_processed = BPF_COMPLEXITY_LIMIT_INSNS if privileged else \
            COMPLEXITY_LIMIT_INSNS_UNPRIV
        self.cpu_deadline = time.thread_time() + CPU_LIMIT_S

    def fail(self, message: str, err: int = errno.EACCES) -> None:
        raise Rejected(err, message, self.log)

    # -- the walk -------------------------------------------------------------------------------
    def run(self) -> None:
        start = State([NOT_INIT] * 11)
        start.regs[R1] = Reg(T.CTX)
        start.regs[R10] = Reg(T.STACK, 0, frame=0)
        pending: list[tuple[int, int, State]] = [(-1, 0, start)]
        while pending:
            origin, pc, state = pending.pop()
            if origin >= 0 and self.verbose:
                self.log.append(f"from {origin} to {pc}: {state.describe()}")
            while True:
                if pc in self.flow.jump_targets and self._seen(pc, state):
                    break
                self.processed += 1
                if self.processed > self.max_processed:
                    self.too_large()
                if not self.processed % CPU_CHECK_EVERY and time.thread_time() > \
                        self.cpu_deadline:
                    self.log.append(f"verification stopped after {CPU_LIMIT_S} s of CPU")
                    self.too_large()
                insn = self.insns[pc]
                if self.verbose:
                    self.log.append(f"{pc}: {format_insn(insn, pc)}")
                outcome = self.step(pc, insn, state)
                if outcome is None:  # exit
                    break
                nxt, branch = outcome
                if branch is not None:
                    pending.append((pc, branch[0], branch[1]))
                pc = nxt
        self.check_max_stack_depth()
        self.log.append(f"processed {self.processed} insns")

    def too_large(self) -> None:
        """The kernel's refusal of a program whose verification went past its bounds."""
        self.fail(f"BPF program is too large. Processed {self.processed} insn", errno.E2BIG)

    def _seen(self, pc: int, state: State) -> bool:
        """Prune: an explored state at this point covers this one in everything still live
        here (is_state_visited)."""
        visits = self.visits.get(pc, 0) + 1
        self.visits[pc] = visits
        if self.allow_loops and visits > WIDEN_AFTER:
            state.widen()
        live = self.live[pc]
        live_stack = self.live_stack.get(pc)
        if live_stack is None:
            live_stack = self.live_stack[pc] = stack_mask(live)
        if state.depth == 0:  # the main program: frames compared directly, kept fast
            top = state.frames[0]
            frames = self.explored.setdefault(pc, [])
            if any(old.covers(top, live, live_stack) for old in frames):
                return True
            if self.privileged or len(frames) <= COMPLEXITY_LIMIT_STATES:
                frames.append(top.copy())
            return False
        # In a callee: states of the same call chain only. A caller resumes after its call:
        # compared in what is live there, but r0-r5 (r0 is the callee's, r1-r5 unreadable).
        caller_live = tuple(self.live[f.callsite + 1] & ~CALL_CLOBBERED
                            for f in state.frames[1:])
        states = self.explored_in_calls.setdefault(
            (pc, tuple(f.callsite for f in state.frames)), [])
        if any(old.covers(state, live, live_stack, caller_live) for old in states):
            return True
        if self.privileged or len(states) <= COMPLEXITY_LIMIT_STATES:
            states.append(state.copy())
        return False

    # -- one instruction ------------------------------------------------------------------------
    def step(self, pc: int, i: Insn, s: State) -> tuple[int, tuple[int, State] | None] | None:
        cls = i.cls
        if cls in (Class.ALU, Class.ALU64):
            self.alu(i, s)
        elif cls == Class.LDX:
            if i.mode not in (Mode.MEM, Mode.MEMSX) or i.imm:
                self.fail("BPF_LDX uses reserved fields", errno.EINVAL)
            self.read_reg(s, i.src)
            self.access(s, i.src, i.off, i.size, write=False, dst=i.dst)
        elif cls == Class.STX and i.mode == Mode.ATOMIC:
            self.read_reg(s, i.src)
            self.read_reg(s, i.dst)
            if s.regs[i.dst].type == T.CTX:
                self.fail(f"BPF_XADD stores into R{i.dst} context is not allowed")
            self.access(s, i.dst, i.off, i.size, write=False, dst=None)
            self.access(s, i.dst, i.off, i.size, write=True, value=UNKNOWN)
            if i.imm & Atomic.FETCH:  # FETCH, XCHG, CMPXCHG write a register
                self.write_reg(s, R0 if i.imm == Atomic.CMPXCHG else i.src, UNKNOWN)
        elif cls == Class.STX:
            if i.mode != Mode.MEM or i.imm:
                self.fail("BPF_STX uses reserved fields", errno.EINVAL)
            value = self.read_reg(s, i.src)
            self.read_reg(s, i.dst)
            self.access(s, i.dst, i.off, i.size, write=True, value=value)
        elif cls == Class.ST:
            if i.mode != Mode.MEM or i.src:
                self.fail("BPF_ST uses reserved fields", errno.EINVAL)
            self.read_reg(s, i.dst)
            self.access(s, i.dst, i.off, i.size, write=True, value=Reg(T.CONST, i.imm))
        elif i.opcode == LD_IMM64:
            if i.src == BPF_PSEUDO_MAP_FD:
                self.write_reg(s, i.dst, Reg(T.MAP_PTR, map=i.imm))
            else:
                self.write_reg(s, i.dst, Reg(T.CONST, i.imm64))
            return pc + width(i), None
        elif cls == Class.LD:
            self.ld_abs(i, s)
        elif i.op == Jmp.EXIT:
            if s.depth:
                return self.exit_callee(s), None
            r0 = self.read_reg(s, R0)
            if r0.type in POINTERS and not self.privileged:
                self.fail("R0 leaks addr as return value")
            return None
        elif i.op == Jmp.CALL:
            if is_local_call(i):
                return self.local_call(pc, i, s), None
            self.call(i.imm, s)
        elif i.op == Jmp.JA:
            return self.flow.succ[pc][0], None
        else:
            return self.branch(pc, i, s)
        return pc + 1, None

    # -- registers ------------------------------------------------------------------------------
    def read_reg(self, s: State, n: int) -> Reg:
        if n > R10:
            self.fail(f"R{n} is invalid", errno.EINVAL)
        r = s.regs[n]
        if r.type == T.NOT_INIT:
            self.fail(f"R{n} !read_ok")
        return r

    def write_reg(self, s: State, n: int, value: Reg) -> None:
        if n == R10:
            self.fail("frame pointer is read only")
        if n > R10:
            self.fail(f"R{n} is invalid", errno.EINVAL)
        s.regs[n] = value

    def alu(self, i: Insn, s: State) -> None:
        op = i.op
        wide = i.cls == Class.ALU64
        if op in (Alu.NEG, Alu.END):
            if i.src or (op == Alu.NEG and (i.imm or i.source)) or \
                    (op == Alu.END and i.imm not in (16, 32, 64)):
                self.fail(f"BPF_{'NEG' if op == Alu.NEG else 'END'} uses reserved fields",
                          errno.EINVAL)
            self.read_reg(s, i.dst)
            self.write_reg(s, i.dst, UNKNOWN)
            return
        if op not in ALU_OPS:
            self.fail(f"invalid BPF_ALU opcode {op:#x}", errno.EINVAL)
        if i.source == Source.X:
            if i.imm:
                self.fail("BPF_ALU uses reserved fields", errno.EINVAL)
            src = self.read_reg(s, i.src)
        else:
            if i.src:
                self.fail("BPF_ALU uses reserved fields", errno.EINVAL)
            src = Reg(T.CONST, i.imm)
        if op == Alu.MOV:
            if i.source == Source.X and src.type in POINTERS and (not wide or i.off):
                if not self.privileged:
                    self.fail(f"R{i.src} partial copy of pointer")
                src = UNKNOWN
            elif not wide or i.off:
                src = UNKNOWN if src.type != T.CONST else Reg(T.CONST, src.value & U32)
            self.write_reg(s, i.dst, src)
            return
        dst = self.read_reg(s, i.dst)
        if op in (Alu.DIV, Alu.MOD) and i.source == Source.K and i.imm == 0:
            self.fail("div by zero", errno.EINVAL)
        if op in (Alu.LSH, Alu.RSH, Alu.ARSH) and i.source == Source.K and \
                not 0 <= i.imm < (64 if wide else 32):
            self.fail(f"invalid shift {i.imm}", errno.EINVAL)
        if dst.type in POINTERS or src.type in POINTERS:
            self.write_reg(s, i.dst, self.pointer_arith(i, dst, src, wide))
            return
        self.write_reg(s, i.dst, UNKNOWN)

    def pointer_arith(self, i: Insn, dst: Reg, src: Reg, wide: bool) -> Reg:
        """Pointer plus or minus a constant keeps the pointer (stack, map value); anything
        else: unprivileged programs are refused, privileged ones get an unknown scalar."""
        if wide and i.op in (Alu.ADD, Alu.SUB) and dst.type in (T.STACK, T.MAP_VALUE) and \
                src.type == T.CONST:
            delta = src.value if i.op == Alu.ADD else -src.value
            return replace(dst, value=dst.value + delta)
        if not self.privileged:
            self.fail(f"R{i.dst} pointer arithmetic prohibited")
        return UNKNOWN

    # -- memory ---------------------------------------------------------------------------------
    def access(self, s: State, regno: int, off: int, size: int, write: bool,
               value: Reg | None = None, dst: int | None = None) -> None:
        ptr = s.regs[regno]
        if ptr.type == T.STACK:
            self.stack_access(s, ptr.frame, ptr.value + off, size, write, value, dst)
            return
        if ptr.type == T.MAP_VALUE:
            m = self.maps[ptr.map]
            start = ptr.value + off
            if start < 0 or start + size > m.value_size:
                self.fail(f"invalid access to map value, value_size={m.value_size}"
                          f" off={start} size={size}")
            if write and value is not None and value.type in POINTERS and not self.privileged:
                self.fail(f"R{regno} leaks addr into map")
        elif ptr.type == T.CTX:
            if write and value is not None and value.type in POINTERS and not self.privileged:
                self.fail(f"R{regno} leaks addr into ctx")
            if ptr.value or not ctx_access_ok(self.prog_type, off, size, write):
                self.fail(f"invalid bpf_context access off={off} size={size}")
        else:
            self.fail(f"R{regno} invalid mem access '{ptr.type.value}'")
        if dst is not None:
            self.write_reg(s, dst, UNKNOWN)

    def stack_access(self, s: State, frameno: int, off: int, size: int, write: bool,
                     value: Reg | None, dst: int | None) -> None:
        """An access to the stack of frame `frameno` (the current one, or a caller's through
        a pointer it passed down)."""
        if off >= 0 or off < -MAX_BPF_STACK or off % size:
            self.fail(f"invalid stack off={off} size={size}")
        frame = s.frames[frameno]
        self.touch_stack(frame, off)
        base = MAX_BPF_STACK + off
        slot = off & ~7
        if write:
            spill = size == 8 and value is not None and value.type in POINTERS
            if spill and value.type == T.STACK and frameno != s.depth:
                # it would outlive the frame it points into
                self.fail("cannot spill pointers to stack into stack frame of the caller",
                          errno.EINVAL)
            for b in range(base, base + size):
                frame.stack[b] = SPILL if spill else MISC
            frame.spills.pop(slot, None)
            if spill:
                frame.spills[off] = value
            return
        kinds = set(frame.stack[base:base + size])
        if INVALID in kinds:
            self.fail(f"invalid read from stack off {off}+0 size {size}")
        if SPILL in kinds:
            if size != 8 or off not in frame.spills:
                self.fail("corrupted spill memory")
            if dst is not None:
                self.write_reg(s, dst, frame.spills[off])
            return
        if dst is not None:
            self.write_reg(s, dst, UNKNOWN)

    def ld_abs(self, i: Insn, s: State) -> None:
        if i.mode not in (Mode.ABS, Mode.IND):
            self.fail(f"unknown opcode {i.opcode:02x}", errno.EINVAL)
        if not is_skb_program(self.prog_type):
            self.fail("BPF_LD_[ABS|IND] instructions not allowed for this program type",
                      errno.EINVAL)
        if s.regs[R6].type != T.CTX:
            self.fail("at the time of BPF_LD_ABS|IND R6 != pointer to skb", errno.EINVAL)
        if i.mode == Mode.IND:
            self.read_reg(s, i.src)
        for n in range(1, 6):
            s.regs[n] = NOT_INIT
        s.regs[R0] = UNKNOWN

    # -- calls ----------------------------------------------------------------------------------
    def call(self, helper_id: int, s: State) -> None:
        spec = HELPERS[helper_id]
        map_index: int | None = None
        for n, arg in enumerate(spec.args):
            regno = R1 + n
            reg = self.read_reg(s, regno)
            map_index = self.check_arg(spec, n, arg, reg, s, map_index)
        if helper_id in FILLS:  # the helper initialised its buffer
            buf = s.regs[R1 + FILLS[helper_id]]
            size = s.regs[R1 + FILLS[helper_id] + 1].value
            base = MAX_BPF_STACK + buf.value
            s.frames[buf.frame].stack[base:base + size] = bytes([MISC]) * size
        for n in range(1, 6):
            s.regs[n] = NOT_INIT
        if spec.ret == RetType.PTR_TO_MAP_VALUE_OR_NULL:
            s.regs[R0] = Reg(T.MAP_VALUE_OR_NULL, 0, map_index, self.next_id)
            self.next_id += 1
        else:
            s.regs[R0] = UNKNOWN if spec.ret == RetType.INTEGER else NOT_INIT

    def check_arg(self, spec: HelperSpec, n: int, arg: ArgType, reg: Reg, s: State,
                  map_index: int | None) -> int | None:
        regno = R1 + n
        if arg == ArgType.ANYTHING:
            if reg.type in POINTERS and not self.privileged:
                self.fail(f"R{regno} leaks addr into helper function")
        elif arg == ArgType.PTR_TO_CTX:
            self.expect(regno, reg, T.CTX)
        elif arg == ArgType.CONST_MAP_PTR:
            self.expect(regno, reg, T.MAP_PTR)
            m = self.maps[reg.map]
            if spec.map_types is not None and m.map_type not in spec.map_types:
                self.fail(f"cannot pass map_type {m.map_type} into func {spec.id}")
            return reg.map
        elif arg in (ArgType.PTR_TO_MAP_KEY, ArgType.PTR_TO_MAP_VALUE):
            if map_index is None:
                self.fail("invalid map_ptr to access map->key", errno.EINVAL)
            m = self.maps[map_index]
            size = m.key_size if arg == ArgType.PTR_TO_MAP_KEY else m.value_size
            self.stack_range(regno, reg, size, s, fill=False)
        elif arg == ArgType.PTR_TO_STACK:
            size_reg = s.regs[regno + 1]
            if size_reg.type != T.CONST:
                self.fail(f"R{regno + 1} type={size_reg.type.value} expected=imm")
            if size_reg.value <= 0:
                self.fail(f"invalid stack type R{regno} off={reg.value}"
                          f" access_size={size_reg.value}")
            fills = FILLS.get(spec.id) == n
            self.stack_range(regno, reg, size_reg.value, s, fill=fills)
        return map_index

    def expect(self, regno: int, reg: Reg, wanted: T) -> None:
        if reg.type != wanted:
            self.fail(f"R{regno} type={reg.type.value} expected={wanted.value}")

    def stack_range(self, regno: int, reg: Reg, size: int, s: State, fill: bool) -> None:
        """check_stack_boundary: size bytes of stack at reg, initialised unless the helper
        fills them."""
        if reg.type != T.STACK:
            self.fail(f"R{regno} type={reg.type.value} expected=fp")
        off = reg.value
        if off >= 0 or off < -MAX_BPF_STACK or off + size > 0:
            self.fail(f"invalid stack type R{regno} off={off} access_size={size}")
        frame = s.frames[reg.frame]
        self.touch_stack(frame, off)
        if not fill:
            base = MAX_BPF_STACK + off
            for k in range(size):
                if frame.stack[base + k] == INVALID:
                    self.fail(f"invalid indirect read from stack off {off}+{k} size {size}")

    def touch_stack(self, frame: Frame, off: int) -> None:
        """update_stack_depth: the deepest byte each function's stack is used to."""
        if -off > self.stack_depth.get(frame.function, 0):
            self.stack_depth[frame.function] = -off

    def local_call(self, pc: int, i: Insn, s: State) -> int:
        """check_func_call: enter the callee in a new frame; returns its first insn."""
        if len(s.frames) >= MAX_CALL_FRAMES:
            self.fail(f"the call stack of {len(s.frames) + 1} frames is too deep", errno.E2BIG)
        caller = s.regs
        regs = [NOT_INIT] * 11
        regs[1:6] = caller[1:6]  # the arguments, pointers to the caller's stack included
        regs[R10] = Reg(T.STACK, 0, frame=len(s.frames))
        for n in range(0, 6):  # clear_caller_saved_regs
            caller[n] = NOT_INIT
        target = call_target(i, pc)
        s.frames.append(Frame(regs, callsite=pc, function=target))
        if self.verbose:
            self.log.append(f"caller at {pc}, callee at {target}: {s.describe()}")
        return target

    def exit_callee(self, s: State) -> int:
        """prepare_func_exit: back to the caller with the callee's r0 (unread here: the
        caller's first read of it checks it, as in the kernel); returns where it resumes."""
        r0 = s.regs[R0]
        if r0.type == T.STACK:
            # the kernel's rule: a pointer to the callee's own stack would dangle, one to a
            # caller's would not, but neither may come back
            self.fail("cannot return stack pointer to the caller", errno.EINVAL)
        callee = s.frames.pop()
        s.regs[R0] = r0
        if self.verbose:
            self.log.append(f"returning from callee to caller at {callee.callsite + 1}:"
                            f" {s.describe()}")
        return callee.callsite + 1

    def check_max_stack_depth(self) -> None:
        """check_max_stack_depth: along every chain of calls in the code (walked or not),
        the functions' stacks, each rounded up to STACK_ALIGN, fit in MAX_BPF_STACK, and
        no chain is deeper than MAX_CALL_FRAMES frames."""
        if len(self.flow.functions) == 1:
            return  # one frame, bounded by each access
        calls = {start: [call_target(i, pc) for pc in range(start, end)
                         if is_local_call(i := self.insns[pc])]
                 for start, end in self.flow.functions}
        done: set[tuple[int, int, int]] = set()  # (function, depth, frame) found fine

        def visit(function: int, depth: int, frame: int) -> None:
            key = (function, depth, frame)
            if key in done:
                return
            depth += -(-self.stack_depth.get(function, 0) // STACK_ALIGN) * STACK_ALIGN
            if depth > MAX_BPF_STACK:
                self.fail(f"combined stack size of {frame + 1} calls is {depth}. Too large")
            for callee in calls.get(function, ()):
                if frame + 1 >= MAX_CALL_FRAMES:
                    self.fail(f"the call stack of {frame + 1} frames is too deep !",
                              errno.E2BIG)
                visit(callee, depth, frame + 1)
            done.add(key)

        visit(0, 0, 0)

    # -- branches -------------------------------------------------------------------------------
    def branch(self, pc: int, i: Insn, s: State) -> tuple[int, tuple[int, State] | None]:
        if i.op not in JMP_OPS:
            self.fail(f"invalid BPF_JMP opcode {i.opcode:#x}", errno.EINVAL)
        dst = self.read_reg(s, i.dst)
        if i.source == Source.X:
            src = self.read_reg(s, i.src)
            if (dst.type in POINTERS or src.type in POINTERS) and not self.privileged:
                self.fail(f"R{i.dst} pointer comparison prohibited")
        target = self.flow.succ[pc][1]
        other = s.copy()
        if dst.type == T.MAP_VALUE_OR_NULL and i.source == Source.K and i.imm == 0 and \
                i.op in (Jmp.JEQ, Jmp.JNE) and i.cls == Class.JMP:
            # the taken branch of JEQ (fallthrough of JNE) sees NULL
            other.resolve_null_check(dst.id, is_null=i.op == Jmp.JEQ)
            s.resolve_null_check(dst.id, is_null=i.op == Jmp.JNE)
        elif dst.type in POINTERS and i.source == Source.K and not self.privileged:
            self.fail(f"R{i.dst} pointer comparison prohibited")
        return pc + 1, (target, other)


def do_check(prog_type: int, insns: list[Insn], flow: Flow, live: list[int],
             maps: list[BpfMap], privileged: bool, allow_loops: bool, log: list[str],
             verbose: bool) -> None:
    Checker(prog_type, insns, flow, live, maps, privileged, allow_loops, log, verbose).run()
