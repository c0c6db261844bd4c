"""Without llvmlite the native tier is refused with EOPNOTSUPP, through the API and the
conformance plugin, and the other tiers are untouched (this runs with or without it)."""

from __future__ import annotations

import errno
import sys

import pytest

from bpffs.vm import BpfError, asm
from bpffs.vm.conformance_plugin import main
from bpffs.vm.isa import R0


@pytest.fixture
def no_llvmlite(monkeypatch):
    """llvmlite and the modules of the tier that import it, as if never installed."""
    for name in [n for n in sys.modules if n == "llvmlite" or n.startswith("llvmlite.")
                 or n in ("bpffs.vm.native.glue", "bpffs.vm.native.engine")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "llvmlite", None)  # import raises ImportError


def test_the_native_tier_needs_llvmlite(no_llvmlite, capsys) -> None:
    from progs import ETH_IPV4, load

    prog = load(asm.program(asm.mov64_imm(R0, 3), asm.exit()))
    with pytest.raises(BpfError) as info:
        prog.test_run(ETH_IPV4, tier="native")
    assert info.value.errno == errno.EOPNOTSUPP and "llvmlite" in str(info.value)
    assert prog.test_run(ETH_IPV4, tier="compiled").retval == 3
    assert main(["--tier", "native", "--program", asm.program(asm.exit()).hex()]) == 1
    assert "needs llvmlite" in capsys.readouterr().err
