"""The README, followed on a stock Debian 12: a minbase root built with mmdebstrap from Debian's
packages (no python3, no pip, nothing preinstalled), this checkout copied in, the README's first
command (`bash install.sh && bpffsd --detach`) run inside as root, then its first example
(create, update, dump, ls/cat, rm) exactly as written, then the README's test command on a few
tests. The root is built once per run and extracted afresh for each test."""

from __future__ import annotations

import re
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path

import debian_root
import pytest
from test_packaging import REPO, readme_commands

pytestmark = [pytest.mark.slow, pytest.mark.install]

CHECKOUT = "/root/bpffsd"


@pytest.fixture(scope="session")
def debian_tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = debian_root.missing_tools()
    if missing:
        pytest.fail(f"building a Debian root needs {', '.join(missing)} "
                    "(.ci/run installs mmdebstrap)")
    return debian_root.build_tarball(tmp_path_factory.mktemp("debian") / "bookworm.tar")


def readme_example() -> list[str]:
    """The first ```sh block under "## Using it": the commands a new user runs first."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Using it"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block
    return [line for line in block.group(1).splitlines() if line.strip()]


@pytest.fixture
def fresh_root(debian_tarball: Path, tmp_path: Path) -> Iterator[Path]:
    """The cached root extracted anew, with this checkout at CHECKOUT; removed afterwards (its
    output stays in tmp_path/debian.log)."""
    root = debian_root.extract(debian_tarball, tmp_path / "root")
    debian_root.copy_host_network(root)
    debian_root.copy_checkout(root / CHECKOUT.lstrip("/"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_readme_on_fresh_debian_12(fresh_root: Path, tmp_path: Path) -> None:
    install, test = readme_commands()
    example = readme_example()
    pin = re.search(r"map create (\S+)", example[0])
    assert pin, example
    steps = [
        f"cd {CHECKOUT}",
        "echo \"### python3 before: $(command -v python3 || echo none)\"",
        f"echo '### install'; {install}",
        "echo \"### install took ${SECONDS}s\"",
        "echo \"### pep668: $(ls /usr/lib/python3*/EXTERNALLY-MANAGED)\"",
        "echo \"### bpffsd: $(readlink -f \"$(command -v bpffsd)\")\"",
        "echo \"### bpffs: $(readlink -f \"$(command -v bpffs)\")\"",
        "echo '### example'",
        *(f"echo {shlex.quote('$ ' + line)}; {line}" for line in example),
        f"echo \"### pin gone: $(test -e {pin.group(1)} || echo yes)\"",
        f"echo '### tests'; {test} tests/install/test_packaging.py",
        "echo \"### done after ${SECONDS}s\"",
    ]
    script = "set -euo pipefail\n" + "\n".join(steps) + "\n"
    result = debian_root.run_in_root(fresh_root, script,
                                     timeout=2400, log=tmp_path / "debian.log")
    out = result.stdout
    tail = out[-6000:]
    assert result.returncode == 0, f"exit {result.returncode}:\n{tail}"
    assert "### python3 before: none" in out  # the stock root has no python3 at all
    assert "### pep668: /usr/lib/python3.11/EXTERNALLY-MANAGED" in out, tail
    assert "### bpffsd: /opt/bpffsd/venv/bin/bpffsd" in out, tail
    assert "### bpffs: /opt/bpffsd/venv/bin/bpffs" in out, tail
    example_out = out[out.index("### example"):out.index("### pin gone")]
    assert "key: 01 00 00 00  value: 2a 00 00 00 00 00 00 00" in example_out, example_out
    assert "Found 1 element" in example_out, example_out
    assert "01 00 00 00: 2a 00 00 00 00 00 00 00" in example_out, example_out  # cat of the pin
    assert "### pin gone: yes" in out, tail
    assert re.search(r"^\d+ passed", out[out.index("### tests"):], re.M), tail
    assert "### done" in out
    print(*re.findall(r"^### (?:install took|done after) .*$", out, re.M), sep="\n")


def test_readme_on_fresh_debian_12_as_a_user(fresh_root: Path, tmp_path: Path) -> None:
    """The same as a user with sudo (for apt): a virtualenv and links of their own. The links go
    to ~/.local/bin, which Debian's ~/.profile puts on PATH from the next login on: the README
    says so. The example runs on the user's default mount instead of /sys/fs/bpf."""
    install, test = readme_commands()
    assert install.startswith("bash install.sh && ")
    example = [line.replace("/sys/fs/bpf", "$B") for line in readme_example()]
    first_login = "\n".join([
        "set -euo pipefail", "cd bpffsd",
        "echo '### install'; bash install.sh",
        "echo \"### on PATH at once: $(command -v bpffsd || echo no)\"",
    ])
    second_login = "\n".join([
        "set -euo pipefail", "cd bpffsd",
        "echo \"### bpffsd: $(readlink -f \"$(command -v bpffsd)\")\"",
        "bpffsd --detach", "B=/tmp/bpffsd-$(id -u)/bpf",
        "echo '### example'",
        *(f"echo {shlex.quote('$ ' + line)}; {line}" for line in example),
        "echo \"### pin gone: $(test -e $B/counts || echo yes)\"",
        f"echo '### tests'; {test} tests/install/test_packaging.py",
        "echo '### done'",
    ])
    script = "\n".join([
        "set -euo pipefail",
        "apt-get update -q >/dev/null && apt-get install -y -q sudo >/dev/null",
        "useradd -m -s /bin/bash alice",
        "echo 'alice ALL=(ALL) NOPASSWD: ALL' > /tmp/alice && install -m 440 /tmp/alice "
        "/etc/sudoers.d/alice",
        f"cp -a {CHECKOUT} /home/alice/bpffsd && chown -R alice: /home/alice/bpffsd",
        f"su - alice -c {shlex.quote(first_login)}",
        f"su - alice -c {shlex.quote(second_login)}",
    ]) + "\n"
    result = debian_root.run_in_root(fresh_root, script,
                                     timeout=2400, log=tmp_path / "debian.log")
    out = result.stdout
    tail = out[-6000:]
    assert result.returncode == 0, f"exit {result.returncode}:\n{tail}"
    assert "### on PATH at once: no" in out, tail  # as the README says: log in again
    assert "### bpffsd: /home/alice/.local/share/bpffsd/venv/bin/bpffsd" in out, tail
    example_out = out[out.index("### example"):out.index("### pin gone")]
    assert "key: 01 00 00 00  value: 2a 00 00 00 00 00 00 00" in example_out, example_out
    assert "01 00 00 00: 2a 00 00 00 00 00 00 00" in example_out, example_out
    assert "### pin gone: yes" in out, tail
    assert re.search(r"^\d+ passed", out[out.index("### tests"):], re.M), tail
    assert "### done" in out
