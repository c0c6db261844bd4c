"""Map: a bpffsd map as a Python mapping (bcc's table API, on a real fd).

    flows = Map.create(MapType.HASH, 4, 8, 1024, name="flows", key=int, value=int)
    flows[7] = 1                     # BPF_ANY update
    flows.update_batch({1: 2, 3: 4})
    for key, value in flows.items(): ...
    flows.pin("/sys/fs/bpf/flows"); Map.pinned("/sys/fs/bpf/flows", key=int, value=int)

Missing keys raise KeyError (the client's ENOENT); every other failure is a BpfError with the
kernel's errno. Array maps take int indices and cannot delete; len() of an array is its
max_entries, of a hash its element count.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any

from bpffs.vm.errors import BpfError
from bpffs.vm.uapi import BPF_ANY, MapType

from .codecs import Codec, codec_for
from .sync import Client, default_client

WALK_BATCH = 4096


class Map(MutableMapping):
    def __init__(self, fd: int, key: Any = None, value: Any = None,
                 client: Client | None = None, owned: bool = True):
        """Wrap an open map fd (closed with the Map when owned)."""
        self.client = client or default_client()
        self.fd = fd
        self.owned = owned
        info = self.client.obj_get_info_by_fd(fd)
        if "bytes_key" not in info:
            raise BpfError(errno.EINVAL, f"fd {fd} is a {info['type']}, not a map")
        self.info = info
        self.map_type = MapType[info["type"].upper()]
        self.key_codec: Codec = codec_for(int if key is None and self._is_array else key,
                                          info["bytes_key"])
        self.value_codec: Codec = codec_for(value, info["bytes_value"])

    @property
    def _is_array(self) -> bool:
        return self.map_type != MapType.HASH

    @classmethod
    def create(cls, map_type: int, key_size: int, value_size: int, max_entries: int,
               name: str = "", flags: int = 0, key: Any = None, value: Any = None,
               client: Client | None = None) -> Map:
        client = client or default_client()
        fd = client.map_create(map_type, key_size, value_size, max_entries, flags, name)
        return cls(fd, key, value, client)

    @classmethod
    def pinned(cls, path: str | bytes, key: Any = None, value: Any = None,
               client: Client | None = None, file_flags: int = 0) -> Map:
        client = client or default_client()
        return cls(client.obj_get(path, file_flags), key, value, client)

    # -- the mapping protocol -----------------------------------------------------------------
    def __getitem__(self, key: Any) -> Any:
        try:
            raw = self.client.map_lookup_elem(self.fd, self.key_codec.encode(key))
        except BpfError as e:
            if e.errno == errno.ENOENT:
                raise KeyError(key) from None
            raise
        return self.value_codec.decode(raw)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.update(key, value)

    def update(self, key: Any = None, value: Any = None, flags: int = BPF_ANY,  # type: ignore[override]
               **_: Any) -> None:
        """m.update(key, value, flags=BPF_NOEXIST): one element with explicit flags. (For
        many elements use update_batch.)"""
        self.client.map_update_elem(self.fd, self.key_codec.encode(key),
                                    self.value_codec.encode(value), flags)

    def __delitem__(self, key: Any) -> None:
        try:
            self.client.map_delete_elem(self.fd, self.key_codec.encode(key))
        except BpfError as e:
            if e.errno == errno.ENOENT:
                raise KeyError(key) from None
            raise

    def __contains__(self, key: object) -> bool:
        try:
            self[key]
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[Any]:
        for key, _ in self._walk():
            yield self.key_codec.decode(key)

    def __len__(self) -> int:
        return self.client.obj_get_info_by_fd(self.fd)["entries"]

    def items(self) -> Iterator[tuple[Any, Any]]:  # type: ignore[override]
        for key, value in self._walk():
            yield self.key_codec.decode(key), self.value_codec.decode(value)

    def values(self) -> Iterator[Any]:  # type: ignore[override]
        for _, value in self._walk():
            yield self.value_codec.decode(value)

    def _walk(self) -> Iterator[tuple[bytes, bytes]]:
        """Every element, WALK_BATCH per round trip."""
        cursor = None
        while True:
            keys, values, cursor = self.client.map_lookup_batch(self.fd, WALK_BATCH, cursor)
            yield from zip(keys, values, strict=True)
            if cursor is None:
                return

    def get_next_key(self, key: Any = None) -> Any:
        raw = self.client.map_get_next_key(self.fd, None if key is None
                                           else self.key_codec.encode(key))
        return self.key_codec.decode(raw)

    # -- batches ------------------------------------------------------------------------------
    def update_batch(self, items: Mapping[Any, Any] | Iterable[tuple[Any, Any]],
                     flags: int = BPF_ANY) -> int:
        pairs = items.items() if isinstance(items, Mapping) else items
        keys, values = [], []
        for k, v in pairs:
            keys.append(self.key_codec.encode(k))
            values.append(self.value_codec.encode(v))
        return self.client.map_update_batch(self.fd, keys, values, flags)

    def delete_batch(self, keys: Iterable[Any]) -> int:
        return self.client.map_delete_batch(self.fd, [self.key_codec.encode(k) for k in keys])

    def pop_all(self) -> dict[Any, Any]:
        """Read and delete every element (BPF_MAP_LOOKUP_AND_DELETE_BATCH)."""
        out, cursor = {}, None
        while True:
            keys, values, cursor = self.client.map_lookup_batch(self.fd, WALK_BATCH, cursor,
                                                                delete=True)
            out.update((self.key_codec.decode(k), self.value_codec.decode(v))
                       for k, v in zip(keys, values, strict=True))
            if cursor is None:
                return out

    # -- the object ---------------------------------------------------------------------------
    def pin(self, path: str | bytes) -> None:
        self.client.obj_pin(self.fd, path)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Map:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Map id {self.info['id']} {self.info['type']} {self.info['name']!r}"
                f" key {self.info['bytes_key']}B value {self.info['bytes_value']}B>")
