"""Small native functions of the client (the pcap walk, the tally of result columns), written
in LLVM IR and compiled once per process with the native tier's engine (llvmlite), so that
pcap replay costs no Python per packet. Without llvmlite, or with BPFFS_NATIVE_CLIENT=0,
there are none and their callers fall back to Python loops."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

ENV = "BPFFS_NATIVE_CLIENT"


def compile_function(build_ir: Callable[[], str], name: str, signature: Any) -> Any | None:
    """`name` from the module build_ir() returns, as a ctypes function of `signature`
    (which keeps its machine code alive); None where native code is unavailable."""
    if os.environ.get(ENV) == "0":
        return None
    try:
        from bpffs.vm.native.engine import jit
    except ImportError:
        return None
    jitted = jit(build_ir())
    function = signature(jitted.address(name))
    function.jitted = jitted  # the code lives as long as its engine
    return function


def module_header() -> Any:
    """An empty llvmlite module for this process's machine."""
    from llvmlite import ir

    from bpffs.vm.native.engine import triple_and_layout

    module = ir.Module("bpffs_client")
    module.triple, module.data_layout = triple_and_layout()
    return module
