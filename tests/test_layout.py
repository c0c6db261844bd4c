"""The package layout of bpffs/__init__.py: the folders behind each import name, and the rule that
the daemon loads no client code (the protocol and the default paths are shared modules)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import bpffs.daemon

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"bpffs.daemon": "bpffsd", "bpffs.client": "client", "bpffs.vm": "vm",
           "bpffs.protocol": "bpffs", "bpffs.paths": "bpffs"}


def _fresh_python(code: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          check=True)
    return done.stdout


def test_each_import_name_is_its_folder_in_this_checkout() -> None:
    code = ("import importlib, pathlib\n"
            f"for name in {sorted(FOLDERS)!r}:\n"
            "    print(name, pathlib.Path(importlib.import_module(name).__file__).resolve())\n")
    for line in _fresh_python(code, cwd=Path("/")).splitlines():
        name, where = line.split()
        assert Path(where).parent == REPO / FOLDERS[name], line


def test_the_checkout_imports_without_an_install() -> None:
    """From the repository root, with the editable install's import hooks removed, the symlinks
    in bpffs/ map the folders: nothing needs `pip install -e`."""
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]\n"
            "sys.path[:] = [p for p in sys.path if 'editable' not in p]\n"
            "import bpffs.vm.isa, bpffs.protocol, bpffs.daemon.server\n"
            "print(bpffs.vm.isa.__file__)")
    where = _fresh_python(code, cwd=REPO).strip()
    assert Path(where) == REPO / "bpffs" / "vm" / "isa.py"


def test_the_daemon_loads_no_client_code() -> None:
    daemon_modules = sorted(
        "bpffs.daemon." + ".".join(p.relative_to(REPO / "bpffsd").with_suffix("").parts)
        for p in (REPO / "bpffsd").rglob("*.py") if p.name != "__init__.py")
    assert "bpffs.daemon.server" in daemon_modules
    code = (f"import importlib, sys\nfor m in {daemon_modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('bpffs.client')))")
    assert _fresh_python(code, cwd=Path("/")).strip() == "[]"


def test_the_daemon_is_this_checkout() -> None:
    assert Path(bpffs.daemon.__file__).resolve() == REPO / "bpffsd" / "__init__.py"
