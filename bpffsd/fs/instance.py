"""A bpffs instance: one tree, shown by all of its mounts.

The 4.4 rule is one instance per mount namespace: a second mount in the same namespace shows
the same tree. An instance may also be *named*: named instances outlive their mounts (they can
be mounted again, in any namespace, and are persisted), unnamed ones release their pins when
their last mount goes away, as a kernel bpffs does when unmounted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .tree import Tree

if TYPE_CHECKING:
    from ..store import Store
    from .mount import Mount


class Instance:
    def __init__(self, name: str | None, store: Store):
        self.name = name
        self.tree = Tree(hold=lambda obj: store.hold(obj, user=True),
                         release=lambda obj: store.put(obj, user=True))
        self.mounts: set[Mount] = set()

    @property
    def persistent(self) -> bool:
        return self.name is not None

    def describe(self) -> str:
        return f"instance {self.name!r}" if self.name else "an unnamed instance"

    def namespaces(self) -> set[int]:
        return {m.ns_ino for m in self.mounts}
