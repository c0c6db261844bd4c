"""Red-team review, finding 9: test-run options of the wrong type or range reached the
helpers (EIO with a traceback in the daemon's log, or a crash mid-run). Each is now EINVAL
naming the option, checked once before the run (vm/env.py); the module's daemon fixture
fails the module if the daemon logged a traceback."""

from __future__ import annotations

import errno
import os

import pytest
from helpers import raises_errno

from bpffs.vm import asm
from bpffs.vm.uapi import Helper, ProgType

FRAME = bytes(12) + b"\x08\x00" + bytes(46)
BAD_OPTIONS = [
    {"perf_counters": [1, 2]},
    {"perf_counters": {0: "x"}},
    {"kernel_memory": [0]},
    {"kernel_memory": {"not a number": b"x"}},
    {"kernel_memory": {0x1000: "not bytes"}},
    {"cpu": "x"},
    {"cpu": -1},
    {"cpu": 1 << 32},
    {"ktime_ns": "x"},
    {"budget": True},
    {"seed": 1.5},
    {"comm": 7},
    {"tunnel_key": {"tunnel_id": "x"}},
    {"tunnel_key": {"other": 1}},
    {"interfaces": [1, "lo"]},
    {"pid": -5},
]


@pytest.mark.parametrize("options", BAD_OPTIONS, ids=[repr(o) for o in BAD_OPTIONS])
def test_a_bad_run_option_is_einval_naming_it(client, options: dict) -> None:
    code = asm.program(asm.call(Helper.get_smp_processor_id), asm.exit())
    fd = client.prog_load(ProgType.SCHED_CLS, code)
    try:
        with raises_errno(errno.EINVAL) as refused:
            client.prog_test_run(fd, FRAME, **options)
        assert f"run option {next(iter(options))}" in str(refused.value)
    finally:
        os.close(fd)


def test_good_run_options_still_run(client) -> None:
    code = asm.program(asm.call(Helper.get_smp_processor_id), asm.exit())
    fd = client.prog_load(ProgType.SCHED_CLS, code)
    try:
        assert client.prog_test_run(fd, FRAME, cpu=3, comm="a-very-long-command-name",
                                    ktime_ns=5, seed=1, perf_counters={0: 9},
                                    kernel_memory={0x1000: b"ab"}).retval == 3
    finally:
        os.close(fd)
