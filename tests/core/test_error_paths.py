"""Every error an async handler raises reaches the client as itself (issue 12).

Since trio 0.25 a nursery raises an ExceptionGroup even around one error, and the server
turned each such BpfError into "EIO: internal error in bpffsd: ExceptionGroup ...". The async
handlers are obj_pin, obj_get, mount, trace_read and prog_test_run_batch: each error path of
theirs is taken here through the real daemon, through the client library where it can send
the request and by hand where it checks first. Only non-BpfError exceptions are the daemon's
own (logged with their traceback, answered EIO): the mapping itself is tested last.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from helpers import NOBODY, DaemonProcess, in_child

from bpffs import protocol
from bpffs.client import Client, calls
from bpffs.daemon import server
from bpffs.vm import asm
from bpffs.vm.errors import BpfError
from bpffs.vm.isa import R0
from bpffs.vm.uapi import MapType, ProgType


def expect(err: int, call: Callable[[], object], words: str = "") -> str:
    """call() fails with exactly err, a message of its own (containing `words`) and no trace
    of an internal error."""
    with pytest.raises(OSError) as info:
        call()
    message = str(info.value)
    assert info.value.errno == err, f"expected {errno.errorcode[err]}, got {message}"
    assert "internal error" not in message and "ExceptionGroup" not in message, message
    assert words in message, message
    return message


class Raw:
    """A greeted control connection driven by hand, for requests the client would refuse
    to send."""

    def __init__(self, daemon: DaemonProcess):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(10)
        self.sock.connect(str(daemon.socket))
        self.inbox = protocol.Inbox()
        self.call("hello", protocol.PROTOCOL_VERSION, "raw")

    def call(self, *msg: object, fds: tuple[int, ...] = ()) -> object:
        self.sock.sendmsg([protocol.pack(list(msg))], protocol.encode_fds(list(fds)))
        reply, fds_back = protocol.recv_message(self.sock, self.inbox)
        protocol.close_all(fds_back)
        result = protocol.unpack(reply)
        if result[0]:
            raise OSError(result[0], result[1])
        return result[1]

    def bind(self, fd: int) -> int:
        return self.call("bind", fds=(fd,))["handle"]  # type: ignore[index]


@pytest.fixture
def raw(daemon: DaemonProcess) -> Iterator[Raw]:
    r = Raw(daemon)
    yield r
    r.sock.close()


@pytest.fixture
def map_fd(client: Client) -> Iterator[int]:
    fd = client.map_create(MapType.HASH, 4, 4, 4)
    yield fd
    os.close(fd)


@pytest.fixture
def prog_fd(client: Client) -> Iterator[int]:
    fd = client.prog_load(ProgType.SOCKET_FILTER, asm.program(asm.mov64_imm(R0, 0), asm.exit()))
    yield fd
    os.close(fd)


def _o_path(path: Path | str, flags: int = 0) -> int:
    return os.open(path, os.O_PATH | flags)


# -- obj_pin ------------------------------------------------------------------------------------
@pytest.mark.fuse
def test_pin_onto_an_existing_name_is_eexist(client: Client, map_fd: int, bpf_dir: Path) -> None:
    client.obj_pin(map_fd, str(bpf_dir / "m"))
    expect(errno.EEXIST, lambda: client.obj_pin(map_fd, str(bpf_dir / "m")))


def test_pin_off_the_mount_is_eperm(client: Client, map_fd: int, tmp_path: Path) -> None:
    expect(errno.EPERM, lambda: client.obj_pin(map_fd, str(tmp_path / "m")), "not on a bpffs")


@pytest.mark.fuse
def test_pin_with_a_dotted_name_is_eperm(client: Client, map_fd: int, bpf_dir: Path) -> None:
    expect(errno.EPERM, lambda: client.obj_pin(map_fd, str(bpf_dir / "a.b")), "'.'")


@pytest.mark.fuse
def test_pin_into_a_missing_directory_is_enoent(client: Client, map_fd: int,
                                                bpf_dir: Path) -> None:
    expect(errno.ENOENT, lambda: client.obj_pin(map_fd, str(bpf_dir / "no" / "m")))


@pytest.mark.fuse
def test_pin_whose_parent_is_a_pin_is_enotdir(raw: Raw, client: Client, map_fd: int,
                                              bpf_dir: Path) -> None:
    client.obj_pin(map_fd, str(bpf_dir / "m"))
    handle, parent = raw.bind(map_fd), _o_path(bpf_dir / "m")
    try:
        expect(errno.ENOTDIR, lambda: raw.call("obj_pin", handle, b"x", 0o022, fds=(parent,)))
    finally:
        os.close(parent)


@pytest.mark.fuse
def test_pin_of_an_unbound_handle_is_ebadf(raw: Raw, bpf_dir: Path) -> None:
    parent = _o_path(bpf_dir, os.O_DIRECTORY)
    try:
        expect(errno.EBADF, lambda: raw.call("obj_pin", 12345, b"x", 0o022, fds=(parent,)))
    finally:
        os.close(parent)


def test_pin_without_its_directory_fd_is_ebadf(raw: Raw, map_fd: int) -> None:
    handle = raw.bind(map_fd)
    expect(errno.EBADF, lambda: raw.call("obj_pin", handle, b"x", 0o022), "parent directory")


# -- obj_get ------------------------------------------------------------------------------------
@pytest.mark.fuse
def test_get_of_a_directory_is_eacces(client: Client, bpf_dir: Path) -> None:
    expect(errno.EACCES, lambda: client.obj_get(str(bpf_dir)), "not a pinned object")


def test_get_off_the_mount_is_eacces(client: Client, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    expect(errno.EACCES, lambda: client.obj_get(str(tmp_path / "f")), "not on a bpffs")


@pytest.mark.fuse
def test_get_with_both_rdonly_and_wronly_is_einval(client: Client, map_fd: int,
                                                   bpf_dir: Path) -> None:
    client.obj_pin(map_fd, str(bpf_dir / "m"))
    expect(errno.EINVAL, lambda: client.obj_get(str(bpf_dir / "m"), 0x18), "file_flags")


def test_get_without_its_path_fd_is_ebadf(raw: Raw) -> None:
    expect(errno.EBADF, lambda: raw.call("obj_get", 0), "path")


# -- as another user ------------------------------------------------------------------------------


@pytest.mark.fuse
def test_get_of_another_users_0600_pin_is_eacces(public_daemon: DaemonProcess) -> None:
    assert public_daemon.mount is not None
    pin = str(public_daemon.mount / "root_only")
    with public_daemon.client() as c:
        fd = c.map_create(MapType.HASH, 4, 4, 1)
        c.obj_pin(fd, pin)  # mode 0600, owned by root
        os.close(fd)

    def get() -> None:
        with Client(str(public_daemon.socket)) as nobody:
            nobody.obj_get(pin)

    expect(errno.EACCES, lambda: in_child(get, user=NOBODY), "permission denied")


@pytest.mark.fuse
def test_pin_into_another_users_directory_is_eacces(public_daemon: DaemonProcess) -> None:
    assert public_daemon.mount is not None
    (public_daemon.mount / "roots").mkdir(mode=0o755)

    def pin() -> None:
        with Client(str(public_daemon.socket)) as nobody:
            nobody.obj_pin(nobody.map_create(MapType.HASH, 4, 4, 1),
                           str(public_daemon.mount / "roots" / "mine"))

    expect(errno.EACCES, lambda: in_child(pin, user=NOBODY))


# -- mount --------------------------------------------------------------------------------------
@pytest.mark.fuse
def test_mount_of_a_second_instance_in_one_namespace_is_ebusy(client: Client,
                                                              tmp_path: Path) -> None:
    """The module daemon's default instance already shows in this mount namespace."""
    (tmp_path / "mnt").mkdir()
    expect(errno.EBUSY, lambda: client.mount(str(tmp_path / "mnt"), instance="other"),
           "one bpffs instance per mount namespace")


def test_mount_with_a_non_namespace_fd_is_einval(raw: Raw, tmp_path: Path) -> None:
    r, w = os.pipe()
    try:
        expect(errno.EINVAL, lambda: raw.call("mount", os.fsencode(tmp_path), None, {},
                                              fds=(r,)), "mount namespace")
    finally:
        protocol.close_all([r, w])


def test_mount_without_its_namespace_fd_is_ebadf(raw: Raw, tmp_path: Path) -> None:
    expect(errno.EBADF, lambda: raw.call("mount", os.fsencode(tmp_path), None, {}),
           "mount namespace")


# -- prog_test_run_batch ------------------------------------------------------------------------
def test_batch_run_of_a_map_is_einval(client: Client, map_fd: int) -> None:
    expect(errno.EINVAL, lambda: client.prog_test_run_batch(map_fd, [bytes(64)]), "not a program")


def test_batch_run_of_an_unbound_handle_is_ebadf(raw: Raw) -> None:
    expect(errno.EBADF, lambda: raw.call("prog_test_run_batch", 12345, [bytes(64)], {}))


def test_batch_run_of_packets_that_are_not_bytes_is_einval(raw: Raw, prog_fd: int) -> None:
    handle = raw.bind(prog_fd)
    expect(errno.EINVAL, lambda: raw.call("prog_test_run_batch", handle, ["text"], {}),
           "packets must be bytes")


def test_batch_run_works_after_all_that(client: Client, prog_fd: int) -> None:
    assert client.prog_test_run_batch(prog_fd, [bytes(64)] * 3).retvals == [0, 0, 0]


# -- prog_test_run_buffer -----------------------------------------------------------------------
def _columns(count: int, size: int = 64) -> tuple[bytes, bytes]:
    return (array.array("Q", range(0, count * size, size)).tobytes(),
            array.array("I", [size] * count).tobytes())


def test_buffer_run_takes_only_a_memfd(raw: Raw, prog_fd: int, tmp_path: Path) -> None:
    """Any other file could block the daemon's read (a FIFO) or shrink under its mapping."""
    handle = raw.bind(prog_fd)
    r, w = os.pipe()
    plain = os.open(tmp_path / "packets", os.O_RDWR | os.O_CREAT)
    os.write(plain, bytes(256))
    try:
        for fd in (r, plain):
            expect(errno.EINVAL, lambda fd=fd: raw.call("prog_test_run_buffer", handle,
                                                        *_columns(4), {}, fds=(fd,)),
                   "must come in a memfd")
    finally:
        protocol.close_all([r, w, plain])


def test_buffer_run_takes_only_a_memfd_that_cannot_shrink(raw: Raw, prog_fd: int) -> None:
    handle = raw.bind(prog_fd)
    fd = os.memfd_create("unsealed", os.MFD_ALLOW_SEALING)
    os.write(fd, bytes(256))
    try:
        expect(errno.EINVAL, lambda: raw.call("prog_test_run_buffer", handle, *_columns(4), {},
                                              fds=(fd,)), "F_SEAL_SHRINK")
    finally:
        os.close(fd)


def test_buffer_run_refuses_a_memfd_of_huge_pages(raw: Raw, prog_fd: int) -> None:
    """A hole punched in hugetlbfs memory is SIGBUS to a reader when the pool is empty: the
    shrink seal does not forbid punching holes, so huge pages are refused outright."""
    handle = raw.bind(prog_fd)
    try:
        fd = os.memfd_create("huge", os.MFD_ALLOW_SEALING | os.MFD_HUGETLB)
    except OSError as e:
        pytest.skip(f"no hugetlbfs memfds here: {e}")
    try:
        os.ftruncate(fd, os.fstat(fd).st_blksize)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        expect(errno.EINVAL, lambda: raw.call("prog_test_run_buffer", handle, *_columns(4), {},
                                              fds=(fd,)), "huge pages")
    finally:
        os.close(fd)


def test_buffer_run_without_its_memfd_is_ebadf(raw: Raw, prog_fd: int) -> None:
    handle = raw.bind(prog_fd)
    expect(errno.EBADF, lambda: raw.call("prog_test_run_buffer", handle, *_columns(4), {}),
           "memfd")


@pytest.mark.parametrize(("offsets", "lengths", "message"), [
    (bytes(7), bytes(4), "one of each"),
    (bytes(16), bytes(4), "one of each"),
    (array.array("Q", [200]).tobytes(), array.array("I", [64]).tobytes(), "beyond its buffer"),
    (array.array("Q", [1 << 63]).tobytes(), array.array("I", [64]).tobytes(), "beyond"),
    (array.array("Q", [0]).tobytes(), array.array("I", [0xFFFFFFFF]).tobytes(), "beyond"),
])
def test_buffer_run_of_packets_outside_the_memfd_is_einval(raw: Raw, prog_fd: int,
                                                           offsets: bytes, lengths: bytes,
                                                           message: str) -> None:
    handle = raw.bind(prog_fd)
    fd = calls.packets_memfd(bytes(256))
    try:
        expect(errno.EINVAL, lambda: raw.call("prog_test_run_buffer", handle, offsets, lengths,
                                              {}, fds=(fd,)), message)
    finally:
        os.close(fd)


def test_buffer_run_of_too_many_packets_is_e2big(client: Client, prog_fd: int) -> None:
    fd = calls.packets_memfd(bytes(64))
    count = protocol.REQUEST_ARRAY_MAX + 1
    try:
        expect(errno.E2BIG, lambda: client.prog_test_run_buffer(
            prog_fd, fd, array.array("Q", bytes(8 * count)), array.array("I", [64]) * count),
            "packets in one request")
    finally:
        os.close(fd)


def test_buffer_run_of_a_sparse_terabyte_memfd(client: Client, prog_fd: int) -> None:
    """A packet near the end of a sparse memfd of a terabyte: the daemon maps it read-only
    (address space, not memory) and answers."""
    fd = calls.packets_memfd()
    try:
        os.ftruncate(fd, 1 << 40)
        os.pwrite(fd, bytes(12) + b"\x08\x00", (1 << 40) - 64)
        run = client.prog_test_run_buffer(prog_fd, fd, array.array("Q", [(1 << 40) - 64]),
                                          array.array("I", [64]))
    finally:
        os.close(fd)
    assert run.retvals.tolist() == [0] and not run.errors


def test_buffer_run_works_after_all_that(client: Client, prog_fd: int) -> None:
    fd = calls.packets_memfd(bytes(256))
    try:
        run = client.prog_test_run_buffer(prog_fd, fd, *(array.array(t, b) for t, b in
                                                         zip("QI", _columns(4), strict=True)))
    finally:
        os.close(fd)
    assert run.retvals.tolist() == [0] * 4 and not run.errors
    sealed = calls.packets_memfd(bytes(8))
    try:
        with pytest.raises(PermissionError):  # the seal holds for the client too
            os.ftruncate(sealed, 0)
    finally:
        os.close(sealed)


# -- whose error is it ----------------------------------------------------------------------------
async def _in_a_nursery(exc: BaseException) -> None:
    async with trio.open_nursery():
        raise exc


def _caught(exc: BaseException) -> BaseException:
    try:
        trio.run(_in_a_nursery, exc)
    except BaseException as e:  # whatever trio gives back is the point
        return e
    raise AssertionError("no exception")


def test_a_bpf_error_from_inside_a_nursery_keeps_its_errno() -> None:
    """issue 12: a BpfError wrapped in a nursery's ExceptionGroup is still the caller's."""
    wrapped = _caught(BpfError(errno.EEXIST, "name taken"))
    reply = protocol.unpack(server.error_reply(wrapped, "in a test"))
    assert reply == [errno.EEXIST, "name taken"]


def test_a_bad_request_is_the_callers_error() -> None:
    err = protocol.RequestError(errno.EINVAL, "unknown operation 'x'")
    assert protocol.unpack(server.error_reply(err, "in a test")) == [errno.EINVAL,
                                                                     "unknown operation 'x'"]


@pytest.mark.parametrize("exc", [PermissionError(errno.EACCES, "state dir"),
                                 OSError(errno.ENOSPC, "disk full"), KeyError("k"),
                                 _caught(ValueError("bug"))],
                         ids=["PermissionError", "OSError", "KeyError", "group"])
def test_any_other_exception_is_logged_with_its_traceback_and_is_eio(
        caplog: pytest.LogCaptureFixture, exc: BaseException) -> None:
    """issue 12: the server took any OSError for the caller's, so internal failures were
    never logged. Now only BpfError is: the rest is logged with its traceback, then EIO."""
    with caplog.at_level(logging.ERROR, logger=server.log.name):
        reply = protocol.unpack(server.error_reply(exc, "serving pid 1"))
    assert reply[0] == errno.EIO and reply[1].startswith("internal error in bpffsd: "), reply
    (record,) = caplog.records
    assert record.exc_info is not None and record.exc_info[1] is exc
    assert "serving pid 1" in record.getMessage()
