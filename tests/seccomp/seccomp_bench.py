"""Side by side, in one run: BPF_MAP_LOOKUP_ELEM through the kernel's bpf(2), through our
client library, and intercepted under `bpffs exec` (a raw bpf() answered by bpffsd); and
syscalls the filter does not send (getpid, an O_CLOEXEC open) with and without the filter.

    python3 tests/seccomp/seccomp_bench.py [N]        (root: mounts a kernel bpffs; FUSE)

Not a test: numbers, for the issue's "Measured" section. The machine's other load shows in
them; run it a few times.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from helpers import DaemonProcess  # noqa: E402

from bpffs.vm.uapi import MapType  # noqa: E402

TARGET = textwrap.dedent("""
    import ctypes, os, struct, sys, time
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.syscall.argtypes = [ctypes.c_long] * 4
    def p50(f, n):
        ts = []
        for _ in range(n):
            t = time.perf_counter_ns(); f(); ts.append(time.perf_counter_ns() - t)
        return sorted(ts)[n // 2] / 1000
    pin = ctypes.create_string_buffer(sys.argv[1].encode() + b"\\0")
    get = ctypes.create_string_buffer(struct.pack("<QII", ctypes.addressof(pin), 0, 0))
    fd = libc.syscall(321, 7, ctypes.addressof(get), 16)
    key, val = ctypes.create_string_buffer(b"\\1\\0\\0\\0"), ctypes.create_string_buffer(8)
    attr = ctypes.create_string_buffer(struct.pack(
        "<I4xQQQ", fd, ctypes.addressof(key), ctypes.addressof(val), 0))
    n = int(sys.argv[2])
    lookup = p50(lambda: libc.syscall(321, 1, ctypes.addressof(attr), 32), n)
    getpid = p50(os.getpid, 10 * n)
    opened = p50(lambda: os.close(os.open("/etc/hostname", os.O_RDONLY)), n)
    print(f"{lookup:.1f} {getpid:.2f} {opened:.2f}")
""")

CLIENT = textwrap.dedent("""
    import sys, time
    from bpffs.client import Client
    c = Client(sys.argv[1]); fd = c.obj_get(sys.argv[2]); n = int(sys.argv[3]); ts = []
    for _ in range(n):
        t = time.perf_counter_ns(); c.map_lookup_elem(fd, b"\\1\\0\\0\\0")
        ts.append(time.perf_counter_ns() - t)
    print(f"{sorted(ts)[n // 2] / 1000:.1f}")
""")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    root = Path(tempfile.mkdtemp(prefix="bpffsd-bench-"))
    kernel = root / "kbpf"
    kernel.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(kernel)], check=True)
    daemon = DaemonProcess(root / "d", mount=True).start()
    try:
        assert daemon.mount is not None
        with daemon.client() as c:
            fd = c.map_create(MapType.HASH, 4, 8, 16, name="bench")
            c.map_update_elem(fd, b"\1\0\0\0", b"\2" * 8)
            c.obj_pin(fd, str(daemon.mount / "m"))
        subprocess.run(["bpftool", "map", "create", str(kernel / "m"), "type", "hash", "key",
                        "4", "value", "8", "entries", "16", "name", "bench"], check=True)
        subprocess.run(["bpftool", "map", "update", "pinned", str(kernel / "m"), "key", "1",
                        "0", "0", "0", "value", *["2"] * 8], check=True)
        py = sys.executable

        def out(*argv: str) -> list[str]:
            return subprocess.run(argv, capture_output=True, text=True, check=True,
                                  cwd=HERE.parents[1]).stdout.split()

        plain = out(py, "-c", TARGET, str(kernel / "m"), str(n))
        client = out(py, "-c", CLIENT, str(daemon.socket), str(daemon.mount / "m"), str(n))
        ours = out(py, "-m", "bpffs.client.cli.exec", "--socket", str(daemon.socket), "--",
                   py, "-c", TARGET, str(daemon.mount / "m"), str(n))
        print(f"p50 us, n={n}: lookup kernel {plain[0]}, client library {client[0]},"
              f" bpffs exec {ours[0]} ({float(ours[0]) / float(client[0]):.1f}x client)")
        print(f"  not sent to the supervisor: getpid {plain[1]} -> {ours[1]},"
              f" open(O_CLOEXEC)+close {plain[2]} -> {ours[2]}")
    finally:
        daemon.stop()
        daemon.cleanup_mount()
        subprocess.run(["umount", "-l", str(kernel)], check=False)


if __name__ == "__main__":
    main()
