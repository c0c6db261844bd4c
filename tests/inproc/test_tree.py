"""The bpffs tree in-process (bpffsd/fs/tree.py): the errno rules of the kernel's bpffs
(kernel/bpf/inode.c and the VFS before it), per-uid entry quotas, and the reference a pin
holds, on a real Store with real maps. No daemon, no socket, no FUSE."""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable, Iterator

import pytest
from helpers import raises_errno

from bpffs.daemon.fs.tree import (
    NAME_MAX,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT,
    Caller,
    Dir,
    NodeQuota,
    Pin,
    Tree,
)
from bpffs.daemon.store import BpfObject, Kind, Store
from bpffs.vm.maps import create_map
from bpffs.vm.uapi import MapType

USER = Caller(1000, 1000, 0o022)
OTHER = Caller(1001, 1001, 0o022)


@pytest.fixture
def store() -> Store:
    return Store()


@pytest.fixture
def tree(store: Store) -> Tree:
    """A tree wired to the store as an instance wires it: a pin is a user reference."""
    return Tree(hold=lambda obj: store.hold(obj, user=True),
                release=lambda obj: store.put(obj, user=True))


@pytest.fixture
def new_map(store: Store) -> Iterator:
    """new_map() -> a hash map held by one fd-like user reference, dropped after the test."""
    held: list[BpfObject] = []

    def make() -> BpfObject:
        obj = store.add(Kind.MAP, create_map(MapType.HASH, 4, 4, 1), 0, 1, None)
        held.append(store.hold(obj, user=True))
        return obj

    yield make
    for obj in held:
        if not obj.freed:
            store.put(obj, user=True)


def drop_fd(store: Store, obj: BpfObject) -> None:
    store.put(obj, user=True)


def makers(tree: Tree, obj: BpfObject) -> list[Callable[[bytes], object]]:
    """One call per kind of entry, each making one of that name in the root: a directory, a
    pin of obj, a symlink."""
    return [lambda name: tree.mkdir(tree.root, name, 0o755, ROOT),
            lambda name: tree.pin(tree.root, name, obj, ROOT),
            lambda name: tree.symlink(tree.root, name, b"target", ROOT)]


# -- names ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "err"), [
    (b"a.b", errno.EPERM),  # dots are reserved (bpf_lookup)
    (b".", errno.EEXIST),
    (b"..", errno.EEXIST),
    (b"", errno.EINVAL),
    (b"a/b", errno.EINVAL),
    (b"a\0b", errno.EINVAL),
    (b"x" * (NAME_MAX + 1), errno.ENAMETOOLONG),
])
def test_bad_names_are_refused_for_every_kind_of_entry(tree: Tree, new_map, name: bytes,
                                                       err: int) -> None:
    obj = new_map()
    for make in makers(tree, obj):
        with raises_errno(err):
            make(name)
    assert tree.root.children == {} and obj.usercnt == 1, "nothing made, nothing held"


def test_the_longest_name_and_non_utf8_names_work(tree: Tree) -> None:
    for name in (b"x" * NAME_MAX, b"\xff\xfe"):
        made = tree.mkdir(tree.root, name, 0o755, ROOT)
        assert tree.lookup(tree.root, name) is made


def test_a_dotted_name_is_eperm_on_lookup_too(tree: Tree) -> None:
    with raises_errno(errno.EPERM):
        tree.lookup(tree.root, b"a.b")
    assert tree.lookup(tree.root, b".") is tree.root
    assert tree.lookup(tree.root, b"..") is tree.root  # the root is its own parent


# -- creating over an existing name ---------------------------------------------------------------
def test_mkdir_pin_symlink_and_link_onto_an_existing_name_are_eexist(tree: Tree,
                                                                     new_map) -> None:
    obj = new_map()
    pin = tree.pin(tree.root, b"p", obj, ROOT)
    tree.mkdir(tree.root, b"d", 0o755, ROOT)

    def hard_link(name: bytes) -> object:
        return tree.link(pin, tree.root, name, ROOT)

    for name in (b"p", b"d"):
        for make in [*makers(tree, obj), hard_link]:
            with raises_errno(errno.EEXIST):
                make(name)
    with raises_errno(errno.EEXIST):
        tree.check_pin(tree.root, b"p", ROOT)
    assert obj.usercnt == 2 and pin.nlink == 1, "the fd and the one pin, nothing more"


def test_creating_in_a_removed_directory_is_enoent(tree: Tree) -> None:
    gone = tree.mkdir(tree.root, b"gone", 0o755, ROOT)
    tree.rmdir(tree.root, b"gone")
    with raises_errno(errno.ENOENT):
        tree.mkdir(gone, b"child", 0o755, ROOT)


# -- removal ----------------------------------------------------------------------------------
def test_rmdir_of_a_non_empty_directory_is_enotempty(tree: Tree) -> None:
    d = tree.mkdir(tree.root, b"d", 0o755, ROOT)
    tree.mkdir(d, b"child", 0o755, ROOT)
    with raises_errno(errno.ENOTEMPTY):
        tree.rmdir(tree.root, b"d")
    tree.rmdir(d, b"child")
    tree.rmdir(tree.root, b"d")
    assert tree.root.children == {} and tree.root.nlink == 2


def test_rmdir_and_unlink_check_what_they_remove(tree: Tree, new_map) -> None:
    tree.pin(tree.root, b"p", new_map(), ROOT)
    tree.mkdir(tree.root, b"d", 0o755, ROOT)
    with raises_errno(errno.ENOTDIR):
        tree.rmdir(tree.root, b"p")
    with raises_errno(errno.EISDIR):
        tree.unlink(tree.root, b"d")
    with raises_errno(errno.ENOENT):
        tree.unlink(tree.root, b"missing")
    with raises_errno(errno.EINVAL):
        tree.rmdir(tree.root, b".")
    with raises_errno(errno.ENOTEMPTY):
        tree.rmdir(tree.root, b"..")


# -- rename -----------------------------------------------------------------------------------
def test_rename_noreplace_onto_an_existing_name_is_eexist(tree: Tree, new_map) -> None:
    tree.pin(tree.root, b"a", new_map(), ROOT)
    tree.pin(tree.root, b"b", new_map(), ROOT)
    with raises_errno(errno.EEXIST):
        tree.rename(tree.root, b"a", tree.root, b"b", RENAME_NOREPLACE)
    with raises_errno(errno.EEXIST):
        tree.rename(tree.root, b"a", tree.root, b"..")
    assert set(tree.root.children) == {b"a", b"b"}


def test_a_plain_rename_replaces_a_pin_and_drops_its_reference(store: Store, tree: Tree,
                                                                new_map) -> None:
    kept, replaced = new_map(), new_map()
    tree.pin(tree.root, b"a", kept, ROOT)
    tree.pin(tree.root, b"b", replaced, ROOT)
    drop_fd(store, replaced)  # only its pin holds it now
    tree.rename(tree.root, b"a", tree.root, b"b")
    assert set(tree.root.children) == {b"b"}
    assert replaced.freed and not kept.freed


def test_rename_between_kinds_and_into_itself(tree: Tree, new_map) -> None:
    tree.pin(tree.root, b"p", new_map(), ROOT)
    outer = tree.mkdir(tree.root, b"outer", 0o755, ROOT)
    inner = tree.mkdir(outer, b"inner", 0o755, ROOT)
    tree.mkdir(tree.root, b"full", 0o755, ROOT)
    tree.mkdir(tree.lookup(tree.root, b"full"), b"x", 0o755, ROOT)
    with raises_errno(errno.EISDIR):
        tree.rename(tree.root, b"p", tree.root, b"outer")
    with raises_errno(errno.ENOTDIR):
        tree.rename(tree.root, b"outer", tree.root, b"p")
    with raises_errno(errno.EINVAL):
        tree.rename(tree.root, b"outer", inner, b"loop")
    with raises_errno(errno.ENOTEMPTY):
        tree.rename(tree.root, b"outer", tree.root, b"full")
    with raises_errno(errno.ENOENT):
        tree.rename(tree.root, b"p", tree.root, b"nothing", RENAME_EXCHANGE)
    with raises_errno(errno.EINVAL):
        tree.rename(tree.root, b"p", tree.root, b"q", RENAME_NOREPLACE | RENAME_EXCHANGE)


def test_moving_a_directory_moves_its_link_counts(tree: Tree) -> None:
    a = tree.mkdir(tree.root, b"a", 0o755, ROOT)
    b = tree.mkdir(tree.root, b"b", 0o755, ROOT)
    tree.rename(tree.root, b"a", b, b"a")
    assert (tree.root.nlink, b.nlink, a.parent) == (3, 3, b)
    with raises_errno(errno.EINVAL):
        tree.rename(b, b"a", tree.root, b"b", RENAME_EXCHANGE)  # b would go into a, its child
    c = tree.mkdir(tree.root, b"c", 0o755, ROOT)
    tree.rename(b, b"a", tree.root, b"c", RENAME_EXCHANGE)  # a and c trade places
    assert tree.lookup(tree.root, b"c") is a and tree.lookup(b, b"a") is c
    assert (a.parent, c.parent, tree.root.nlink, b.nlink) == (tree.root, b, 4, 3)


# -- modes and owners ---------------------------------------------------------------------------
def test_pins_are_0600_minus_umask_and_the_root_is_1777(tree: Tree, new_map) -> None:
    pin = tree.pin(tree.root, b"p", new_map(), Caller(0, 0, 0o077))
    assert pin.mode == stat.S_IFREG | 0o600 and pin.nlink == 1
    assert tree.pin(tree.root, b"q", new_map(), Caller(0, 0, 0o277)).mode == stat.S_IFREG | 0o400
    assert tree.root.mode == stat.S_IFDIR | stat.S_ISVTX | 0o777
    assert tree.mkdir(tree.root, b"d", 0o750, USER).mode == stat.S_IFDIR | 0o750


def test_creating_in_another_users_0755_directory_is_eacces(tree: Tree, new_map) -> None:
    theirs = tree.mkdir(tree.root, b"theirs", 0o755, OTHER)
    with raises_errno(errno.EACCES):
        tree.mkdir(theirs, b"mine", 0o755, USER, check=True)
    with raises_errno(errno.EACCES):
        tree.check_pin(theirs, b"mine", USER)
    tree.mkdir(tree.root, b"mine", 0o755, USER, check=True)  # the sticky 1777 root lets all


def test_a_setgid_directory_hands_its_group_down(tree: Tree) -> None:
    shared = tree.mkdir(tree.root, b"shared", 0o2775, Caller(0, 50, 0))
    assert tree.mkdir(shared, b"sub", 0o755, USER).gid == 50
    assert tree.mkdir(tree.root, b"plain", 0o755, USER).gid == USER.gid


# -- per-uid limits ----------------------------------------------------------------------------
def test_entries_are_limited_per_uid_and_released_when_removed(tree: Tree, new_map) -> None:
    tree.quota = NodeQuota(max_entries=2, max_symlink_bytes=8)
    obj = new_map()
    d = tree.mkdir(tree.root, b"d", 0o777, USER)
    tree.pin(d, b"p", obj, USER)
    with raises_errno(errno.EDQUOT):
        tree.mkdir(tree.root, b"third", 0o755, USER)
    tree.mkdir(tree.root, b"theirs", 0o755, OTHER)  # another uid has its own count
    for n in range(5):
        tree.mkdir(tree.root, b"root%d" % n, 0o755, ROOT)  # root is never counted
    assert tree.quota.entries == {USER.uid: 2, OTHER.uid: 1}
    tree.rename(d, b"p", tree.root, b"moved")  # a move keeps the entry's count
    assert tree.quota.entries[USER.uid] == 2
    tree.unlink(tree.root, b"moved")
    tree.symlink(tree.root, b"link", b"12345678", USER)  # the freed entry is usable again
    with raises_errno(errno.EDQUOT):
        tree.symlink(tree.root, b"long", b"123456789", OTHER)  # over the bytes of targets
    assert tree.quota.symlink_bytes == {USER.uid: 8}


def test_a_restore_is_never_refused_and_counts_for_the_owner(tree: Tree) -> None:
    tree.quota = NodeQuota(max_entries=1)
    tree.mkdir(tree.root, b"a", 0o755, USER, ino=100)
    tree.mkdir(tree.root, b"b", 0o755, USER, ino=101)  # from the state directory: no limit
    assert tree.quota.entries[USER.uid] == 2
    with raises_errno(errno.EDQUOT):
        tree.mkdir(tree.root, b"c", 0o755, USER)
    with raises_errno(errno.EEXIST):
        tree.mkdir(tree.root, b"d", 0o755, USER, ino=100)  # inode numbers are never reused


# -- the reference a pin holds ------------------------------------------------------------------
def test_an_object_lives_while_any_hard_link_names_it(store: Store, tree: Tree,
                                                      new_map) -> None:
    obj = new_map()
    pin = tree.pin(tree.root, b"p", obj, ROOT)
    tree.link(pin, tree.root, b"hard", ROOT)
    drop_fd(store, obj)
    assert (obj.usercnt, pin.nlink) == (1, 2), "one reference for the pin, however many links"
    tree.unlink(tree.root, b"p")
    assert not obj.freed and store.by_id(Kind.MAP, obj.id) is obj
    tree.unlink(tree.root, b"hard")
    assert obj.freed and pin.obj is None and pin.ino not in tree.nodes
    with raises_errno(errno.ENOENT):
        store.by_id(Kind.MAP, obj.id)


def test_an_open_pin_keeps_its_object_after_the_last_unlink(store: Store, tree: Tree,
                                                            new_map) -> None:
    obj = new_map()
    pin = tree.pin(tree.root, b"p", obj, ROOT)
    drop_fd(store, obj)
    tree.opened(pin, +1)  # cat holds it open
    tree.unlink(tree.root, b"p")
    assert not obj.freed
    tree.opened(pin, -1)
    assert obj.freed


def test_hard_links_to_directories_are_eperm(tree: Tree) -> None:
    d = tree.mkdir(tree.root, b"d", 0o755, ROOT)
    with raises_errno(errno.EPERM):
        tree.link(d, tree.root, b"again", ROOT)


def test_clear_releases_every_pin_and_every_count(store: Store, tree: Tree, new_map) -> None:
    tree.quota = NodeQuota(max_entries=10)
    objs = [new_map() for _ in range(3)]
    d = tree.mkdir(tree.root, b"d", 0o777, USER)
    for n, obj in enumerate(objs):
        tree.pin(d, b"p%d" % n, obj, USER)
        drop_fd(store, obj)
    tree.symlink(tree.root, b"s", b"d/p0", USER)
    tree.clear()
    assert all(obj.freed for obj in objs)
    assert tree.root.children == {} and list(tree.nodes) == [tree.root.ino]
    assert not tree.quota.entries and not tree.quota.symlink_bytes


# -- lookups and listings --------------------------------------------------------------------------
def test_walk_and_path_of(tree: Tree, new_map) -> None:
    d = tree.mkdir(tree.root, b"d", 0o700, USER)
    pin = tree.pin(d, b"p", new_map(), USER)
    tree.link(pin, tree.root, b"top", ROOT)
    assert tree.walk(b"/d/p") is pin and tree.walk(b"d//p/") is pin
    with raises_errno(errno.ENOTDIR):
        tree.walk(b"d/p/deeper")
    assert sorted(tree.path_of(pin)) == [b"d/p", b"top"]
    assert tree.path_of(pin, OTHER) == [b"top"], "a 0700 directory hides what is below it"
    with raises_errno(errno.ENOENT):
        tree.node(12345)
    with raises_errno(errno.ENOTDIR):
        tree.dir(pin.ino)


def test_a_listing_resumed_after_changes_neither_skips_nor_repeats(tree: Tree) -> None:
    names = [b"n%d" % i for i in range(10)]
    for name in names:
        tree.mkdir(tree.root, name, 0o755, ROOT)
    first = tree.root.listing(0, 6)  # '.', '..', n0..n3
    assert [name for name, _, _ in first] == [b".", b"..", *names[:4]]
    tree.rmdir(tree.root, b"n1")  # already listed
    tree.rmdir(tree.root, b"n5")  # not yet listed: must not appear
    tree.mkdir(tree.root, b"late", 0o755, ROOT)
    rest = tree.root.listing(first[-1][1], 100)
    assert [name for name, _, _ in rest] == [b"n4", *names[6:], b"late"]
    assert isinstance(rest[0][2], Dir) and not isinstance(rest[0][2], Pin)
