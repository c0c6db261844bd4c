"""Typed errors on the wire, in-process: each kind of error that carries a datum besides errno
and message (a verifier log, a batch count, a test run's output) leaves the daemon tagged with
that datum's name and comes back as the same class, with the datum under the same name."""

from __future__ import annotations

import errno
import pickle

import pytest

from bpffs import protocol
from bpffs.daemon import pipeline
from bpffs.vm.errors import DETAILS, BatchError, BpfError, RunOutputError, VerifierError

ERRORS = [
    VerifierError(errno.EACCES, "invalid mem access 'map_value_or_null'",
                  "0: (b7) r0 = 0\ninvalid mem access 'map_value_or_null'\n"),
    BatchError(errno.E2BIG, "hash map 'm' is full", 4),
    RunOutputError(errno.ENOSPC, "data_out of 64 bytes does not fit in data_size_out 1",
                   {"retval": 7, "data_out": bytes(64), "duration": 10}),
]


@pytest.mark.parametrize("err", ERRORS, ids=lambda e: type(e).__name__)
def test_an_error_reply_carries_the_datum_tagged_by_its_name(err: BpfError) -> None:
    reply = protocol.unpack(pipeline.error_reply(err, "in a test"))
    assert reply == [err.errno, err.strerror, {err.DETAIL: getattr(err, err.DETAIL)}]
    assert DETAILS[err.DETAIL] is type(err)


@pytest.mark.parametrize("err", ERRORS, ids=lambda e: type(e).__name__)
def test_the_client_raises_the_same_class_with_the_same_datum(err: BpfError) -> None:
    again = protocol.error_from_reply(protocol.unpack(pipeline.error_reply(err, "in a test")))
    assert type(again) is type(err)
    assert (again.errno, again.strerror, again.detail()) == (err.errno, err.strerror,
                                                             err.detail())
    assert isinstance(again, OSError) and str(again) == str(err)


def test_a_plain_error_stays_plain_and_carries_nothing() -> None:
    reply = protocol.unpack(pipeline.error_reply(BpfError(errno.ENOENT, "no map"), "in a test"))
    assert reply == [errno.ENOENT, "no map"]
    again = protocol.error_from_reply(reply)
    assert type(again) is BpfError and again.detail() == {}


@pytest.mark.parametrize("detail", [None, {}, {"nonsense": 1}, {"log": "x", "count": 1}, "x"])
def test_an_unknown_or_malformed_detail_is_a_plain_error(detail: object) -> None:
    again = protocol.error_from_reply([errno.EINVAL, "bad", detail])
    assert type(again) is BpfError and (again.errno, again.strerror) == (errno.EINVAL, "bad")


@pytest.mark.parametrize("err", [*ERRORS, BpfError(errno.EPERM, "no")],
                         ids=lambda e: type(e).__name__)
def test_typed_errors_pickle_with_their_datum(err: BpfError) -> None:
    """Tests hand errors from forked children back through pickle."""
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is type(err) and again.detail() == err.detail()
    assert (again.errno, again.strerror) == (err.errno, err.strerror)
