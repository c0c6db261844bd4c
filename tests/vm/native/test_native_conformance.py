"""The BPF conformance suite (tests/vm/conformance) passes on the native tier, in process and
through `bpffs-vm-plugin --tier native` as the suite's runner calls it."""

from __future__ import annotations

import pytest

pytest.importorskip("llvmlite")

from conformance_asm import DATA, parse
from plugin_runner import plugin
from test_conformance_suite import NOT_IN_LINUX, SUBPROCESS_SAMPLE, TESTS

from bpffs.vm import VmFault
from bpffs.vm.conformance_plugin import run_hex


@pytest.mark.parametrize("path", TESTS, ids=[p.stem for p in TESTS])
def test_suite_program_gives_the_expected_r0_natively(path) -> None:
    test = parse(path)
    if test.name in NOT_IN_LINUX:
        with pytest.raises(VmFault, match=NOT_IN_LINUX[test.name]):
            run_hex(test.program.hex(), test.memory.hex(), "native")
        return
    assert test.error is None and test.result is not None
    assert run_hex(test.program.hex(), test.memory.hex(), "native") == test.result


@pytest.mark.parametrize("name", SUBPROCESS_SAMPLE)
def test_suite_program_through_the_plugin_protocol_natively(name: str) -> None:
    test = parse(DATA / f"{name}.data")
    out = plugin(test.program, test.memory, "--tier", "native")
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip(), 16) == test.result


def test_a_native_fault_is_reported_by_the_plugin() -> None:
    out = plugin(bytes.fromhex("79100000000000009500000000000000"), b"\x01\x02",
                 "--tier", "native")  # r0 = *(u64 *)(r1 + 0) of 2 bytes
    assert out.returncode == 1
    assert "invalid read of 8 bytes at offset 0 of context (2 bytes)" in out.stderr
