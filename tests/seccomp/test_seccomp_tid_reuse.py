"""A TID reused by another process while the thread that held it had a cached /proc/TID/mem
fd: the new thread's pointers must be read from its own memory, never from the old process's
(which lives on, so the old fd still maps it)."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import DaemonProcess
from seccomp_helpers import RAW_BPF, Run

from bpffs.vm.uapi import MapType

pytestmark = pytest.mark.fuse

# Process A: thread X calls readlink (the supervisor reads the path through a /proc/X/mem fd
# it caches, and opens no pidfd, whose ESRCH once X is gone would drop the entry) and exits;
# A lives on with b"secret!!" at `value`. A then forks with ns_last_pid set to X-1 until a
# child B gets pid X; B holds b"public!!" at the same address and updates the map.
REUSE = RAW_BPF + textwrap.dedent("""
    import time
    fd = obj_get(sys.argv[1])
    assert fd >= 0, ctypes.get_errno()
    key, value = ctypes.create_string_buffer(b"\\1\\0\\0\\0"), ctypes.create_string_buffer(8)
    ctypes.memmove(value, b"secret!!", 8)
    attr = ctypes.create_string_buffer(struct.pack(
        "<I4xQQQ", fd, ctypes.addressof(key), ctypes.addressof(value), 0))
    tids = []
    def opens():
        tids.append(threading.get_native_id())
        try:
            os.readlink("/")  # its path read through X's mem fd, no pidfd needed
        except OSError:
            pass
    x = threading.Thread(target=opens)
    x.start()
    x.join()
    tid = tids[0]
    for _ in range(500):
        time.sleep(0.01)  # the exited thread's TID is freed once it is reaped
        last = os.open("/proc/sys/kernel/ns_last_pid", os.O_WRONLY)
        os.write(last, str(tid - 1).encode())
        os.close(last)
        pid = os.fork()
        if pid == 0:
            if os.getpid() != tid:
                os._exit(3)
            ctypes.memmove(value, b"public!!", 8)
            updated = libc.syscall(NR_BPF, MAP_UPDATE_ELEM, ctypes.addressof(attr), 32)
            os._exit(0 if updated == 0 else 4)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if status != 3:
            print("reused", status)
            break
    else:
        print("not reused")
""")


def test_a_reused_tid_is_served_from_its_own_memory(under_exec: Run, bpf_dir: Path,
                                                     daemon: DaemonProcess) -> None:
    if os.geteuid() != 0 or not os.access("/proc/sys/kernel/ns_last_pid", os.W_OK):
        pytest.skip("forcing a TID's reuse needs root (ns_last_pid)")
    with daemon.client() as c:
        fd = c.map_create(MapType.HASH, 4, 8, 8, name="m")
        c.obj_pin(fd, str(bpf_dir / "m"))
        done = under_exec(sys.executable, "-c", REUSE, str(bpf_dir / "m"))
        if done.stdout == "not reused\n":
            pytest.skip("no TID was reused (another process took it each time)")
        assert done.stdout == "reused 0\n", done.stderr
        assert c.map_lookup_elem(fd, b"\1\0\0\0") == b"public!!"
        os.close(fd)
