"""A C program built here against Debian's libbpf-dev, unmodified, under `bpffs exec`: it opens
an object whose map is pinned by name (LIBBPF_PIN_BY_NAME), loads it, updates and looks up the
map and test-runs the program, first creating the pin, then reusing it; as on the kernel."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import DaemonProcess
from seccomp_helpers import Run
from seccomp_programs import PINNED_PROG, build_bpf_object, build_libbpf_program

pytestmark = pytest.mark.fuse

LOADER = r"""
#include <stdio.h>
#include <bpf/libbpf.h>
#include <bpf/bpf.h>
int main(int argc, char **argv)
{
	struct bpf_object_open_opts oo = {.sz = sizeof(oo), .pin_root_path = argv[2]};
	struct bpf_object *obj = bpf_object__open_file(argv[1], &oo);
	if (!obj) { perror("open"); return 1; }
	int err = bpf_object__load(obj);
	if (err) { fprintf(stderr, "load: %d\n", err); return 2; }
	int mfd = bpf_object__find_map_fd_by_name(obj, "counts");
	__u32 k = 3; __u64 v = 42, got = 0, out = 0;
	if (bpf_map_update_elem(mfd, &k, &v, BPF_ANY)) { perror("update"); return 3; }
	if (bpf_map_lookup_elem(mfd, &k, &got)) { perror("lookup"); return 4; }
	struct bpf_program *p = bpf_object__find_program_by_name(obj, "count_pkt");
	char pkt[64] = {0};
	LIBBPF_OPTS(bpf_test_run_opts, t, .data_in = pkt, .data_size_in = sizeof(pkt), .repeat = 1);
	err = bpf_prog_test_run_opts(bpf_program__fd(p), &t);
	k = 2; out = 0;
	if (bpf_map_lookup_elem(mfd, &k, &out)) perror("lookup after run");
	printf("lookup=%llu test_run err=%d retval=%u runs_counted=%llu\n", (unsigned long long)got,
		err, t.retval, (unsigned long long)out);
	bpf_object__close(obj);
	return 0;
}
"""


@pytest.fixture
def loader(tmp_path: Path) -> tuple[Path, Path]:
    return build_libbpf_program(LOADER, tmp_path, "loader"), build_bpf_object(PINNED_PROG,
                                                                              tmp_path)


def _libbpf_noise(text: str) -> str:
    """libbpf's warning when its memcg probe (a cgroup_skb program, which bpffsd does not
    implement) fails and setrlimit(RLIMIT_MEMLOCK) is refused: harmless, not the kernel's."""
    return "".join(line for line in text.splitlines(keepends=True)
                   if "Failed to bump RLIMIT_MEMLOCK" not in line)


def test_libbpf_program_pins_by_name_and_reuses_the_pin(
        loader: tuple[Path, Path], under_exec: Run, plain: Run, bpf_dir: Path,
        kernel_bpffs: Path, daemon: DaemonProcess) -> None:
    exe, obj = loader
    for run, root in ((under_exec, bpf_dir), (plain, kernel_bpffs)):
        for attempt in ("creates the pin", "reuses it"):
            done = run(str(exe), str(obj), str(root))
            assert done.returncode == 0, f"{root} {attempt}: {done.stderr}"
            assert _libbpf_noise(done.stderr) == "", f"{root} {attempt}"
            runs = 1 if attempt == "creates the pin" else 2  # the map outlives the first run
            assert done.stdout == (f"lookup=42 test_run err=0 retval=0 runs_counted={runs}\n")
    with daemon.client() as c:
        fd = c.obj_get(str(bpf_dir / "counts"))
        assert c.map_lookup_elem(fd, b"\3\0\0\0") == (42).to_bytes(8, "little")
        assert c.obj_get_info_by_fd(fd)["name"] == "counts"


BATCH = r"""
#include <stdio.h>
#include <errno.h>
#include <bpf/bpf.h>
static int walk(int fd, int chunk, int del)
{
	__u64 in[1] = {0}, out[1] = {0};
	__u32 keys[64], vals[64], total = 0, sum = 0; int first = 1, err;
	do {
		__u32 count = chunk;
		LIBBPF_OPTS(bpf_map_batch_opts, o);
		void *from = first ? NULL : in;
		if (del)
			err = bpf_map_lookup_and_delete_batch(fd, from, out, keys, vals, &count, &o);
		else
			err = bpf_map_lookup_batch(fd, from, out, keys, vals, &count, &o);
		if (err && errno != ENOENT) { printf("lookup batch err %d\n", -errno); return -1; }
		for (__u32 i = 0; i < count; i++) sum += keys[i] * 1000 + vals[i];
		total += count; first = 0; in[0] = out[0];
	} while (!err);
	printf("walk chunk=%d del=%d: total %u sum %u\n", chunk, del, total, sum);
	return 0;
}
int main(void)
{
	for (int type = BPF_MAP_TYPE_HASH; type <= BPF_MAP_TYPE_ARRAY; type++) {
		int fd = bpf_map_create(type, "b", 4, 4, 10, NULL);
		if (fd < 0) { printf("create %d\n", fd); return 1; }
		__u32 keys[10], vals[10], count = 10;
		for (int i = 0; i < 10; i++) keys[i] = i, vals[i] = i * 7;
		int err = bpf_map_update_batch(fd, keys, vals, &count, NULL);
		printf("type %d update_batch %d count %u\n", type, err ? -errno : 0, count);
		__u32 bad[2] = {3, 99}; count = 2;
		err = bpf_map_delete_batch(fd, bad, &count, NULL);
		printf("delete_batch %d count %u\n", err ? -errno : 0, count);
		walk(fd, 3, 0); walk(fd, 64, 0);
		if (type == BPF_MAP_TYPE_HASH) walk(fd, 4, 1);
		count = 3;
		err = bpf_map_lookup_batch(fd, NULL, (void *)8, (void *)16, vals, &count, NULL);
		printf("lookup into unmapped %d\n", err ? -errno : 0);
	}
	return 0;
}
"""


def test_batch_calls_match_the_kernel(under_exec: Run, plain: Run, tmp_path: Path) -> None:
    """libbpf's batch calls on a hash and an array map: counts, the walk's cursor (a u32 for
    hash maps whatever the key size), ENOENT at the end, ENOTSUPP where an array has no such
    batch command, EFAULT for unmapped buffers."""
    exe = build_libbpf_program(BATCH, tmp_path, "batch")
    for _ in range(5):  # the kernel's ENOSPC when a hash bucket holds more than count (its
        kernels = plain(str(exe))  # seed is random per map: rare); bpffsd has no buckets
        if "err -28" not in kernels.stdout:
            break
    if kernels.returncode or "create" in kernels.stdout:
        pytest.skip(f"the kernel's bpf() is not usable here: {kernels.stdout}{kernels.stderr}")
    ours = under_exec(str(exe))
    assert (ours.returncode, ours.stdout) == (0, kernels.stdout), ours.stderr
