"""bpf-to-bpf calls in the verifier, as the kernel checks them (check_func_call,
prepare_func_exit, check_max_stack_depth): the callee's code is walked in a frame of its own,
per call chain. Each case is also loaded into the running kernel, which must decide the same
with the same errno; accepted programs run the same on both tiers and in the kernel; pruning
inside callees never changes a verdict; and accepted programs with calls never fault."""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
from helpers import in_child
from verifier_cases import CLS, EXIT0, MAP_FD, PROGS_FD, SOCK, build, pruned_and_exact

from bpffs.vm import BpfError, asm, kernel, load_program
from bpffs.vm.context import SKB
from bpffs.vm.isa import R0, R1, R2, R3, R6, R7, R9, R10, Alu, Insn, Jmp
from bpffs.vm.uapi import Helper

PACKET = bytes(64)
needs_kernel = pytest.mark.skipif(not kernel.available(),
                                  reason="needs the running kernel's bpf(2) (root)")


def chain(frames: int) -> list[Insn]:
    """main calls f1, which calls f2, ... : `frames` frames deep."""
    return [*(x for _ in range(frames - 1) for x in (asm.call_local(1), asm.exit())), *EXIT0]


def stacks(*depths: int) -> list[Insn]:
    """A chain of functions, each storing at its r10 - depth, then calling the next."""
    body: list[Insn] = []
    for n, depth in enumerate(depths):
        body += [asm.st(8, R10, -depth, 1)]
        body += [asm.call_local(1), asm.exit()] if n < len(depths) - 1 else EXIT0
    return body


def ptr_arg(off: int = -8) -> list[Insn]:
    """r1 = r10 + off: a pointer to the caller's stack, passed down."""
    return [asm.mov64_reg(R1, R10), asm.add64_imm(R1, off)]


# (name, program type, instructions, errno and message of the refusal or None to accept)
CASES: list[tuple[str, int, list, tuple[int, str] | None]] = [
    # the colleague's finding: the callee's code was never checked
    ("callee stores above its frame", SOCK,
     [asm.call_local(2), *EXIT0, asm.st(8, R10, 8, 1), *EXIT0],
     (errno.EACCES, "invalid stack off=8 size=8")),
    ("callee reads r2 it was not given", SOCK,
     [asm.call_local(2), *EXIT0, asm.mov64_reg(R0, R2), asm.exit()],
     (errno.EACCES, "R2 !read_ok")),
    ("callee reads the caller's r6", SOCK,
     [asm.mov64_imm(R6, 1), asm.call_local(2), *EXIT0, asm.mov64_reg(R0, R6), asm.exit()],
     (errno.EACCES, "R6 !read_ok")),
    ("callee dereferences a scalar argument", SOCK,
     [asm.mov64_imm(R1, 0), asm.call_local(2), *EXIT0, asm.ldx(4, R0, R1, 0), asm.exit()],
     (errno.EACCES, "R1 invalid mem access 'imm'")),
    ("callee reads the context passed in r1", SOCK,
     [asm.call_local(1), asm.exit(), asm.ldx(4, R0, R1, SKB["len"]), asm.exit()], None),
    ("callee calls a helper", SOCK,
     [asm.call_local(1), asm.exit(), asm.call(Helper.get_prandom_u32), asm.exit()], None),
    # the return
    ("caller's r1 unreadable after the call", SOCK,
     [asm.call_local(2), asm.mov64_reg(R0, R1), asm.exit(), *EXIT0],
     (errno.EACCES, "R1 !read_ok")),
    ("caller's r6 and stack survive the call", SOCK,
     [asm.mov64_imm(R6, 1), asm.st(8, R10, -8, 5), asm.call_local(3),
      asm.ldx(8, R0, R10, -8), asm.alu64(Alu.ADD, R0, R6, reg=True), asm.exit(),
      asm.mov64_imm(R6, 7), asm.st(8, R10, -8, 9), *EXIT0], None),
    ("callee without r0, caller ignores it", SOCK, [asm.call_local(2), *EXIT0, asm.exit()],
     None),
    ("callee without r0, caller returns it", SOCK, [asm.call_local(1), asm.exit(), asm.exit()],
     (errno.EACCES, "R0 !read_ok")),
    ("callee returns the context", SOCK,
     [asm.call_local(2), asm.ldx(4, R0, R0, SKB["len"]), asm.exit(), asm.mov64_reg(R0, R1),
      asm.exit()], None),
    ("callee returns its stack pointer", SOCK,
     [asm.call_local(2), *EXIT0, asm.mov64_reg(R0, R10), asm.exit()],
     (errno.EINVAL, "cannot return stack pointer to the caller")),
    # pointers to the caller's stack
    ("callee reads the caller's stack", SOCK,
     [asm.st(8, R10, -8, 5), *ptr_arg(), asm.call_local(1), asm.exit(),
      asm.ldx(8, R0, R1, 0), asm.exit()], None),
    ("callee writes the caller's stack", SOCK,
     [*ptr_arg(), asm.call_local(2), asm.ldx(8, R0, R10, -8), asm.exit(),
      asm.st(8, R1, 0, 7), *EXIT0], None),
    ("callee passes the caller's stack to a helper", SOCK,
     [asm.st(8, R10, -8, 0x41), *ptr_arg(), asm.call_local(1), asm.exit(),
      asm.mov64_imm(R2, 8), asm.call(Helper.trace_printk), asm.exit()], None),
    ("callee writes past the caller's frame", SOCK,
     [*ptr_arg(), asm.call_local(1), asm.exit(), asm.st(8, R1, 8, 1), *EXIT0],
     (errno.EACCES, "invalid stack off=0 size=8")),
    ("callee returns the caller's stack pointer", SOCK,
     [*ptr_arg(), asm.call_local(1), asm.exit(), asm.mov64_reg(R0, R1), asm.exit()],
     (errno.EINVAL, "cannot return stack pointer to the caller")),
    ("callee spills its stack pointer into the caller's", SOCK,
     [*ptr_arg(), asm.call_local(2), *EXIT0, asm.stx(8, R1, R10, 0), *EXIT0],
     (errno.EINVAL, "cannot spill pointers to stack into stack frame of the caller")),
    ("map value or NULL checked in the callee", SOCK,
     [asm.st(4, R10, -4, 0), asm.mov64_reg(R2, R10), asm.add64_imm(R2, -4),
      asm.ld_map_fd(R1, MAP_FD), asm.call(Helper.map_lookup_elem), asm.mov64_reg(R1, R0),
      asm.call_local(1), asm.exit(), asm.jmp_imm(Jmp.JEQ, R1, 0, 1), asm.ldx(8, R0, R1, 0),
      *EXIT0], None),
    ("map value not checked in the callee", SOCK,
     [asm.st(4, R10, -4, 0), asm.mov64_reg(R2, R10), asm.add64_imm(R2, -4),
      asm.ld_map_fd(R1, MAP_FD), asm.call(Helper.map_lookup_elem), asm.mov64_reg(R1, R0),
      asm.call_local(1), asm.exit(), asm.ldx(8, R0, R1, 0), asm.exit()],
     (errno.EACCES, "R1 invalid mem access 'map_value_or_null'")),
    # depth: MAX_CALL_FRAMES
    ("8 frames", SOCK, chain(8), None),
    ("9 frames", SOCK, chain(9), (errno.E2BIG, "the call stack of 9 frames is too deep")),
    ("recursion", SOCK, [asm.call_local(1), asm.exit(), asm.call_local(-1), asm.exit()],
     (errno.E2BIG, "the call stack of 9 frames is too deep")),
    ("mutual recursion", SOCK, [asm.call_local(1), asm.exit(), asm.call_local(1), asm.exit(),
                                asm.call_local(-3), asm.exit()],
     (errno.E2BIG, "the call stack of 9 frames is too deep")),
    ("recursion bounded by a constant", SOCK,
     [asm.mov64_imm(R1, 3), asm.call_local(1), asm.exit(), asm.mov64_imm(R0, 0),
      asm.jmp_imm(Jmp.JEQ, R1, 0, 2), asm.add64_imm(R1, -1), asm.call_local(-4), asm.exit()],
     (errno.E2BIG, "the call stack of 9 frames is too deep")),
    ("one callee from two call sites", SOCK,
     [asm.call_local(3), asm.call_local(2), asm.mov64_imm(R0, 0), asm.exit(),
      asm.st(8, R10, -8, 1), *EXIT0], None),
    # stack: MAX_BPF_STACK across the frames of a chain, each rounded up to 16
    ("main 8 + callee 496", SOCK, stacks(8, 496), None),
    ("main 8 + callee 504", SOCK, stacks(8, 504),
     (errno.EACCES, "combined stack size of 2 calls is 528. Too large")),
    ("main 512 + callee without stack", SOCK,
     [asm.st(8, R10, -512, 1), asm.call_local(1), asm.exit(), *EXIT0], None),
    ("main 512 + callee 8", SOCK, stacks(512, 8),
     (errno.EACCES, "combined stack size of 2 calls is 528. Too large")),
    ("three frames of 168, 176, 176", SOCK, stacks(168, 176, 176),
     (errno.EACCES, "combined stack size of 3 calls is 528. Too large")),
    ("three frames of 160, 176, 176", SOCK, stacks(160, 176, 176), None),
    ("eight frames of 64", SOCK, stacks(*[64] * 8), None),
    ("eight frames of 72", SOCK, stacks(*[72] * 8),
     (errno.EACCES, "combined stack size of 7 calls is 560. Too large")),
    ("callee's use of the caller's stack counts for the caller", SOCK,
     [asm.mov64_reg(R1, R10), asm.call_local(1), asm.exit(), asm.st(8, R1, -512, 1),
      asm.st(8, R10, -8, 1), *EXIT0],
     (errno.EACCES, "combined stack size of 2 calls is 528. Too large")),
    # what callees may not do without BTF (programs here carry none)
    ("tail call in a callee", CLS,
     [asm.call_local(2), *EXIT0, asm.ld_map_fd(R2, PROGS_FD), asm.mov64_imm(R3, 0),
      asm.call(Helper.tail_call), *EXIT0],
     (errno.EINVAL, "tail_call is not allowed in subprogs without BTF")),
    ("tail call in the main program of one with calls", CLS,
     [asm.ld_map_fd(R2, PROGS_FD), asm.mov64_imm(R3, 0), asm.call(Helper.tail_call),
      asm.call_local(2), *EXIT0, *EXIT0], None),
    ("LD_ABS in a callee", SOCK,
     [asm.mov64_reg(R6, R1), asm.call_local(2), *EXIT0, asm.ld_abs(1, 0), asm.exit()],
     (errno.EINVAL, "LD_ABS is not allowed in subprogs without BTF")),
]


# Where the kernel's log says it otherwise: 4.4's words kept here, or (recursion bounded by a
# constant) the kernel's walk, which follows only the branch a known value takes, ends and
# its static check of the call graph refuses.
KERNEL_WORDING = {
    "callee stores above its frame": "invalid write to stack R10 off=8 size=8",
    "callee writes past the caller's frame": "invalid write to stack R1 off=0 size=8",
    "callee dereferences a scalar argument": "R1 invalid mem access 'scalar'",
    "recursion bounded by a constant": "the call stack of 8 frames is too deep !",
}


def ours(prog_type: int, insns: list, privileged: bool = True):
    code, maps = build(insns, vm_maps=True)
    return load_program(prog_type, code, license="GPL", resolve_map=maps.__getitem__,
                        privileged=privileged, log_level=1)


@pytest.mark.parametrize("name,prog_type,insns,expected", CASES, ids=[c[0] for c in CASES])
def test_calls_decision_errno_and_message(name, prog_type, insns, expected) -> None:
    if expected is None:
        ours(prog_type, insns)
        return
    with pytest.raises(BpfError) as info:
        ours(prog_type, insns)
    assert info.value.errno == expected[0], info.value
    assert info.value.log.rstrip().endswith(expected[1]), info.value.log


@pytest.mark.kernel
@needs_kernel
@pytest.mark.parametrize("name,prog_type,insns,expected", CASES, ids=[c[0] for c in CASES])
def test_the_kernel_decides_calls_the_same(name, prog_type, insns, expected) -> None:
    code, fds = build(insns, vm_maps=False)
    try:
        fd, _ = kernel.prog_load(prog_type, code, log_level=1, log_size=1 << 20)
        os.close(fd)
        kernel_errno, log = 0, ""
    except OSError as e:
        kernel_errno, log = e.errno, e.verifier_log
    finally:
        for fd in fds.values():
            os.close(fd)
    assert kernel_errno == (expected[0] if expected else 0), log
    if expected:
        assert KERNEL_WORDING.get(name, expected[1]) in log


def test_unprivileged_callers_may_not_call_bpf_functions() -> None:
    """bpf_capable only, with the kernel's EPERM and message (the kernel here refuses
    unprivileged bpf(2) altogether, kernel.unprivileged_bpf_disabled, so it cannot be asked)."""
    insns = [asm.call_local(2), *EXIT0, *EXIT0]
    ours(SOCK, insns)
    with pytest.raises(BpfError) as info:
        ours(SOCK, insns, privileged=False)
    assert info.value.errno == errno.EPERM
    assert "loading/calling other bpf or kernel functions are allowed for CAP_BPF and" \
        " CAP_SYS_ADMIN" in info.value.log


def test_the_daemon_refuses_calls_to_unprivileged_callers(start_daemon) -> None:
    """The same through the daemon: uid 65534's load is EPERM, root's goes through."""
    root = Path(tempfile.mkdtemp(prefix="bpffsd-calls-"))
    root.chmod(0o755)  # (pytest's tmp_path is root's 0700)
    try:
        daemon = start_daemon(mount=False, root=root / "d")
        code = asm.program(asm.call_local(2), *EXIT0, *EXIT0)

        def load() -> int:
            with daemon.client() as c:
                return int(c.prog_load(SOCK, code))

        with pytest.raises(OSError) as info:
            in_child(load, user=(65534, 65534))
        assert info.value.errno == errno.EPERM
        assert "CAP_BPF and CAP_SYS_ADMIN" in str(info.value)
        load()
    finally:
        shutil.rmtree(root, ignore_errors=True)


RUNS = {
    # name: (instructions, r0)
    "callee fills the caller's stack through a pointer":
        ([*ptr_arg(-16), asm.call_local(2), asm.ldx(8, R0, R10, -16), asm.exit(),
          asm.st(8, R1, 0, 41), asm.mov64_imm(R0, 1), asm.exit()], 41),
    "callee-saved registers and stack survive":
        ([asm.mov64_imm(R6, 100), asm.mov64_imm(R7, 20), asm.st(8, R10, -8, 3),
          asm.mov64_imm(R1, 4), asm.call_local(5),
          asm.alu64(Alu.ADD, R0, R6, reg=True), asm.alu64(Alu.ADD, R0, R7, reg=True),
          asm.ldx(8, R2, R10, -8), asm.alu64(Alu.ADD, R0, R2, reg=True), asm.exit(),
          asm.mov64_imm(R6, 9), asm.st(8, R10, -8, 9), asm.mov64_reg(R0, R1),
          asm.alu64(Alu.MUL, R0, imm=1000, reg=False), asm.exit()], 4123),
    "eight frames deep":
        ([*(x for _ in range(7) for x in (asm.call_local(2), asm.add64_imm(R0, 1),
                                            asm.exit())), *EXIT0], 7),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_accepted_calls_run_as_in_the_kernel(name: str) -> None:
    insns, expected = RUNS[name]
    prog, _ = ours(SOCK, insns)
    for tier in ("interpreter", "compiled"):
        assert prog.test_run(PACKET, tier=tier).retval == expected
    if kernel.available():
        fd, _ = kernel.prog_load(SOCK, asm.program(*insns))
        try:
            assert kernel.prog_test_run(fd, PACKET)[0] == expected
        finally:
            os.close(fd)


# -- pruning in callees, and the fuzz --------------------------------------------------------
SCRATCH = (2, 3, 4, 5, 7, 8)  # r9 keeps the context, r6 a pointer into the caller's stack
VALUES = (-64, -8, -64, -8, 1, 8, 64, 100)  # sizes and stack offsets, valid for some uses


def a_set(rng: random.Random) -> list[Insn]:
    """What one side of a branch does: the value, type or slot it sets decides whether the
    uses after the join are safe (r6: in a callee, the pointer its caller passed)."""
    r, q = rng.choice(SCRATCH), rng.choice(SCRATCH)
    return rng.choice([
        lambda: [asm.mov64_imm(r, rng.choice(VALUES))],
        lambda: [asm.mov64_reg(r, q)],
        lambda: [asm.mov64_reg(r, R10)],  # a pointer now
        lambda: [asm.alu64(Alu.XOR, r, q, reg=True)],  # an unknown scalar now
        lambda: [asm.st(8, R10, -72, 1)],  # -72 starts uninitialised
        lambda: [asm.stx(8, R10, r, -80)],  # spills a pointer, or writes a scalar
        lambda: [asm.st(8, R6, -8, 2)],  # the caller's stack (own, in the main program)
        lambda: [asm.mov64_imm(R0, rng.choice(VALUES))],  # (maybe over a callee's result)
    ])()


def a_use(rng: random.Random) -> list[Insn]:
    """What may come after the join, safe for some of the values set before it."""
    r = rng.choice(SCRATCH)
    return rng.choice([
        lambda: [asm.mov64_reg(R1, R10), asm.alu64(Alu.ADD, R1, r, reg=True),
                 asm.st(1, R1, 0, 1)],  # r is a stack offset
        lambda: [asm.mov64_reg(R1, R10), asm.alu64(Alu.ADD, R1, R0, reg=True),
                 asm.st(1, R1, 0, 1)],  # so is r0, maybe a callee's result
        lambda: [asm.ldx(8, r, R10, -72)],
        lambda: [asm.ldx(8, R1, R10, -80), asm.st(1, R1, -1, 1)],  # a spilled pointer
        lambda: [asm.st(1, r, -1, 1)],  # r is a stack pointer
        lambda: [asm.ldx(8, r, R6, -8)],  # the caller's stack
    ])()


def a_function(rng: random.Random, callees: tuple[int, ...]) -> list:
    """Branches on the packet length, each setting something on one side only, and calls
    (("call", function) placeholders) made with r1 = the context, r2 = r6 or a scalar."""
    body: list = [asm.ldx(4, R7, R9, SKB["len"]), asm.mov64_imm(R0, -8),
                  *(asm.mov64_reg(r, R10) if rng.random() < 0.3 else
                    asm.mov64_imm(r, rng.choice(VALUES)) for r in SCRATCH if r != R7),
                  *([asm.st(8, R10, -72, 0)] if rng.random() < 0.6 else []),
                  *([asm.stx(8, R10, R10, -80)] if rng.random() < 0.6 else [])]

    def call(callee: int) -> list:
        return [asm.mov64_reg(R1, R9),
                asm.mov64_reg(R2, R6) if rng.random() < 0.95 else asm.mov64_imm(R2, 8),
                ("call", callee), *(asm.mov64_imm(n, 8) for n in (2, 3, 4, 5)),
                *([asm.mov64_reg(R1, R10), asm.alu64(Alu.ADD, R1, R0, reg=True),
                   asm.st(1, R1, 0, 1)] if rng.random() < 0.15 else [])]  # r0: an offset
    for _ in range(rng.randint(2, 6)):
        if callees and rng.random() < 0.3:
            body += call(rng.choice(callees))
        elif rng.random() < 0.9:
            side = a_set(rng)
            body += [asm.jmp_imm(Jmp.JGT, R7, rng.randint(0, 9), len(side)), *side]
        else:
            body += a_use(rng)
    if callees:  # every function is called from somewhere
        body += call(callees[0])
    if rng.random() < 0.6:
        body += a_use(rng)
    if rng.random() < 0.4:  # r0 as the branches left it: a callee's caller may measure it
        return [*body, asm.exit()]
    r0 = rng.choice([asm.mov64_imm(R0, 0), asm.mov64_imm(R0, rng.choice(VALUES)),
                     asm.mov64_reg(R0, R7), asm.mov64_reg(R0, rng.choice(SCRATCH))])
    return [*body, r0, asm.exit()]


def random_program(rng: random.Random) -> bytes:
    """A main program and two callees, the first of which may call the second."""
    funcs = [[asm.mov64_reg(R9, R1), asm.mov64_reg(R6, R10), asm.add64_imm(R6, -16),
              *(asm.st(8, R10, -8 * k, 0) for k in range(1, 5)), *a_function(rng, (1, 2))],
             [asm.mov64_reg(R9, R1), asm.mov64_reg(R6, R2), *a_function(rng, (2,))],
             [asm.mov64_reg(R9, R1), asm.mov64_reg(R6, R2), *a_function(rng, ())]]
    starts = [0, len(funcs[0]), len(funcs[0]) + len(funcs[1])]
    insns = [x for f in funcs for x in f]
    return asm.program(*(asm.call_local(starts[i[1]] - pc - 1) if isinstance(i, tuple) else i
                         for pc, i in enumerate(insns)))


def verdict(code: bytes) -> tuple[bool, int]:
    """(accepted, instructions processed)."""
    try:
        _, log = load_program(SOCK, code, license="GPL", resolve_map=None, log_level=1)
    except BpfError:
        return False, 0
    return True, int(log.splitlines()[-1].split()[1])


def test_pruning_in_callees_never_changes_a_verdict(monkeypatch) -> None:
    """As tests/verifier/test_pruning.py, with calls: states in a callee are compared with
    its liveness, and its callers' frames where they resume."""
    rng = random.Random(1)
    programs = [random_program(rng) for _ in range(1000)]
    accepted, shorter = pruned_and_exact(programs, verdict, monkeypatch)
    # (comparing no register of the callers' frames, or not counting a callee's r0 as
    # measured at its exit, changes 2-3 verdicts of these 1000)
    assert accepted > 100 and shorter > 80, (accepted, shorter)


def test_fuzz_accepted_programs_with_calls_never_fault() -> None:
    rng = random.Random(17)
    accepted = 0
    for _ in range(400):
        code = random_program(rng)
        try:
            prog, _ = load_program(SOCK, code, license="GPL", resolve_map=None)
        except BpfError:
            continue
        accepted += 1
        for tier in ("interpreter", "compiled"):
            for size in (14, 64):  # both sides of the length branches
                prog.test_run(bytes(size), tier=tier)  # raises EFAULT on a run-time fault
    assert accepted > 40, accepted
