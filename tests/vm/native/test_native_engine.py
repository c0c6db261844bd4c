"""The native tier's machinery: programs compile in worker threads (the daemon compiles off
its event loop) while others run, dropped programs free their code safely, the optimisation
level is a choice, and the tier is selected by name like the others."""

from __future__ import annotations

import gc
import threading

import pytest

pytest.importorskip("llvmlite")

from native_cases import PACKET, outcome, wild_program
from progs import load, random_program

from bpffs.vm import VmFault, asm, load_program
from bpffs.vm.env import RunEnv
from bpffs.vm.isa import R0
from bpffs.vm.native import compile_native
from bpffs.vm.program import TIERS
from bpffs.vm.run import Run
from bpffs.vm.uapi import ProgType


def test_native_is_a_tier_and_compiles_on_first_use() -> None:
    assert "native" in TIERS
    prog = load(asm.program(asm.mov64_imm(R0, 5), asm.exit()))
    assert not prog.ready("native")
    assert prog.test_run(PACKET, tier="native").retval == 5
    assert prog.ready("native")


@pytest.mark.parametrize("opt", [0, 1, 2, 3])
def test_every_optimisation_level_gives_the_same_results(opt: int) -> None:
    for seed in range(8):
        code = wild_program(seed)
        prog, _ = load_program(ProgType.SCHED_CLS, code, license="GPL", resolve_map={}.get,
                               verify=False)
        prog._entries["native"] = compile_native(prog, opt)  # (Program.entry's cache)
        run = Run.for_test(prog, PACKET, None, RunEnv())
        run.reset()
        try:
            result = f"r0={prog.execute(run, 'native'):#x}"
        except VmFault as e:
            result = f"{type(e).__name__}: {e}"
        assert result == outcome(code, "interpreter").result


def test_programs_compile_in_threads_while_others_run_and_are_freed() -> None:
    running = load(random_program(1))
    expected = load(random_program(1)).test_run(PACKET, tier="interpreter").retval
    errors: list[BaseException] = []

    def compile_some(first: int) -> None:
        try:
            for seed in range(first, first + 6):
                prog = load(random_program(seed))
                prog.entry("native")
                assert prog.test_run(PACKET, tier="native").retval == \
                    prog.test_run(PACKET, tier="interpreter").retval
                del prog
                gc.collect()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=compile_some, args=(n * 10,)) for n in range(3)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        assert running.test_run(PACKET, tier="native").retval == expected
    for t in threads:
        t.join()
    assert not errors


def test_buffer_addresses_are_where_the_bytes_are() -> None:
    import ctypes

    from bpffs.vm.native.regions import buffer_address

    data = bytes(range(40))
    for buf in (data, bytearray(data), memoryview(data), memoryview(bytearray(data))[3:],
                memoryview(data)[5:]):
        assert ctypes.string_at(buffer_address(buf), len(buf)) == bytes(buf)
    assert buffer_address(b"") == buffer_address(bytearray()) == 0
