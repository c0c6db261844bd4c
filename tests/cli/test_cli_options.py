"""bpftool's command line as a whole: options anywhere (getopt permutes), `help` and `--help`
at every level, and `status` wording. bpftool on a kernel bpffs is the oracle where it has the
same command."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_helpers import bpftool, needs_bpftool
from helpers import DaemonProcess

Run = Callable[..., subprocess.CompletedProcess]
CREATE = ("type", "hash", "key", "4", "value", "8", "entries", "16", "name", "flows")
UPDATE = ("key", "1", "0", "0", "0", "value", "2", "0", "0", "0", "0", "0", "0", "0")


def make_flows(tool: Run, pin: str) -> None:
    assert tool("map", "create", pin, *CREATE).returncode == 0
    assert tool("map", "update", "pinned", pin, *UPDATE).returncode == 0


# each: where the options go among the words of `map dump pinned PIN`
PLACES = [
    ("-j", "map", "dump", "pinned", "@"),
    ("map", "dump", "pinned", "@", "--json"),
    ("map", "-j", "dump", "pinned", "@"),
    ("map", "dump", "--json", "pinned", "@"),
    ("map", "dump", "pinned", "@", "-p"),
    ("map", "dump", "pinned", "@", "-j", "--pretty"),
    ("map", "dump", "pinned", "@", "-jp"),
]


@pytest.mark.fuse
def test_options_anywhere(bpffs: Run, bpf_dir: Path) -> None:
    pin = str(bpf_dir / "flows")
    make_flows(bpffs, pin)
    first = json.loads(bpffs("-j", "map", "dump", "pinned", pin).stdout)
    assert first == [{"key": ["0x01", "0x00", "0x00", "0x00"],
                      "value": ["0x02"] + ["0x00"] * 7}]
    for words in PLACES:
        done = bpffs(*[pin if w == "@" else w for w in words])
        assert done.returncode == 0, f"{words}: {done.stderr}"
        assert json.loads(done.stdout) == first, words
        pretty = any(w in ("-p", "--pretty", "-jp") for w in words)
        assert ("\n    " in done.stdout) == pretty, words
    show = bpffs("map", "show", "pinned", pin, "--bpffs")  # -f: the pins, trailing too
    assert f"\tpinned {pin}" in show.stdout.splitlines()


@pytest.mark.fuse
def test_double_dash_ends_the_options(bpffs: Run, bpf_dir: Path) -> None:
    pin = str(bpf_dir / "flows")
    make_flows(bpffs, pin)
    done = bpffs("map", "dump", "pinned", pin, "--", "--json")
    assert done.returncode != 0 and done.stderr.startswith("Error: ")
    assert "--json" in done.stderr


def test_socket_option_anywhere(bpffs: Run, daemon: DaemonProcess, tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere.sock")
    for words in (("--socket", missing, "status"), ("status", "--socket", missing),
                  ("status", f"--socket={missing}")):
        done = bpffs(*words)
        assert done.returncode != 0 and missing in done.stderr, words
    assert bpffs("status", "--socket", str(daemon.socket)).returncode == 0


def test_unknown_option_before_the_object_is_an_error(bpffs: Run) -> None:
    done = bpffs("--frobnicate", "map", "show")
    assert done.returncode == 234
    assert done.stderr == "Error: EINVAL: unknown option --frobnicate\n"


@pytest.mark.fuse
@needs_bpftool
@pytest.mark.kernel
def test_trailing_json_as_bpftool(bpffs: Run, bpf_dir: Path, kernel_bpffs: Path) -> None:
    """The README's `map dump pinned X --json`: bpftool and bpffs print the same document."""
    ours, theirs = str(bpf_dir / "flows"), str(kernel_bpffs / "flows")
    make_flows(bpffs, ours)
    make_flows(bpftool, theirs)
    for words in PLACES:
        t = bpftool(*[theirs if w == "@" else w for w in words])
        o = bpffs(*[ours if w == "@" else w for w in words])
        assert o.returncode == t.returncode == 0, words
        if any(w in ("-p", "--pretty", "-jp") for w in words):  # bpftool's own indenting
            assert json.loads(o.stdout) == json.loads(t.stdout), words
        else:
            assert o.stdout == t.stdout, words


HELP_WORDS = [
    # (words, the usage shown)
    ((), "bpffs"),
    (("help",), "bpffs"),
    (("--help",), "bpffs"),
    (("-h",), "bpffs"),
    (("map", "help"), "map"),
    (("map", "h"), "map"),
    (("map", "--help"), "map"),
    (("map", "create", "help"), "map"),
    (("map", "create", "--help"), "map"),
    (("map", "dump", "pinned", "x", "--help"), "map"),
    (("map", "event_pipe", "help"), "map"),
    (("prog", "help"), "prog"),
    (("prog", "load", "help"), "prog"),
    (("prog", "load", "x.o", "--help"), "prog"),
    (("prog", "tracelog", "-h"), "prog"),
    (("pcap", "help"), "pcap"),
    (("pcap", "run", "--help"), "pcap"),
    (("pcap", "run", "help"), "pcap"),
    (("mount", "help"), "mount"),
    (("mount", "--help"), "mount"),
    (("mount", "somewhere", "--help"), "mount"),
    (("status", "help"), "status"),
    (("status", "--help"), "status"),
]


def test_help_at_every_level(bpffs: Run, tmp_path: Path) -> None:
    """`help` and `--help` print usage and exit 0; `mount help` never mounts a directory
    named help (it used to try: ENOENT for $PWD/help)."""
    for words, which in HELP_WORDS:
        done = bpffs(*words, cwd=tmp_path)
        assert done.returncode == 0, f"{words}: {done.stderr}"
        assert done.stderr == "", words
        first = done.stdout.splitlines()[0]
        if which == "bpffs":
            assert first.startswith("`bpffs`"), words
        else:
            assert first.startswith(f"Usage: bpffs {which}"), (words, first)
    assert list(tmp_path.iterdir()) == []
    assert bpffs("-j", "map", "help").stdout == "null\n"


@needs_bpftool
def test_help_as_bpftool() -> None:
    """The oracle for the cases above that bpftool shares: usage and status 0."""
    for words in (("map", "help"), ("map", "--help"), ("--help",), ("map", "create",
                                                                      "--help")):
        done = bpftool(*words)  # bpftool writes usage on stderr; ours on stdout, for `| less`
        assert done.returncode == 0 and done.stderr.startswith("Usage: bpftool"), words
    assert bpftool("-j", "map", "help").stdout == "null\n"


@pytest.mark.fuse
def test_status_wording(bpffs: Run, start_daemon, tmp_path: Path) -> None:
    """An instance with no mount is `not mounted`, never `mounted at not mounted`."""
    d = start_daemon()
    sock = ("--socket", str(d.socket))
    directory = tmp_path / "m"
    directory.mkdir()
    assert bpffs(*sock, "mount", str(directory), "--instance", "lonely").returncode == 0
    try:
        lines = bpffs(*sock, "status").stdout.splitlines()
        assert f"instance 'lonely': 0 pins; mounted at {directory}" in lines
    finally:
        subprocess.run(["fusermount3", "-u", str(directory)], check=True)
    for _ in range(100):
        lines = bpffs(*sock, "status").stdout.splitlines()
        if "instance 'lonely': 0 pins; not mounted" in lines:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(lines)
    assert not any("mounted at not mounted" in line for line in lines)
