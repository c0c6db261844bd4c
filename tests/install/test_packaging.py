"""What the packaging promises, checked without installing anything: the client never imports
pyfuse3, pyfuse3 is an extra, every declared minimum is pinned for CI's minimum-versions run,
and CI runs the README's test command word for word."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Every module a `bpffs` command or `import bpffs.client` may load, the lazy ones included.
CLIENT_MODULES = ["bpffs.client", "bpffs.client.cli", "bpffs.client.cli.prog",
                  "bpffs.client.cli.pcap", "bpffs.client.loader", "bpffs.client.aio",
                  "bpffs.client.replay"]
DAEMON_ONLY = ["pyfuse3"]


def requirement_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower()


def readme_commands() -> list[str]:
    """The README's two commands: the first ```sh block, comments dropped."""
    block = re.search(r"```sh\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert block, "README.md has no ```sh block"
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line]


def test_client_imports_no_daemon_only_module() -> None:
    code = (f"import importlib, sys\nfor m in {CLIENT_MODULES!r}: importlib.import_module(m)\n"
            f"print(sorted(m for m in {DAEMON_ONLY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.strip() == "[]", f"the client imported {out.strip()}"


def test_client_dependencies_exclude_pyfuse3() -> None:
    core = {requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert not core & set(DAEMON_ONLY), "pip install bpffsd must not need a compiler"
    assert "pyfuse3" in {requirement_name(r) for r in extras["daemon"]}
    assert "bpffsd[daemon]" in extras["test"]


def test_every_minimum_is_pinned_for_ci() -> None:
    declared = {}
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    for req in [*project["dependencies"], *extras["daemon"], *extras["test"], *extras["native"]]:
        if requirement_name(req) == "bpffsd":
            continue
        lower = re.search(r">=\s*([\w.]+)", req)
        assert lower, f"{req}: declare a lower bound"
        declared[requirement_name(req)] = Version(lower.group(1))
    pinned = {}
    for line in (REPO / ".ci" / "minimum-versions.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pinned[name.strip().lower()] = Version(version.strip())
    assert pinned == declared


def test_ci_runs_the_readme_commands() -> None:
    install, test = readme_commands()
    assert install == "bash install.sh && bpffsd --detach"
    ci = (REPO / ".ci" / "run").read_text()
    assert f"'{test}'" in ci, f"CI must run the README's test command: {test}"
    assert "bash install.sh" in ci


def test_install_sh_parses() -> None:
    subprocess.run(["bash", "-n", str(REPO / "install.sh")], check=True)
    out = subprocess.run(["bash", str(REPO / "install.sh"), "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--client" in out and "/opt/bpffsd/venv" in out
