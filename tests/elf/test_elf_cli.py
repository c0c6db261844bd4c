"""`bpffs prog load` / `loadall` in bpftool's grammar, run as a user would (a subprocess per
command), against the module's daemon."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DaemonProcess

from bpffs.client import Client

pytestmark = pytest.mark.fuse

CLI = "import sys; from bpffs.client.cli import main; sys.exit(main(sys.argv[1:]))"

def bpffs(daemon: DaemonProcess, mount: Path, *words: str) -> subprocess.CompletedProcess:
    env = {**daemon.env, "TC_BPF_MNT": str(mount)}
    return subprocess.run([sys.executable, "-c", CLI, *words], env=env,
                          capture_output=True, text=True, timeout=60)


def test_load_pins_the_program_and_the_tc_maps(daemon: DaemonProcess, client: Client,
                                               bpf_dir: Path, examples: dict[str, Path]) -> None:
    done = bpffs(daemon, bpf_dir, "-j", "prog", "load", str(examples["tc_classifier"]),
                 str(bpf_dir / "ingress"), "type", "classifier", "section", "ingress")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert set(doc["programs"]) == {"cls_ingress"}
    assert set(doc["maps"]) == {"proto_stats"}
    fd = client.obj_get(bpf_dir / "ingress")
    info = client.obj_get_info_by_fd(fd)
    os.close(fd)
    assert (info["type"], info["name"]) == ("sched_cls", "cls_ingress")
    assert info["map_ids"] == [doc["maps"]["proto_stats"]]
    assert (bpf_dir / "tc/globals/proto_stats").exists()
    shown = bpffs(daemon, bpf_dir, "-j", "map", "show", "pinned",
                  str(bpf_dir / "tc/globals/proto_stats"))
    assert json.loads(shown.stdout)["id"] == doc["maps"]["proto_stats"]
    dump = bpffs(daemon, bpf_dir, "prog", "dump", "xlated", "pinned", str(bpf_dir / "ingress"))
    assert dump.returncode == 0, dump.stderr
    assert f"map[id:{doc['maps']['proto_stats']}]" in dump.stdout  # the relocated lddw


def test_load_without_section_takes_the_first_program(daemon: DaemonProcess, bpf_dir: Path,
                                                       examples: dict[str, Path]) -> None:
    done = bpffs(daemon, bpf_dir, "-j", "prog", "load", str(examples["tail_call"]),
                 str(bpf_dir / "entry"))
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)["programs"]) == {"entry", "stage0", "stage1"}
    assert {p.name for p in bpf_dir.iterdir()} == {"entry", "tc", "xdp", "ip"}


def test_loadall_with_pinmaps(daemon: DaemonProcess, bpf_dir: Path,
                              examples: dict[str, Path]) -> None:
    done = bpffs(daemon, bpf_dir, "prog", "loadall", str(examples["tunnel"]),
                 str(bpf_dir / "progs"), "pinmaps", str(bpf_dir / "maps"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # bpftool prints nothing on success
    assert sorted(p.name for p in (bpf_dir / "progs").iterdir()) == ["tunnel_get", "tunnel_set"]
    assert [p.name for p in (bpf_dir / "maps").iterdir()] == ["tunnel_ids"]


def test_untyped_section_needs_type(daemon: DaemonProcess, bpf_dir: Path,
                                    examples: dict[str, Path]) -> None:
    done = bpffs(daemon, bpf_dir, "prog", "load", str(examples["tc_classifier"]),
                 str(bpf_dir / "p"), "section", "egress")
    assert done.returncode == 256 - errno.EINVAL
    assert "give `type`" in done.stderr
    assert list(bpf_dir.iterdir()) == []


def test_failed_load_prints_the_verifier_log(daemon: DaemonProcess, bpf_dir: Path,
                                             build) -> None:
    obj = build("""
struct bpf_map_def SEC("maps") m = { BPF_MAP_TYPE_ARRAY, 4, 8, 1, 0 };
SEC("socket") int f(struct __sk_buff *skb) {
    __u32 k = 0;
    return *(__u64 *)bpf_map_lookup_elem(&m, &k);
}
char _license[] SEC("license") = "GPL";
""")
    done = bpffs(daemon, bpf_dir, "prog", "load", str(obj), str(bpf_dir / "p"),
                 "pinmaps", str(bpf_dir / "maps"))
    assert done.returncode == 256 - errno.EACCES, done.stderr
    assert "invalid mem access" in done.stderr
    assert "Error: " in done.stderr and "loading program 'f'" in done.stderr
    assert list(bpf_dir.iterdir()) == []


def test_bad_object_file(daemon: DaemonProcess, bpf_dir: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.o"
    junk.write_bytes(b"\x7fELF" + bytes(20))
    done = bpffs(daemon, bpf_dir, "prog", "load", str(junk), str(bpf_dir / "p"))
    assert done.returncode == 256 - errno.EINVAL
    assert "junk.o" in done.stderr
    missing = bpffs(daemon, bpf_dir, "prog", "load", str(tmp_path / "nope.o"),
                    str(bpf_dir / "p"))
    assert missing.returncode == 256 - errno.ENOENT


def test_program_pin_failure_takes_back_the_map_pins(daemon: DaemonProcess, bpf_dir: Path,
                                                     examples: dict[str, Path]) -> None:
    (bpf_dir / "taken").mkdir()
    done = bpffs(daemon, bpf_dir, "prog", "load", str(examples["tc_classifier"]),
                 str(bpf_dir / "taken"), "type", "classifier", "section", "ingress")
    assert done.returncode == 256 - errno.EEXIST, done.stderr
    assert [p.name for p in bpf_dir.iterdir()] == ["taken"]


def test_loadall_of_tc_sections_takes_type(daemon: DaemonProcess, bpf_dir: Path,
                                           examples: dict[str, Path]) -> None:
    """The README's `loadall cls.o DIR type classifier`: `ingress`/`egress` name no program
    type (libbpf cannot guess them either), so without `type` it fails, leaving nothing; with
    it, every program is pinned, with trailing options anywhere (`--json` last)."""
    obj = str(examples["tc_classifier"])
    untyped = bpffs(daemon, bpf_dir, "prog", "loadall", obj, str(bpf_dir / "cls"))
    assert untyped.returncode == 256 - errno.EINVAL and "give `type`" in untyped.stderr
    assert list(bpf_dir.iterdir()) == []
    typed = bpffs(daemon, bpf_dir, "prog", "loadall", obj, str(bpf_dir / "cls"), "type",
                  "classifier", "--json")
    assert typed.returncode == 0, typed.stderr
    assert set(json.loads(typed.stdout)["programs"]) == {"cls_main", "cls_ingress",
                                                         "cls_egress"}
    assert sorted(p.name for p in (bpf_dir / "cls").iterdir()) == ["cls_egress",
                                                                   "cls_ingress", "cls_main"]
