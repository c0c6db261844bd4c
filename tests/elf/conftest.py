"""Fixtures of the ELF loader tests: objects built by clang from examples/ (once per session)
and from small C snippets written by the tests."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
INCLUDE = EXAMPLES / "include"
EXAMPLE_NAMES = sorted(p.stem for p in EXAMPLES.glob("*.c"))


def clang_available() -> bool:
    return shutil.which("clang") is not None


def compile_bpf(source: Path, output: Path, debug: bool = True) -> Path:
    """clang -O2 -target bpf -c (with -g: BTF, needed by .maps)."""
    cmd = ["clang", "-O2", "-target", "bpf", f"-I{INCLUDE}", "-c", str(source), "-o",
           str(output)] + (["-g"] if debug else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr}"
    return output


@pytest.fixture(scope="session")
def examples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every examples/*.c built once: name -> object path."""
    if not clang_available():
        pytest.skip("needs clang (install.sh installs it)")
    out = tmp_path_factory.mktemp("examples")
    return {name: compile_bpf(EXAMPLES / f"{name}.c", out / f"{name}.o")
            for name in EXAMPLE_NAMES}


@pytest.fixture
def build(tmp_path: Path) -> Callable[..., Path]:
    """build(c_source, name="prog", debug=True) -> object path, built with the examples'
    header."""
    if not clang_available():
        pytest.skip("needs clang (install.sh installs it)")

    def build_source(source: str, name: str = "prog", debug: bool = True) -> Path:
        c_file = tmp_path / f"{name}.c"
        c_file.write_text('#include "bpf_helpers.h"\n' + source)
        return compile_bpf(c_file, tmp_path / f"{name}.o", debug)

    return build_source
