"""The daemon reports the tier a program runs on (obj_get_info's "tier", a key bpftool does
not have, and a line of `bpffs prog show`): compiled until the background compiler is done
with a program run on "auto", native after."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

pytest.importorskip("llvmlite")

from native_cases import PACKET
from progs import random_program

from bpffs.vm.uapi import ProgType

CLI = "import sys; from bpffs.client.cli import main; sys.exit(main(sys.argv[1:]))"


def test_prog_show_says_which_tier(client, daemon) -> None:  # type: ignore[no-untyped-def]
    fd = client.prog_load(ProgType.SCHED_CLS, random_program(11), name="tiered")
    info = client.obj_get_info_by_fd(fd)
    assert info["tier"] == "compiled" and info["jited"] is False
    client.prog_test_run(fd, PACKET, tier="interpreter")
    assert client.obj_get_info_by_fd(fd)["tier"] == "interpreter"
    retval = client.prog_test_run(fd, PACKET, tier="auto").retval
    deadline = time.monotonic() + 30
    while client.obj_get_info_by_fd(fd)["tier"] != "native":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert client.prog_test_run(fd, PACKET, tier="auto").retval == retval

    def show(*words: str) -> str:
        done = subprocess.run([sys.executable, "-c", CLI, *words, "prog", "show", "id",
                               str(info["id"])], env=daemon.env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "\ttier native\n" in show()
    assert json.loads(show("-j"))["tier"] == "native"


def test_test_runs_tier_up_unless_they_ask_for_a_tier(client) -> None:  # type: ignore[no-untyped-def]
    """The daemon's default tier is "auto": compiled at once, native code once ready."""
    fd = client.prog_load(ProgType.SCHED_CLS, random_program(12), name="by_default")
    retval = client.prog_test_run(fd, PACKET).retval
    deadline = time.monotonic() + 30
    while client.obj_get_info_by_fd(fd)["tier"] != "native":
        assert time.monotonic() < deadline
        client.prog_test_run(fd, PACKET)
        time.sleep(0.02)
    assert client.prog_test_run(fd, PACKET).retval == retval
