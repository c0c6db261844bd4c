"""The README's examples run as written: every command of the shell snippets in "Using it",
"clang-built objects and the tc workflow" and "Programs", in order, with /sys/fs/bpf replaced
by the module daemon's mount, from a copy of the repository's examples/ (so that `make -C
examples` and the outputs land in a scratch directory); then the Python snippet."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import REPO
from helpers import DaemonProcess

SECTIONS = ("## Using it", "### clang-built objects and the tc workflow", "## Programs")
STREAMING = ("bpffs prog tracelog", "bpffs map event_pipe")  # run until interrupted


def snippets(language: str) -> list[str]:
    """The code blocks in `language` of the README's sections that SECTIONS names, in order
    (a `# comment` line inside a block is no heading)."""
    blocks: list[str] = []
    section, fence, block = "", None, []
    for line in (REPO / "README.md").read_text().splitlines(keepends=True):
        if fence is None and line.startswith("```"):
            fence, block = line[3:].strip(), []
        elif fence is not None and line.startswith("```"):
            if fence == language and section in SECTIONS:
                blocks.append("".join(block))
            fence = None
        elif fence is not None:
            block.append(line)
        elif line.startswith("#"):
            section = line.strip()
    return blocks


def commands() -> list[str]:
    lines = [line for block in snippets("sh") for line in block.splitlines()]
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_the_readme_has_the_examples() -> None:
    """The snippets this test runs are there (a renamed section must not skip them)."""
    found = commands()
    assert any(c.startswith("bpffs map create") for c in found)
    assert any(c.startswith("make -C examples") for c in found)
    assert any(c.startswith("bpffs prog loadall") for c in found)
    assert any(c.startswith("bpffs map event_pipe pinned /sys/fs/bpf/events") for c in found)
    assert len(snippets("python")) == 1


@pytest.mark.fuse
@pytest.mark.slow
def test_readme_commands_run_as_written(daemon: DaemonProcess, cli_env: dict[str, str],
                                        tmp_path: Path) -> None:
    if shutil.which("clang") is None or shutil.which("make") is None:
        pytest.skip("needs clang and make (install.sh installs clang)")
    assert daemon.mount is not None
    shutil.copytree(REPO / "examples", tmp_path / "examples",
                    ignore=shutil.ignore_patterns("*.o", "in.pcap", "pkt.bin"))
    mount = str(daemon.mount)
    background: list[tuple[str, subprocess.Popen]] = []
    try:
        for command in commands():
            line = command.replace("/sys/fs/bpf", mount)
            streaming = any(line.startswith(s) for s in STREAMING)
            if streaming:  # as a user in another terminal (or with `&`), until interrupted
                line = re.sub(r"\s*&\s*(#.*)?$", "", line)
                proc = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=tmp_path,
                                        env=cli_env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
                background.append((command, proc))
                time.sleep(1.0)  # let it put its perf events in place
                assert proc.poll() is None, f"{command} ended: {proc.communicate()}"
                continue
            done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=cli_env,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{command}\n-> {done.returncode}: {done.stderr}"
            assert "Traceback" not in done.stderr, command
        for command, proc in background:
            assert proc.poll() is None, f"{command} ended: {proc.communicate()}"
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            out, err = proc.communicate(timeout=30)
            assert err == "", f"{command}: {err}"
            if "event_pipe" in command:  # the kprobe run after it sent one sample
                assert re.search(r"^== @[\d.]+ CPU: \d+ index: \d+ ==$", out, flags=re.M), out
    finally:
        for _, proc in background:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    python = snippets("python")[0].replace("/sys/fs/bpf", mount)
    done = subprocess.run([sys.executable, "-c", python], env=cli_env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
