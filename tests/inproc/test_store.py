"""The refcounted store in-process (bpffsd/store.py), with real maps and verified programs:
an object lives while it has an fd, a pin or an internal reference (a program's maps, a
prog_array's programs); the last user reference of a prog_array clears its slots, which breaks
tail-call cycles; creating charges memlock pages and freeing gives them back."""

from __future__ import annotations

import errno
import logging

import pytest
from helpers import raises_errno

from bpffs.daemon.store import BpfObject, Kind, Store
from bpffs.vm import asm
from bpffs.vm.isa import R0, R1, R2, R3
from bpffs.vm.maps import create_map
from bpffs.vm.program import load_program
from bpffs.vm.uapi import BPF_ANY, Helper, MapType, ProgType

UID = 1000


def key(n: int) -> bytes:
    return n.to_bytes(4, "little")


def new_map(store: Store, map_type: MapType = MapType.HASH, pages: int = 1,
            limit: int | None = None) -> BpfObject:
    """A map with one user reference, as BPF_MAP_CREATE leaves it (its fd)."""
    value_size = 4 if map_type == MapType.PROG_ARRAY else 8
    obj = store.add(Kind.MAP, create_map(map_type, 4, value_size, 4), UID, pages, limit)
    return store.hold(obj, user=True)


def new_prog(store: Store, code: bytes, maps: dict[int, BpfObject]) -> BpfObject:
    """A verified program whose ld_map_fd numbers name `maps`, held by one fd."""
    prog, _log = load_program(ProgType.SOCKET_FILTER, code, license="GPL",
                              resolve_map=lambda fd: maps[fd].impl)
    return store.hold(store.add(Kind.PROG, prog, UID, 1, None), user=True)


def uses_map(fd: int) -> bytes:
    return asm.program(asm.ld_map_fd(R1, fd), asm.mov64_imm(R0, 0), asm.exit())


def tail_calls_into(fd: int) -> bytes:
    return asm.program(asm.ld_map_fd(R2, fd), asm.mov64_imm(R3, 0),
                       asm.call(Helper.tail_call), asm.mov64_imm(R0, 1), asm.exit())


def live(store: Store) -> set[tuple[Kind, int]]:
    return {(obj.kind, obj.id) for obj in store.objects()}


@pytest.fixture
def store() -> Store:
    return Store()


def test_an_object_lives_while_it_has_an_fd(store: Store) -> None:
    m = new_map(store)
    dup = store.hold(m, user=True)  # a second fd (dup, fork, obj_get)
    store.put(m, user=True)
    assert store.by_id(Kind.MAP, m.id) is m and not m.freed
    store.put(dup, user=True)
    assert m.freed and live(store) == set()
    with raises_errno(errno.ENOENT):
        store.by_id(Kind.MAP, m.id)
    with raises_errno(errno.ENOENT):
        store.hold(m)  # a freed object takes no new reference


def test_ids_are_per_kind_and_never_reused(store: Store) -> None:
    first = new_map(store)
    store.put(first, user=True)
    second = new_map(store)
    prog = new_prog(store, uses_map(1), {1: second})
    assert (first.id, second.id, prog.id) == (1, 2, 1)
    assert store.ids(Kind.MAP) == [2] and store.ids(Kind.PROG) == [1]
    assert store.of(second.impl) is second


def test_a_program_holds_its_maps(store: Store) -> None:
    m = new_map(store)
    prog = new_prog(store, uses_map(7), {7: m})
    assert (m.refcnt, m.usercnt) == (2, 1)
    store.put(m, user=True)  # the map's fd closes: the program still uses it
    assert not m.freed
    store.put(prog, user=True)
    assert prog.freed and m.freed and live(store) == set()


def test_a_prog_array_slot_holds_its_program(store: Store) -> None:
    array = new_map(store, MapType.PROG_ARRAY)
    target = new_prog(store, uses_map(1), {1: new_map(store)})
    store.put_in_fd_array(array.impl, key(0), target, BPF_ANY)
    store.put(target, user=True)
    assert not target.freed and array.impl.get(0) is target.impl
    array.impl.delete(key(0))  # the slot's reference goes back through impl.release
    assert target.freed


def test_a_tail_call_cycle_is_broken_when_the_last_user_reference_goes(store: Store) -> None:
    """prog -> prog_array (internal) -> prog (a slot): refcounts alone would keep both."""
    array = new_map(store, MapType.PROG_ARRAY)
    prog = new_prog(store, tail_calls_into(3), {3: array})
    store.put_in_fd_array(array.impl, key(0), prog, BPF_ANY)
    pinned = store.hold(array, user=True)  # a pin keeps the array's slots
    store.put(prog, user=True)
    store.put(array, user=True)
    assert not prog.freed and not array.freed and array.impl.get(0) is prog.impl
    store.put(pinned, user=True)  # the last user reference: slots cleared
    assert prog.freed and array.freed and live(store) == set()


def test_a_failed_slot_update_gives_its_reference_back(store: Store) -> None:
    array = new_map(store, MapType.PROG_ARRAY)
    prog = new_prog(store, uses_map(1), {1: new_map(store)})
    with raises_errno(errno.E2BIG):
        store.put_in_fd_array(array.impl, key(99), prog, BPF_ANY)  # past max_entries
    assert (prog.refcnt, prog.usercnt) == (1, 1)


def test_held_frees_a_new_object_whose_first_reference_failed(store: Store) -> None:
    obj = store.add(Kind.MAP, create_map(MapType.HASH, 4, 8, 4), UID, 1, None)
    with pytest.raises(RuntimeError), store.held(obj):
        raise RuntimeError("the fd could not be sent")
    assert obj.freed and store.locked_pages == {}


def test_memlock_is_charged_per_uid_and_given_back(store: Store) -> None:
    a = new_map(store, pages=3, limit=4)
    with raises_errno(errno.EPERM):
        new_map(store, pages=2, limit=4)  # 3 + 2 > 4
    assert live(store) == {(Kind.MAP, a.id)}, "a refused map is not created"
    store.put(a, user=True)
    assert store.locked_pages == {} and store.total_pages == 0
    new_map(store, pages=4, limit=4)


def test_the_daemon_wide_cap_is_enomem_except_while_restoring() -> None:
    store = Store(memory_limit=2 * 4096)
    new_map(store, pages=2)
    with raises_errno(errno.ENOMEM):
        new_map(store, pages=1)
    with store.uncapped():  # the journal's replay: measured against the cap afterwards
        extra = new_map(store, pages=3)
    assert store.over_cap() == 3
    store.put(extra, user=True)
    assert store.over_cap() == 0


def test_free_hooks_hear_of_every_free_and_a_failing_hook_is_logged(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    heard: list[str] = []
    store.on_free.append(lambda obj: heard.append(obj.describe()))
    store.on_free.append(lambda obj: 1 / 0)
    m = new_map(store)
    prog = new_prog(store, uses_map(1), {1: m})
    store.put(m, user=True)
    with caplog.at_level(logging.ERROR):
        store.put(prog, user=True)
    assert sorted(heard) == [f"map {m.id}", f"prog {prog.id}"]
    assert caplog.text.count("on_free hook failed") == 2
