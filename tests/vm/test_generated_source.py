"""The compiled tier's generated code, read as a linter would read it (no linter sees the
strings it is built from): every global name a generated function reads is one that
vm.compiler.emit.namespace() provides, a function of the same module, or a builtin. A name
spelled in a template but missing from the namespace would only fail when that instruction
runs; this finds it for every program of the conformance suite, the ISA table and the random
programs of test_tiers."""

from __future__ import annotations

import builtins
import symtable

from conformance_asm import DATA, parse
from isa_cases import CASES, returns64
from progs import random_program

from bpffs.vm.compiler.emit import namespace
from bpffs.vm.isa import decode
from bpffs.vm.program import Program
from bpffs.vm.uapi import ProgType


def undefined_globals(prog: Program, names: set[str] | None = None) -> set[str]:
    """Global names the generated functions read that nothing defines (`names`: those of
    the namespace, namespace(prog) unless given)."""
    module = symtable.symtable(prog.entry("compiled").source, "<bpf prog>", "exec")
    given = set(namespace(prog)) if names is None else names
    defined = given | set(dir(builtins)) | \
        {s.get_name() for s in module.get_symbols() if s.is_assigned()}
    return {s.get_name() for function in module.get_children() for s in function.get_symbols()
            if s.is_global() and s.is_referenced() and s.get_name() not in defined}


def program(code: bytes) -> Program:
    return Program(ProgType.SOCKET_FILTER, code, decode(code), [], name="", license="GPL",
                   kern_version=0)


def corpus() -> dict[str, bytes]:
    programs = {f"suite {path.stem}": parse(path).program for path in sorted(DATA.glob("*.data"))}
    programs |= {f"isa {name}": returns64(*body) for name, (body, _) in CASES.items()}
    programs |= {f"random {seed}": random_program(seed, packet=seed % 3 == 0)
                 for seed in range(150)}
    return programs


def test_generated_code_reads_only_names_its_namespace_defines() -> None:
    missing = {name: names for name, code in corpus().items()
               if (names := undefined_globals(program(code)))}
    assert missing == {}


def test_the_check_sees_a_name_the_namespace_lacks() -> None:
    prog = program(returns64(*CASES["arsh sign extends"][0]))  # sx(d, 64) >> ...
    assert undefined_globals(prog, set(namespace(prog)) - {"sx"}) == {"sx"}
