"""A Go program on cilium/ebpf (Debian's golang-go and golang-github-cilium-ebpf-dev, built
offline here), unmodified, under `bpffs exec`: raw syscalls from any goroutine's thread, no
libc, so only the seccomp route can serve it. Pins by PinPath, Put / Lookup / Iterate / Run;
first creating the pin, then reusing it; output as on the kernel."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from seccomp_helpers import Run
from seccomp_programs import PINNED_PROG, build_bpf_object

pytestmark = pytest.mark.fuse

GOPATH = "/usr/share/gocode"  # where Debian's golang-*-dev packages put their sources

MAIN = """
package main

import (
	"fmt"
	"os"

	"github.com/cilium/ebpf"
)

func main() {
	spec, err := ebpf.LoadCollectionSpec(os.Args[1])
	if err != nil {
		panic(err)
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{
		Maps: ebpf.MapOptions{PinPath: os.Args[2]},
	})
	if err != nil {
		panic(err)
	}
	defer coll.Close()
	m := coll.Maps["counts"]
	if err := m.Put(uint32(3), uint64(42)); err != nil {
		panic(err)
	}
	var got uint64
	if err := m.Lookup(uint32(3), &got); err != nil {
		panic(err)
	}
	var k uint32
	var v uint64
	n := 0
	it := m.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	ret, err := coll.Programs["count_pkt"].Run(&ebpf.RunOptions{Data: make([]byte, 64)})
	fmt.Println("lookup", got, "entries", n, "run", ret, err, it.Err())
}
"""


@pytest.fixture
def goprog(tmp_path: Path) -> Path:
    if shutil.which("go") is None:
        pytest.skip("Go is not installed (Debian: apt-get install golang-go)")
    if not Path(GOPATH, "src/github.com/cilium/ebpf").is_dir():
        pytest.skip("cilium/ebpf sources are not installed (Debian: apt-get install"
                    " golang-github-cilium-ebpf-dev)")
    (tmp_path / "main.go").write_text(MAIN)
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": GOPATH, "GOFLAGS": "",
           "GOCACHE": os.environ.get("GOCACHE", str(tmp_path / "gocache"))}
    done = subprocess.run(["go", "build", "-o", "goprog", "main.go"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    if done.returncode:
        pytest.skip(f"cannot build the cilium/ebpf program: {done.stderr}")
    return tmp_path / "goprog"


def test_cilium_ebpf_program_pins_and_reuses(goprog: Path, under_exec: Run, plain: Run,
                                             bpf_dir: Path, kernel_bpffs: Path,
                                             tmp_path: Path) -> None:
    obj = build_bpf_object(PINNED_PROG, tmp_path)  # pinning by name: cilium's PinByName
    outputs = {}
    for run, root in ((under_exec, bpf_dir), (plain, kernel_bpffs)):
        outputs[root] = []
        for _ in ("creates the pin", "reuses it"):
            done = run(str(goprog), str(obj), str(root))
            assert done.returncode == 0, f"{root}: {done.stdout}{done.stderr}"
            outputs[root].append(done.stdout)
    assert outputs[bpf_dir] == outputs[kernel_bpffs]
    assert outputs[bpf_dir][0] == "lookup 42 entries 1 run 0 <nil> <nil>\n"
    assert (bpf_dir / "counts").exists()
