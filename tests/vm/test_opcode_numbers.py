"""Every opcode number is named once: in vm/isa.py (opcodes, their fields, atomic operations)
or vm/uapi.py (pseudo source registers); classic BPF's in client/seccomp/abi.py. Anywhere else
in the product code (vm/, client/, bpffsd/, bpffs/) a raw number standing for an instruction
fact is a second copy that can drift.

The rule, checked on the syntax tree of every module (comments and strings are not code):
1. No hex literal whose value is an opcode or atomic operation isa.py names as a whole
   (LD_IMM64 0x18, CALL 0x85, EXIT 0x95, JA 0x05, JA32 0x06, MOV64_X 0xbf, XCHG 0xe1,
   CMPXCHG 0xf1): written in hex, such a number is that opcode; import the name.
2. No nonzero integer literal, hex or decimal, compared with (==, !=, in, <, ...), masked
   against (&, |, ^) or assigned to something named like an opcode field: `opcode`, `code`,
   `op`, `jop`, `cls`, `source`, `src` (a name, or an attribute such as `i.src`). Zero stays
   allowed: it means "none" (`i.src == 0`, a helper call). `mode` is not among the names:
   file modes share it (bpffsd/fs), and the opcode's mode is reached through `opcode` anyway.
Decimal numbers that are opcodes by coincidence (24, 133) elsewhere are not flagged, nor are
the bytes of an instruction buffer (`code[off + 1]`): the rule looks for opcode facts, not for
every number that happens to equal one.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

from bpffs.vm.isa import CALL, EXIT, JA, JA32, LD_IMM64, MOV64_X, Atomic

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("vm", "client", "bpffsd", "bpffs")
# The tables: eBPF's, and classic BPF's (the seccomp filter's instruction set, whose encodings
# overlap eBPF's: its BPF_RET|BPF_K is 0x06, eBPF's JA32).
TABLES = {REPO / "vm" / "isa.py", REPO / "vm" / "uapi.py", REPO / "client" / "seccomp" / "abi.py"}
WHOLE_OPCODES = frozenset({LD_IMM64, CALL, EXIT, JA, JA32, MOV64_X, Atomic.XCHG,
                           Atomic.CMPXCHG})
FIELD_NAMES = frozenset({"opcode", "code", "op", "jop", "cls", "source", "src"})


def product_modules() -> list[Path]:
    """The .py files under the scanned folders, each once (bpffs/ links to the others)."""
    found: set[Path] = set()
    for top in SCANNED:
        for folder, _, files in os.walk(REPO / top):  # symlinked folders are not followed
            found.update(Path(folder, f).resolve() for f in files if f.endswith(".py"))
    return sorted(found - TABLES)


def _field_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id if node.id in FIELD_NAMES else None
    if isinstance(node, ast.Attribute):
        return node.attr if node.attr in FIELD_NAMES else None
    return None


def _numbers(node: ast.expr) -> list[ast.Constant]:
    """Nonzero int literals in node itself or directly in a tuple, list or set it builds."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [n for n in items if isinstance(n, ast.Constant) and type(n.value) is int
            and n.value != 0]


def _is_hex(source: str, node: ast.Constant) -> bool:
    return (ast.get_source_segment(source, node) or "").lower().startswith("0x")


def raw_opcode_numbers(source: str) -> list[str]:
    """`line: text` of each use of a raw opcode number in a module's source."""
    found = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and type(node.value) is int and \
                node.value in WHOLE_OPCODES and _is_hex(source, node):
            found.append(node)
            continue
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
        elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr,
                                                                  ast.BitXor)):
            sides = [node.left, node.right]
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            sides = [*targets, node.value]
        else:
            continue
        if any(_field_name(side) for side in sides):
            found += [n for side in sides for n in _numbers(side)]
    return sorted({f"{n.lineno}: {ast.get_source_segment(source, n)}" for n in found})


def test_no_raw_opcode_number_outside_the_tables() -> None:
    offenders = {str(path.relative_to(REPO)): hits for path in product_modules()
                 if (hits := raw_opcode_numbers(path.read_text()))}
    assert offenders == {}


def test_the_scan_finds_what_it_is_meant_to() -> None:
    """The rule catches the copies the review found (0x18 in the client, 0xF1 in the
    verifier, a class mask) and lets names, zero and unrelated numbers through."""
    assert raw_opcode_numbers("_LD_IMM64 = 0x18\n") == ["1: 0x18"]
    assert raw_opcode_numbers("w = R0 if i.imm == 0xF1 else i.src\n") == ["1: 0xF1"]
    assert raw_opcode_numbers("cls = op & 0x07\n") == ["1: 0x07"]
    assert raw_opcode_numbers("if i.src in (1, 2): pass\n") == ["1: 1", "1: 2"]
    assert raw_opcode_numbers("if insns[pc].code == 133: pass\n") == ["1: 133"]
    assert raw_opcode_numbers("if self.mode & 0o111 or bits & 7: pass\n") == []
    assert raw_opcode_numbers("if i.src == 0 and i.opcode == LD_IMM64: pass\n") == []
    assert raw_opcode_numbers("PAGE = 0x1000\nmask = value & 0xFFFF\nn = 24\n") == []
    assert len(product_modules()) > 50
