"""Verification time, side by side with the kernel's BPF_PROG_LOAD on this machine.

    python3 bench/verifier.py

Programs of 100, 1,000 and 4,096 instructions: straight-line ALU code with stack traffic and
a forward branch every 16 instructions (each branch doubles nothing: both sides join again,
so state pruning is exercised). Goal: 4,096 instructions verified in under 1 s. Wall-clock on
a shared machine: expect 10-20 % noise.
"""

from __future__ import annotations

import os
import random
import time

from bpffs.vm import asm, kernel, load_program
from bpffs.vm.isa import R0, R10, Alu, Jmp
from bpffs.vm.uapi import ProgType


def program(n: int) -> bytes:
    rng = random.Random(n)
    body = [asm.mov64_imm(r, r) for r in range(10)]
    body += [asm.st(8, R10, -8 * k, k) for k in range(1, 9)]
    while len(body) < n - 2:
        k = len(body)
        if k % 16 == 0:
            body.append(asm.jmp_imm(Jmp.JGT, rng.randrange(10), rng.randrange(100), 1))
        elif k % 7 == 0:
            body.append(asm.stx(8, R10, rng.randrange(10), -8 * rng.randint(1, 8)))
        elif k % 5 == 0:
            body.append(asm.ldx(8, rng.randrange(10), R10, -8 * rng.randint(1, 8)))
        else:
            body.append(asm.alu64(rng.choice([Alu.ADD, Alu.XOR, Alu.OR, Alu.SUB]),
                                  rng.randrange(10), rng.randrange(10), reg=True))
    return asm.program(*body, asm.mov64_imm(R0, 0), asm.exit())


def best_of(fn, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    print(f"{'instructions':>12} {'bpffs (ms)':>11} {'kernel (ms)':>12} {'ratio':>8}")
    for n in (100, 1000, 4096):
        code = program(n)
        ours = best_of(lambda code=code: load_program(ProgType.SOCKET_FILTER, code,
                                                      license="GPL", resolve_map=None))
        theirs = None
        if kernel.available():
            def load(code: bytes = code) -> None:
                fd, _ = kernel.prog_load(ProgType.SOCKET_FILTER, code)
                os.close(fd)
            theirs = best_of(load)
        ratio = f"{ours / theirs:7.0f}x" if theirs else f"{'-':>8}"
        kernel_ms = f"{theirs * 1e3:12.2f}" if theirs else f"{'n/a':>12}"
        print(f"{n:12d} {ours * 1e3:11.1f} {kernel_ms} {ratio}")


if __name__ == "__main__":
    main()
