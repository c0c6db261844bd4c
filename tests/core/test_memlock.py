"""Memory accounting and privileges, from real callers: each case runs in a child process with
its own RLIMIT_MEMLOCK and, where it says so, as nobody (uid 65534).

4.4 charges every map and program to its creator's RLIMIT_MEMLOCK (EPERM when over); kernels
since 5.11 charge the memory cgroup instead, and since 5.16 most distributions (this machine's
kernel included: kernel.unprivileged_bpf_disabled=2) refuse bpf(2) to unprivileged callers
altogether. bpffsd follows 4.4 on both; the kernel tests below show today's kernel's answer.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import NOBODY, DaemonProcess, in_child, raises_errno

from bpffs.client import Client
from bpffs.client.calls import Call, Request
from bpffs.vm import asm, kernel
from bpffs.vm.isa import R0
from bpffs.vm.uapi import PAGE_SIZE, MapType, ProgType

RETURN_0 = asm.program(asm.mov64_imm(R0, 0), asm.exit())
# An array of 8 values of one page: 8 pages plus its header's page.
ARRAY_PAGES = 9


@pytest.fixture(scope="module")
def public_daemon() -> Iterator[DaemonProcess]:
    """A daemon (no mount) whose socket every user can reach: pytest's tmp dirs are 0700."""
    root = Path(tempfile.mkdtemp(prefix="bpffs-core-"))
    root.chmod(0o755)
    d = DaemonProcess(root / "d", mount=False).start()
    (root / "d").chmod(0o755)
    yield d
    assert d.stop() == 0, d.log_text()
    assert "Traceback" not in d.log_text(), d.log_text()
    shutil.rmtree(root, ignore_errors=True)


def as_caller(daemon: DaemonProcess, fn: Callable[[Client], Any],
              user: tuple[int, int] | None = None, memlock_pages: int | None = None) -> Any:
    """fn(client) in a new process with RLIMIT_MEMLOCK of memlock_pages (as user)."""

    def call() -> Any:
        if memlock_pages is not None:
            limit = memlock_pages * PAGE_SIZE
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))
        with Client(str(daemon.socket)) as client:
            return fn(client)

    return in_child(call, user=user)


def big_array(client: Client) -> int:
    return client.map_create(MapType.ARRAY, 4, PAGE_SIZE, 8)


def test_memlock_is_charged_per_user_and_eperm_when_over(public_daemon) -> None:
    def two_arrays(client: Client) -> str:
        first = big_array(client)  # 9 of 16 pages
        try:
            big_array(client)
        except OSError as e:
            assert e.errno == errno.EPERM
            message = str(e)
        else:
            raise AssertionError("the second array fit in 16 pages")
        os.close(first)  # frees its pages at once, as the kernel's close does
        os.close(big_array(client))
        return message

    message = as_caller(public_daemon, two_arrays, memlock_pages=16)
    assert "RLIMIT_MEMLOCK exceeded" in message and "limit is 16 pages" in message
    assert "ulimit -l" in message


def test_the_limit_is_read_at_each_request(public_daemon) -> None:
    """Another process lowers the caller's limit with prlimit(1) while its connection is open:
    the next map is refused, as the kernel reads current->signal->rlim at each charge."""
    def lowered_mid_connection(client: Client) -> str:
        first = big_array(client)  # 9 pages under the limit of 32
        limit = str(16 * PAGE_SIZE)
        subprocess.run(["prlimit", "--pid", str(os.getpid()), f"--memlock={limit}:{limit}"],
                       check=True)
        try:
            big_array(client)
        except OSError as e:
            return errno.errorcode[e.errno]
        finally:
            os.close(first)
        return "created"

    assert as_caller(public_daemon, lowered_mid_connection, memlock_pages=32) == "EPERM"


def test_memlock_applies_to_programs_too(public_daemon) -> None:
    def load(client: Client) -> None:
        client.prog_load(ProgType.SOCKET_FILTER, RETURN_0)

    with raises_errno(errno.EPERM):
        as_caller(public_daemon, load, memlock_pages=0)


def test_an_unprivileged_users_charge_is_its_own(public_daemon) -> None:
    """Root's objects do not count against nobody's limit, and nobody's limit is read from
    nobody's process."""
    with public_daemon.client() as root:
        held = [big_array(root) for _ in range(2)]
    try:
        as_caller(public_daemon, lambda c: os.close(big_array(c)), user=NOBODY,
                  memlock_pages=ARRAY_PAGES)
        with raises_errno(errno.EPERM):
            as_caller(public_daemon, lambda c: os.close(big_array(c)), user=NOBODY,
                      memlock_pages=ARRAY_PAGES - 1)
    finally:
        for fd in held:
            os.close(fd)


@pytest.mark.kernel
def test_the_running_kernel_no_longer_charges_memlock() -> None:
    """Documented difference: 6.x accepts what 4.4 (and bpffsd) refuse at RLIMIT_MEMLOCK 0."""

    def create() -> None:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
        os.close(kernel.map_create(MapType.ARRAY, 4, PAGE_SIZE, 8))

    in_child(create)


def test_the_daemon_memory_limit_is_enomem(start_daemon) -> None:
    d = start_daemon(args=("--memory-limit", str(16 * PAGE_SIZE)))
    with d.client() as client:
        first = big_array(client)
        with pytest.raises(OSError) as info:
            big_array(client)
        assert info.value.errno == errno.ENOMEM
        assert "--memory-limit" in str(info.value) and "cap 16" in str(info.value)
        os.close(first)
        os.close(big_array(client))


# -- what an unprivileged caller may do -----------------------------------------------------
def test_nobody_may_create_and_use_maps(public_daemon) -> None:
    def use(client: Client) -> bytes:
        fd = client.map_create(MapType.HASH, 4, 4, 2)
        client.map_update_elem(fd, b"key1", b"val1")
        return client.map_lookup_elem(fd, b"key1")

    assert as_caller(public_daemon, use, user=NOBODY) == b"val1"


def test_nobody_may_load_socket_filters_only(public_daemon) -> None:
    def load(prog_type: int) -> Callable[[Client], str]:
        return lambda client: client.obj_get_info_by_fd(
            client.prog_load(prog_type, RETURN_0))["type"]

    assert as_caller(public_daemon, load(ProgType.SOCKET_FILTER), user=NOBODY) == "socket_filter"
    for prog_type in (ProgType.KPROBE, ProgType.SCHED_CLS, ProgType.SCHED_ACT):
        with pytest.raises(OSError) as info:
            as_caller(public_daemon, load(prog_type), user=NOBODY)
        assert info.value.errno == errno.EPERM and "CAP_SYS_ADMIN" in str(info.value)


@pytest.mark.parametrize("operation", ["get_next_id", "get_fd_by_id", "prog_test_run"])
def test_listing_and_test_runs_need_root(public_daemon, operation: str) -> None:
    with public_daemon.client() as root:
        fd = root.map_create(MapType.HASH, 4, 4, 1)
        mid = root.obj_get_info_by_fd(fd)["id"]

        def call(c: Client) -> None:
            if operation == "get_next_id":
                assert c.get_next_id("map", mid - 1) == mid
            elif operation == "get_fd_by_id":
                os.close(c.get_fd_by_id("map", mid))
            else:
                c.prog_test_run(c.prog_load(ProgType.SOCKET_FILTER, RETURN_0), bytes(64))

        try:
            with raises_errno(errno.EPERM):
                as_caller(public_daemon, call, user=NOBODY)
            as_caller(public_daemon, call)  # root may
        finally:
            os.close(fd)


def test_nobody_cannot_use_roots_fd_it_did_not_get(public_daemon) -> None:
    """A handle is bound per connection: naming root's object by its inode without sending
    the fd is EBADF."""
    with public_daemon.client() as root:
        fd = root.map_create(MapType.HASH, 4, 4, 1)
        handle = os.fstat(fd).st_ino

        def guess(client: Client) -> Any:
            return client.run(raw_call("map_lookup", handle, b"key1"))

        try:
            with raises_errno(errno.EBADF):
                as_caller(public_daemon, guess, user=NOBODY)
        finally:
            os.close(fd)


def raw_call(op: str, *args: Any) -> Call:
    """A one-request call for Client.run: a raw operation the library would not send."""
    return (yield Request(op, args))[0]


@pytest.mark.kernel
def test_the_running_kernel_refuses_unprivileged_bpf() -> None:
    with open("/proc/sys/kernel/unprivileged_bpf_disabled") as f:
        disabled = int(f.read())
    if not disabled:
        pytest.skip("this kernel allows unprivileged bpf(2): nothing differs")
    with raises_errno(errno.EPERM):
        in_child(lambda: kernel.map_create(MapType.HASH, 4, 4, 1), user=NOBODY)


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def test_a_refused_map_never_takes_memory(public_daemon) -> None:
    """The charge is checked before the storage is allocated: a 3 GiB array refused for
    RLIMIT_MEMLOCK must not have been allocated (and zero-filled) first."""
    before = peak_rss_kib(public_daemon.proc.pid)

    def huge(client: Client) -> None:
        client.map_create(MapType.ARRAY, 4, 8, 3 << 27)

    with raises_errno(errno.EPERM):
        as_caller(public_daemon, huge, memlock_pages=1024)
    assert peak_rss_kib(public_daemon.proc.pid) - before < 64 * 1024
