"""A loaded program (struct bpf_prog) and BPF_PROG_LOAD's checks in front of the verifier."""

from __future__ import annotations

import errno
import hashlib
import threading
import time
from collections.abc import Callable, Generator
from functools import cached_property, partial

from . import verifier
from .compiler import compile_program
from .env import RunEnv
from .errors import BpfError, VmFault
from .insn import subprograms
from .interpreter import interpret
from .isa import INSN_SIZE, LD_IMM64, Insn, decode
from .maps import BpfMap, check_name
from .memory import map_handle
from .run import PacketBatch, Run, TestRunResult
from .runtime import PacketExit, TailCall, block_costs, uses_frame_pointer
from .uapi import BPF_COMPLEXITY_LIMIT_INSNS, BPF_MAXINSNS, BPF_PSEUDO_MAP_FD, PROG_TYPE_NAMES

TIERS = ("compiled", "interpreter", "native", "auto")
# "auto": the compiled tier at once, native code once a background thread has compiled it
# (vm.native.background); the others are forced.
AUTO = "auto"
# What the daemon runs a program on unless a test run asks for a tier: as a JIT, the
# compiled tier at once and native code once it is ready (the compiled tier alone where
# llvmlite is missing). The VM's own API keeps "compiled" as its default.
DEFAULT_TIER = AUTO
# Larger programs are interpreted, not compiled (see Program.entry): the kernel's JIT too
# may give up on a program and leave it to the interpreter.
COMPILE_MAX_INSNS = 65_536
REPEAT_STEP_MAX = 1 << 16  # repetitions native code runs between a test run's pauses, at most
# license_is_gpl_compatible() of include/linux/license.h.
GPL_COMPATIBLE = frozenset({"GPL", "GPL v2", "GPL and additional rights", "Dual BSD/GPL",
                            "Dual MIT/GPL", "Dual MPL/GPL"})


class Program:
    """`insns` are the program as `bpftool prog dump xlated` shows it: each map fd of a
    BPF_PSEUDO_MAP_FD load replaced by the map's index in `maps`. Loading them again with
    `resolve_map=lambda i: maps[i]` gives the same program (the journal relies on it)."""

    def __init__(self, prog_type: int, insns: bytes, decoded: list[Insn], maps: list[BpfMap],
                 *, name: str, license: str, kern_version: int):
        self.prog_type = prog_type
        self.insns = insns
        self.decoded = decoded
        self.maps = maps
        self.name = name
        self.license = license
        self.gpl_compatible = license in GPL_COMPATIBLE
        self.kern_version = kern_version
        self.tag = program_tag(decoded)
        self.run_cnt = 0
        self.run_time_ns = 0
        self._entries: dict[str, Callable[[Run, int], int]] = {}
        self.last_tier = DEFAULT_TIER  # the tier its last test run asked for
        self.native_ready = threading.Event()  # "auto" runs natively now
        self.native_error: BaseException | None = None  # why "auto" stays compiled

    def __repr__(self) -> str:
        return (f"<Program {PROG_TYPE_NAMES.get(self.prog_type, self.prog_type)}"
                f" {self.name or self.tag} insns={len(self.decoded)}>")

    @cached_property
    def stackless_functions(self) -> frozenset[int]:
        """Entry insns of the functions (main program, bpf-to-bpf callees) that never
        mention r10: both tiers run them without mapping a stack."""
        return frozenset(start for start, end in subprograms(self.decoded)
                         if not uses_frame_pointer(self.decoded, start, end))

    @cached_property
    def block_costs(self) -> dict[int, int]:
        """Instruction budget charged at the start of each basic block (both tiers)."""
        return block_costs(self.decoded)

    def entry(self, tier: str) -> Callable[[Run, int], int]:
        """The function that runs the program in `tier`, compiled on first use. Programs
        above COMPILE_MAX_INSNS run in the interpreter whatever the tier: compiling costs
        ~14 us and ~2 KiB of memory an instruction (1M instructions: 14 s and 2 GB)."""
        fn = self._entries.get(tier)
        if fn is None:
            if tier == "compiled" and len(self.decoded) <= COMPILE_MAX_INSNS:
                fn = compile_program(self)
            elif tier == "compiled":
                fn = self.entry("interpreter")
            elif tier == "interpreter":
                fn = partial(interpret, self)
            elif tier == "native":
                fn = native_entry(self)
            elif tier == AUTO:
                fn = self._start_auto()
            else:
                raise BpfError(errno.EINVAL, f"unknown tier {tier!r} (one of {TIERS})")
            # (setdefault: a background promotion of "auto" that came first stays)
            fn = self._entries.setdefault(tier, fn)
        return fn

    def _start_auto(self) -> Callable[[Run, int], int]:
        """The compiled entry, and native code on its way (when this program can have it)."""
        from . import native

        compiled = self.entry("compiled")
        if self.native_ready.is_set():
            return self._entries["native"]
        if not native.available():
            self.native_error = BpfError(errno.EOPNOTSUPP, "the native tier needs llvmlite")
        elif len(self.decoded) > native.NATIVE_MAX_INSNS:
            self.native_error = BpfError(errno.E2BIG, f"{len(self.decoded)} instructions are"
                                         f" above the native tier's {native.NATIVE_MAX_INSNS}")
        else:
            from .native.background import submit

            submit(self)
        return compiled

    def promote(self) -> None:
        """Compile to native code (the background thread) and make "auto" run it: quick
        code first for a long program, then the optimised code (native.compile_tiers)."""
        from .native import compile_tiers

        try:
            for fn in compile_tiers(self):
                self._entries[AUTO] = fn
                self.native_ready.set()
        except Exception as e:  # the program keeps running on what it has
            self.native_error = e
            return
        self._entries.setdefault("native", fn)

    def tier_of(self, tier: str) -> str:
        """The tier a run asking for `tier` runs on now (what `bpffs prog show` reports)."""
        if tier == AUTO:
            return "native" if self.native_ready.is_set() else self.tier_of("compiled")
        if tier == "compiled" and len(self.decoded) > COMPILE_MAX_INSNS:
            return "interpreter"
        if tier == "native" and len(self.decoded) > _native_max_insns():
            return self.tier_of("compiled")
        return tier

    @property
    def tier(self) -> str:
        """The tier its runs use now, by the tier its last test run asked for."""
        return self.tier_of(self.last_tier)

    def ready(self, tier: str) -> bool:
        """Whether entry(tier) is at hand (compiled already, or needs no compiling)."""
        return tier in self._entries or tier not in ("compiled", "native", AUTO)

    def execute(self, run: Run, tier: str = "compiled") -> int:
        """Run from the start with r1 = context, following tail calls (at most
        MAX_TAIL_CALL_CNT deep); returns r0."""
        run.prog = self
        try:
            return (self._entries.get(tier) or self.entry(tier))(run, run.ctx_addr)
        except TailCall:
            pass
        except PacketExit:
            return 0
        target, run.tail_target = run.tail_target, None
        return target.execute(run, tier)

    def test_run(self, data_in: bytes = b"", ctx_in: bytes | None = None, repeat: int = 1,
                 env: RunEnv | None = None, tier: str = "compiled") -> TestRunResult:
        """BPF_PROG_TEST_RUN: run `repeat` times on the same packet; a fault is EFAULT."""
        steps = self.test_run_steps(data_in, ctx_in, repeat, env, tier)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def test_run_steps(self, data_in: bytes = b"", ctx_in: bytes | None = None,
                       repeat: int = 1, env: RunEnv | None = None, tier: str = "compiled"
                       ) -> Generator[None, None, TestRunResult]:
        """test_run, yielding after each repetition (native code: each step of them, see
        NativeProgram.repeat): a caller that must not be held for the whole run (the
        daemon's event loop) pauses between them, as the kernel's bpf_test_timer_continue()
        reschedules. Returns the result (StopIteration.value)."""
        repeat_natively = getattr(self.entry(tier), "repeat", None)
        self.last_tier = tier
        run = Run.for_test(self, data_in, ctx_in, env or RunEnv())
        retval, done, elapsed, left, step = 0, 0, 0, max(repeat, 1), 1
        try:
            while left:
                start = time.perf_counter_ns()
                run.reset()
                if repeat_natively is not None:
                    # Native code repeats without Python in between, `step` at a time:
                    # steps grow while they take under a millisecond.
                    run.prog = self
                    retval, ran = repeat_natively(run, min(step, left), tier)
                else:
                    retval, ran = self.execute(run, tier), 1
                took = time.perf_counter_ns() - start
                elapsed, done, left = elapsed + took, done + ran, left - ran
                step = min(2 * step, REPEAT_STEP_MAX) if took < 1_000_000 else \
                    max(step // 2, 1)
                yield
        except VmFault as fault:
            done += getattr(fault, "repeated", 0)
            raise BpfError(errno.EFAULT, f"program {self.name or self.tag} stopped: {fault}"
                           ) from None
        finally:
            self.run_cnt += done
            self.run_time_ns += elapsed
        return run.result(retval, elapsed // max(done, 1), want_ctx=ctx_in is not None)

    def test_run_batch(self, env: RunEnv | None = None, tier: str = "compiled"
                       ) -> PacketBatch:
        """One test run per packet of what is fed to the batch (pcap replay)."""
        self.entry(tier)
        self.last_tier = tier
        return PacketBatch(self, env or RunEnv(), tier)


def native_entry(prog: Program) -> Callable[[Run, int], int]:
    """The native tier (vm.native, LLVM through llvmlite), imported on first use: above
    NATIVE_MAX_INSNS, the compiled tier's entry instead."""
    from .native import NATIVE_MAX_INSNS, compile_native

    if len(prog.decoded) > NATIVE_MAX_INSNS:
        return prog.entry("compiled")
    return compile_native(prog)


def _native_max_insns() -> int:
    from .native import NATIVE_MAX_INSNS

    return NATIVE_MAX_INSNS


def program_tag(decoded: list[Insn]) -> str:
    """bpf_prog_calc_tag: SHA-1 of the instructions with map references zeroed, 8 bytes."""
    digest = hashlib.sha1(usedforsecurity=False)
    map_second_half = False
    for i in decoded:
        imm = 0 if map_second_half else i.imm
        map_second_half = False
        if i.opcode == LD_IMM64 and i.src == BPF_PSEUDO_MAP_FD:
            imm, map_second_half = 0, True
        digest.update(Insn(i.opcode, i.dst, i.src, i.off, imm).encode())
    return digest.hexdigest()[:16]


def load_program(prog_type: int, insns: bytes, *, license: str,
                 resolve_map: Callable[[int], BpfMap], kern_version: int = 0, name: str = "",
                 log_level: int = 0, privileged: bool = True, allow_loops: bool = False,
                 verify: bool = True) -> tuple[Program, str]:
    """BPF_PROG_LOAD: check the shape of the program, resolve its maps, verify it. Returns the
    program and the verifier log; errors are BpfError with the kernel's errno (and `.log`).
    verify=False is for tests of the VM's own run-time checks (the daemon always verifies)."""
    if prog_type not in PROG_TYPE_NAMES:
        raise BpfError(errno.EINVAL, f"unknown program type {prog_type}")
    check_name(name)
    limit = BPF_COMPLEXITY_LIMIT_INSNS if privileged else BPF_MAXINSNS
    if not insns or len(insns) % INSN_SIZE:
        raise BpfError(errno.EINVAL, f"program of {len(insns)} bytes is not a whole number of"
                       f" {INSN_SIZE}-byte instructions")
    if len(insns) // INSN_SIZE > limit:
        raise BpfError(errno.E2BIG, f"program of {len(insns) // INSN_SIZE} instructions is"
                       f" above the limit of {limit}")
    decoded = decode(insns)
    maps: list[BpfMap] = []
    for pc, i in enumerate(decoded):
        if i.opcode != LD_IMM64:
            continue
        second = decoded[pc + 1] if pc + 1 < len(decoded) else None
        if second is None or second.opcode or second.dst or second.src or second.off:
            raise BpfError(errno.EINVAL, f"invalid bpf_ld_imm64 insn at {pc}")
        if i.src == BPF_PSEUDO_MAP_FD:
            m = resolve_map(i.imm)
            if m not in maps:
                maps.append(m)
            index = maps.index(m)
            decoded[pc] = Insn(i.opcode, i.dst, i.src, i.off, index, map_handle(index))
        elif i.src:
            raise BpfError(errno.EINVAL, f"unrecognized bpf_ld_imm64 insn at {pc}"
                           f" (src_reg {i.src})")
    xlated = b"".join(i.encode() for i in decoded)
    prog = Program(prog_type, xlated, decoded, maps, name=name, license=license,
                   kern_version=kern_version)
    if not verify:
        return prog, ""
    log = verifier.verify(prog_type, decoded, maps, license=license, privileged=privileged,
                          log_level=log_level, allow_loops=allow_loops)
    return prog, log
