"""The control protocol's request checks in-process (bpffs/protocol.py): unpack_request's
bounds on what a message may hold (a violation drops the peer: ProtocolError), and
check_request's schema of each operation's arguments (a violation is the caller's error:
EINVAL). No daemon and no socket: the same functions the daemon runs on each request."""

from __future__ import annotations

import errno
import os
from typing import Any

import msgpack
import pytest
from helpers import raises_errno

from bpffs import protocol
from bpffs.protocol import OPS, ProtocolError, RequestError, check_request, unpack_request

GOOD = {"int": 5, "str": "x", "bytes": b"x", "bool": True, "dict": {}, "list": [], "u32": 7,
        "u64": 7}
WRONG = {"int": "5", "str": b"x", "bytes": "x", "bool": 1, "dict": [], "list": {},
         "u32": 7.0, "u64": b"7"}


def good_args(op: str) -> list[Any]:
    return [GOOD[kind.rstrip("?")] for kind in OPS[op]]


def nested(depth: int) -> Any:
    """depth lists, one inside the other."""
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


# -- check_request: the schema -------------------------------------------------------------------
@pytest.mark.parametrize("op", sorted(OPS))
def test_every_operation_takes_exactly_its_arguments(op: str) -> None:
    args = good_args(op)
    assert check_request([op, *args]) == (op, args)
    with raises_errno(errno.EINVAL) as info:
        check_request([op, *args, 0])
    assert f"{op} takes {len(args)} arguments, got {len(args) + 1}" in str(info.value)
    for i, kind in enumerate(OPS[op]):
        wrong = [*args[:i], WRONG[kind.rstrip("?")], *args[i + 1:]]
        with raises_errno(errno.EINVAL) as info:
            check_request([op, *wrong])
        assert f"{op}: argument {i + 1} must be {kind}" in str(info.value)


@pytest.mark.parametrize("msg", [{"op": "status"}, [], [1], [None], ["no_such_op"], "status",
                                 None])
def test_a_request_is_an_array_starting_with_a_known_operation(msg: Any) -> None:
    with pytest.raises(RequestError) as info:
        check_request(msg)
    assert info.value.errno == errno.EINVAL and isinstance(info.value, OSError)
    assert str(info.value).startswith("EINVAL: ")


@pytest.mark.parametrize(("kind", "top"), [("u32", 1 << 32), ("u64", 1 << 64)])
def test_unsigned_arguments_are_in_the_kernels_range(kind: str, top: int) -> None:
    op = {"u32": "obj_get", "u64": "map_update"}[kind]
    position = OPS[op].index(kind)
    args = good_args(op)
    for value, fits in ((0, True), (top - 1, True), (top, False), (-1, False)):
        args[position] = value
        if fits:
            check_request([op, *args])
        else:
            with raises_errno(errno.EINVAL):
                check_request([op, *args])


def test_bool_is_no_int_and_only_optional_arguments_take_none() -> None:
    with raises_errno(errno.EINVAL) as info:
        check_request(["map_lookup", True, b"k"])
    assert "must be int, got bool" in str(info.value)
    assert check_request(["map_lookup_batch", 1, None, 4, False])[0] == "map_lookup_batch"
    with raises_errno(errno.EINVAL):
        check_request(["map_lookup", 1, None])  # "bytes", not "bytes?"


def test_extra_fds_are_closed_on_arrival() -> None:
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(3)]
    kept = protocol.REQUESTS.keep_fds("obj_get", fds)
    assert kept == fds[:1]
    for fd in fds[1:]:
        with raises_errno(errno.EBADF):
            os.fstat(fd)
    assert protocol.REQUESTS.keep_fds("status", []) == []
    os.close(kept[0])


# -- unpack_request: the bounds -------------------------------------------------------------
def test_a_request_round_trips_through_pack_and_unpack_request() -> None:
    msg = ["prog_load", 1, b"\x95" * 16, "GPL", 0, "name", 0, 0, {"3": 4}]
    assert unpack_request(protocol.pack(msg)) == msg


@pytest.mark.parametrize("data", [
    b"\x92\xa5hel",  # truncated
    protocol.pack(["status"]) + b"\x00",  # extra bytes after the message
    b"\xc1",  # never used by msgpack
    b"\xd4\x01\x00",  # an ext type
    b"\x81\x90\x00",  # a map whose key is an array (unhashable)
])
def test_malformed_msgpack_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        unpack_request(data)


@pytest.mark.parametrize(("what", "limit"), [
    ("str", protocol.REQUEST_STR_MAX),
    ("array", protocol.REQUEST_ARRAY_MAX),
    ("map", protocol.REQUEST_MAP_MAX),
])
def test_containers_and_strings_are_bounded(what: str, limit: int) -> None:
    def message(n: int) -> bytes:
        value = {"str": lambda: "s" * n, "array": lambda: [0] * n,
                 "map": lambda: {i: 0 for i in range(n)}}[what]()
        return msgpack.packb(["status", value], use_bin_type=True)

    unpack_request(message(limit))
    with pytest.raises(ProtocolError):
        unpack_request(message(limit + 1))


def test_bins_are_bounded_by_the_callers_message_limit() -> None:
    data = protocol.pack(["map_lookup", 1, bytes(1000)])
    assert unpack_request(data, max_bin=1000)[2] == bytes(1000)
    with pytest.raises(ProtocolError):
        unpack_request(data, max_bin=999)


def test_nesting_is_bounded() -> None:
    deepest = ["status", nested(protocol.REQUEST_DEPTH_MAX - 1)]  # the request array counts
    assert unpack_request(protocol.pack(deepest)) == deepest
    for too_deep in (["status", nested(protocol.REQUEST_DEPTH_MAX)],
                     {"k": nested(protocol.REQUEST_DEPTH_MAX)}):
        with pytest.raises(ProtocolError, match="nested deeper"):
            unpack_request(protocol.pack(too_deep))


def test_a_large_message_is_held_to_its_object_budget() -> None:
    """Only messages over INLINE_MAX (memfd messages) are counted: the budget bounds the
    memory unpacking may take, which an inline datagram cannot reach."""
    many = protocol.pack(["prog_test_run_batch", 1, [b"p" * 16] * 20_000, {}])
    assert len(many) > protocol.INLINE_MAX
    cost = (1 + 4) + (1 + 20_000) + 1  # each container and its elements: request, list, dict
    assert len(unpack_request(many, objects_max=cost)[2]) == 20_000
    with pytest.raises(ProtocolError, match=f"more than {cost - 1} objects"):
        unpack_request(many, objects_max=cost - 1)
    assert unpack_request(many, objects_max=None)[0] == "prog_test_run_batch"
    small = protocol.pack(["prog_test_run_batch", 1, [b"p"] * 100, {}])
    assert unpack_request(small, objects_max=10)[0] == "prog_test_run_batch"
