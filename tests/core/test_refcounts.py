"""Reference counting with real processes: an object lives while an fd (dup'ed, inherited by
fork, passed with SCM_RIGHTS), a pin or an internal reference (program -> maps, prog_array ->
programs) holds it, and goes when the last one does, however the holder ends (close, exit,
SIGKILL). Object ids never come back, so "freed" is checked as "its id is no longer listed"."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from helpers import in_child, raises_errno

from bpffs.client import Client
from bpffs.vm import asm
from bpffs.vm.isa import R0, R1, R2, R3
from bpffs.vm.uapi import Helper, MapType, ProgType

KEY, VALUE = (7).to_bytes(4, "little"), (42).to_bytes(8, "little")


def live_ids(client: Client, kind: str) -> set[int]:
    """Every id the daemon lists (BPF_*_GET_NEXT_ID from 0 until ENOENT)."""
    ids, start = set(), 0
    while True:
        try:
            start = client.get_next_id(kind, start)
        except OSError:
            return ids
        ids.add(start)


def map_id(client: Client, fd: int) -> int:
    return client.obj_get_info_by_fd(fd)["id"]


def new_map(client: Client) -> tuple[int, int]:
    fd = client.map_create(MapType.HASH, 4, 8, 4)
    client.map_update_elem(fd, KEY, VALUE)
    return fd, map_id(client, fd)


@pytest.fixture
def baseline(client: Client):
    """The daemon's object counts before the test must be its counts after it: no leaks."""
    before = client.status()["objects"]
    yield
    assert client.status()["objects"] == before


def test_dup_keeps_the_object_until_the_last_copy_closes(client, baseline) -> None:
    fd, mid = new_map(client)
    copy = os.dup(fd)
    os.close(fd)
    assert client.map_lookup_elem(copy, KEY) == VALUE
    assert mid in live_ids(client, "map")
    os.close(copy)
    assert mid not in live_ids(client, "map")


def test_a_forked_child_keeps_the_map_after_the_parent_closes(daemon, client, baseline) -> None:
    fd, mid = new_map(client)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: waits for the parent to close, then reads
        code = 1
        try:
            os.close(write_end)
            os.read(read_end, 1)
            with Client(str(daemon.socket)) as c:
                code = 0 if c.map_lookup_elem(fd, KEY) == VALUE else 2
        finally:
            os._exit(code)
    os.close(read_end)
    os.close(fd)
    assert mid in live_ids(client, "map"), "the child's inherited fd holds the map"
    os.write(write_end, b"x")
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert mid not in live_ids(client, "map"), "the child's exit dropped the last reference"


HOLDER = textwrap.dedent("""
    import os, socket, sys
    from bpffs.client import Client
    from bpffs.protocol import RECV_ARGS, decode_fds
    chan = socket.socket(fileno=int(sys.argv[1]))
    _, anc, flags, _ = chan.recvmsg(*RECV_ARGS)
    (fd,) = decode_fds(anc, flags)
    with Client() as c:
        c.map_update_elem(fd, bytes(4), bytes(8))  # the holder writes through the passed fd
        print(c.map_lookup_elem(fd, bytes.fromhex(sys.argv[2])).hex(), flush=True)
    sys.stdin.readline()  # hold the fd until told (or killed)
""")


def start_holder(daemon, fd: int) -> subprocess.Popen:
    """Another program (not a fork) that receives fd over a Unix socket with SCM_RIGHTS."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(theirs.fileno()), KEY.hex()],
                            pass_fds=[theirs.fileno()], env=daemon.env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    theirs.close()
    ours.sendmsg([b"fd"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))])
    ours.close()
    assert proc.stdout.readline().strip() == VALUE.hex()
    return proc


@pytest.mark.parametrize("ending", ["exit", "SIGKILL", "SIGTERM"])
def test_scm_rights_to_another_process(daemon, client, baseline, ending: str) -> None:
    fd, mid = new_map(client)
    holder = start_holder(daemon, fd)
    os.close(fd)
    assert mid in live_ids(client, "map")
    if ending == "exit":
        holder.stdin.write("done\n")
        holder.stdin.close()
    else:
        holder.send_signal(getattr(signal, ending))
    holder.wait(timeout=30)
    holder.stdout.close()
    if ending == "exit":
        assert holder.returncode == 0
    assert mid not in live_ids(client, "map")


def test_the_holders_writes_are_visible_to_the_sender(daemon, client, baseline) -> None:
    fd, _ = new_map(client)
    holder = start_holder(daemon, fd)
    try:
        assert client.map_lookup_elem(fd, bytes(4)) == bytes(8)
    finally:
        holder.kill()
        holder.wait()
        holder.stdin.close()
        holder.stdout.close()
        os.close(fd)


@pytest.mark.fuse
def test_a_pin_keeps_the_object_alive_until_unlinked(client, bpf_dir, baseline) -> None:
    fd, mid = new_map(client)
    pin = bpf_dir / "m"
    client.obj_pin(fd, str(pin))
    os.close(fd)
    assert mid in live_ids(client, "map")
    again = client.obj_get(str(pin))
    assert client.map_lookup_elem(again, KEY) == VALUE
    os.close(again)
    os.unlink(pin)
    assert mid not in live_ids(client, "map")


@pytest.mark.fuse
def test_hard_links_are_one_reference_each(client, bpf_dir, baseline) -> None:
    fd, mid = new_map(client)
    client.obj_pin(fd, str(bpf_dir / "a"))
    os.close(fd)
    os.link(bpf_dir / "a", bpf_dir / "b")
    os.unlink(bpf_dir / "a")
    assert mid in live_ids(client, "map")
    os.unlink(bpf_dir / "b")
    assert mid not in live_ids(client, "map")


def uses_map(map_fd: int) -> bytes:
    return asm.program(asm.ld_map_fd(R1, map_fd), asm.mov64_imm(R0, 0), asm.exit())


def tail_calls_into(prog_array_fd: int) -> bytes:
    return asm.program(asm.ld_map_fd(R2, prog_array_fd), asm.mov64_imm(R3, 0),
                       asm.call(Helper.tail_call), asm.mov64_imm(R0, 1), asm.exit())


def test_a_program_holds_its_maps(client, baseline) -> None:
    fd, mid = new_map(client)
    prog = client.prog_load(ProgType.SOCKET_FILTER, uses_map(fd))
    pid = client.obj_get_info_by_fd(prog)["id"]
    assert client.obj_get_info_by_fd(prog)["map_ids"] == [mid]
    os.close(fd)
    assert mid in live_ids(client, "map"), "the program's reference keeps the map"
    os.close(prog)
    assert pid not in live_ids(client, "prog")
    assert mid not in live_ids(client, "map")


@pytest.mark.fuse
def test_a_pinned_program_alone_keeps_its_maps(client, bpf_dir, baseline) -> None:
    """No fd and no pin of the map left: the pinned program's reference holds it, and
    unlinking the program's pin frees both."""
    fd, mid = new_map(client)
    prog = client.prog_load(ProgType.SOCKET_FILTER, uses_map(fd))
    pid = client.obj_get_info_by_fd(prog)["id"]
    client.obj_pin(prog, str(bpf_dir / "prog"))
    os.close(prog)
    os.close(fd)
    assert {pid, mid} <= live_ids(client, "prog") | live_ids(client, "map")
    again = client.get_fd_by_id("map", mid)
    assert client.map_lookup_elem(again, KEY) == VALUE
    os.close(again)
    os.unlink(bpf_dir / "prog")
    assert pid not in live_ids(client, "prog") and mid not in live_ids(client, "map")


def test_prog_array_slots_hold_programs(client, baseline) -> None:
    array = client.map_create(MapType.PROG_ARRAY, 4, 4, 2)
    prog = client.prog_load(ProgType.SOCKET_FILTER, uses_map(array))
    pid = client.obj_get_info_by_fd(prog)["id"]
    client.map_update_elem(array, bytes(4), prog.to_bytes(4, "little"))
    os.close(prog)
    assert pid in live_ids(client, "prog"), "the slot keeps the program"
    client.map_delete_elem(array, bytes(4))
    assert pid not in live_ids(client, "prog"), "emptying the slot dropped it"
    os.close(array)


def test_a_tail_call_cycle_is_broken_when_the_last_user_reference_goes(client,
                                                                      baseline) -> None:
    """prog -> prog_array -> prog: the kernel's usercnt rule clears the array when its last
    fd or pin goes, although the program still references the array."""
    array = client.map_create(MapType.PROG_ARRAY, 4, 4, 1)
    aid = map_id(client, array)
    prog = client.prog_load(ProgType.SOCKET_FILTER, tail_calls_into(array))
    pid = client.obj_get_info_by_fd(prog)["id"]
    client.map_update_elem(array, bytes(4), prog.to_bytes(4, "little"))
    assert client.obj_get_info_by_fd(array)["entries"] == 1
    os.close(array)  # last user reference of the array: its slots are cleared
    assert aid in live_ids(client, "map"), "the program still holds the array"
    again = client.get_fd_by_id("map", aid)
    assert client.obj_get_info_by_fd(again)["entries"] == 0
    os.close(again)
    os.close(prog)
    assert pid not in live_ids(client, "prog") and aid not in live_ids(client, "map")


def test_a_cycle_with_only_internal_references_left_is_freed(client, baseline) -> None:
    array = client.map_create(MapType.PROG_ARRAY, 4, 4, 1)
    aid = map_id(client, array)
    prog = client.prog_load(ProgType.SOCKET_FILTER, tail_calls_into(array))
    pid = client.obj_get_info_by_fd(prog)["id"]
    client.map_update_elem(array, bytes(4), prog.to_bytes(4, "little"))
    os.close(prog)  # the slot keeps it
    assert pid in live_ids(client, "prog")
    os.close(array)  # clears the slot: the program goes, then the array with it
    assert pid not in live_ids(client, "prog") and aid not in live_ids(client, "map")


@pytest.mark.fuse
def test_a_pinned_prog_array_keeps_its_slots(client, bpf_dir, baseline) -> None:
    array = client.map_create(MapType.PROG_ARRAY, 4, 4, 1)
    prog = client.prog_load(ProgType.SOCKET_FILTER, tail_calls_into(array))
    client.map_update_elem(array, bytes(4), prog.to_bytes(4, "little"))
    client.obj_pin(array, str(bpf_dir / "jumps"))
    os.close(array)
    os.close(prog)
    again = client.obj_get(str(bpf_dir / "jumps"))
    assert client.obj_get_info_by_fd(again)["entries"] == 1, "the pin is a user reference"
    os.close(again)
    os.unlink(bpf_dir / "jumps")


def test_a_closed_fd_number_is_not_mistaken_for_the_old_object(client, baseline) -> None:
    first = client.map_create(MapType.HASH, 4, 8, 1)
    number = first
    os.close(first)
    second = client.map_create(MapType.ARRAY, 4, 8, 1)
    assert second == number, "the fd number is reused"
    assert client.obj_get_info_by_fd(second)["type"] == "array"
    os.close(second)


def test_an_fd_of_a_freed_object_cannot_be_used(client, baseline) -> None:
    fd, mid = new_map(client)
    r, w = os.pipe()
    os.dup2(r, fd)  # the number now names a pipe
    os.close(r)
    os.close(w)
    with raises_errno(22):  # EINVAL: not a bpffs object fd
        Client(client.path).map_lookup_elem(fd, KEY)
    os.close(fd)
    assert mid not in live_ids(client, "map")


def test_many_fds_many_processes_back_to_baseline(daemon, client, baseline) -> None:
    fd, mid = new_map(client)

    def use_and_exit(fd: int) -> bytes:
        with Client(str(daemon.socket)) as c:
            copies = [os.dup(fd) for _ in range(20)]
            return c.map_lookup_elem(copies[-1], KEY)

    for _ in range(5):
        assert in_child(use_and_exit, fd) == VALUE
    os.close(fd)
    assert mid not in live_ids(client, "map")
