"""What the verifier tests share: the program types, placeholder map fds and build(), which
makes a case's bytecode for our verifier or for the running kernel's; and pruned_and_exact(),
which checks that pruning never changes a verdict."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bpffs.vm import asm, kernel
from bpffs.vm import verifier as verifier_pkg
from bpffs.vm.isa import LD_IMM64, R0, Insn
from bpffs.vm.maps import create_map
from bpffs.vm.uapi import BPF_PSEUDO_MAP_FD, MapType, ProgType

SOCK, CLS = ProgType.SOCKET_FILTER, ProgType.SCHED_CLS
EXIT0 = [asm.mov64_imm(R0, 0), asm.exit()]
MAP_FD, PROGS_FD = 3, 4  # placeholder fds of a hash map and a prog array, relocated by build()


def build(insns: list, vm_maps: bool) -> tuple[bytes, dict]:
    """Bytecode with map fds: ours (fd -> BpfMap) or the kernel's (real fds)."""
    make = create_map if vm_maps else kernel.map_create
    fds = {MAP_FD: make(MapType.HASH, 4, 8, 4), PROGS_FD: make(MapType.PROG_ARRAY, 4, 4, 2)}
    out = []
    for part in insns:
        for insn in part if isinstance(part, list) else [part]:
            if insn.opcode == LD_IMM64 and insn.src == BPF_PSEUDO_MAP_FD and not vm_maps:
                insn = Insn(insn.opcode, insn.dst, insn.src, insn.off, fds[insn.imm])
            out.append(insn)
    return asm.program(*out), fds


def pruned_and_exact(programs: list[bytes], verdict: Callable[[bytes], tuple[bool, int]],
                     monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    """Each program's verdict (accepted, instructions processed) with pruning, then without
    (every register and stack slot live, as if liveness found nothing dead): the two must
    agree and pruning may only shorten the walk. Returns (accepted, walks pruning shortened)."""
    pruned = [verdict(code) for code in programs]
    monkeypatch.setattr(verifier_pkg, "live_in", lambda insns, cfg: [-1] * len(insns))
    exact = [verdict(code) for code in programs]
    accepted = shorter = 0
    for code, (ok, steps), (exact_ok, exact_steps) in zip(programs, pruned, exact, strict=True):
        assert ok == exact_ok, code.hex()
        if ok:
            accepted += 1
            assert steps <= exact_steps
            shorter += steps < exact_steps
    return accepted, shorter
