"""The sans-I/O operations of client/calls.py, driven by hand: what a call does with the
replies and errors it is given, with no daemon."""

from __future__ import annotations

import errno
import os
import socket

import pytest

from bpffs.client import calls
from bpffs.vm.errors import BpfError


def test_a_batch_cut_short_by_a_lost_connection_reports_what_was_applied() -> None:
    """An error made on this side (the daemon hung up) carries no reply detail: the batch
    still reports the count applied before it, instead of an AttributeError."""
    ours, _theirs = socket.socketpair()
    session = calls.Session()
    session.bound[os.fstat(ours.fileno()).st_ino] = {"kind": "map", "type": 1,
                                                     "key_size": 4, "value_size": 4}
    call = calls.map_update_batch(session, ours.fileno(), [bytes(4)] * 3, [bytes(4)] * 3,
                                  chunk=1)
    next(call)
    call.send((1, []))  # the first request applied one element
    with pytest.raises(BpfError) as info:
        call.throw(BpfError(errno.ECONNRESET, "bpffsd closed the connection"))
    assert info.value.errno == errno.ECONNRESET
    assert info.value.count == 1
