"""Map: a bpffsd map as a Python mapping (bcc's table API, on a real fd).

    flows = Map.create(MapType.HASH, 4, 8, 1024, name="flows", key=int, value=int)
    flows[7] = 1                     # BPF_ANY update
    flows.update_batch({1: 2, 3: 4})
    for key, value in flows.items(): ...
    flows.pin("/sys/fs/bpf/flows"); Map.pinned("/sys/fs/bpf/flows", key=int, value=int)

Missing keys raise KeyError (the client's ENOENT); every other failure is a BpfError with the
kernel's errno. Array maps take int indices and cannot delete; len() of an array is its
max_entries, of a hash its element count.

Without codecs, keys and values are bytes of the map's sizes: an int is a TypeError (not
`bytes(4)`, four zeros), and a key or value the codec cannot take is a TypeError (wrong type)
or BpfError(EINVAL) (wrong size, out of range) naming the map and what it expected.
`update` is dict's (`m.update({k: v})`, pairs, keywords) and also takes `m.update(key, value,
flags)`, cilium's Map.Update; `update_elem` is the explicit one-element form.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any, Self

from bpffs.vm.errors import BpfError
from bpffs.vm.uapi import BPF_ANY, BPF_F_MMAPABLE, MapType

from . import calls
from .codecs import Codec, IntCodec, codec_for
from .direct import Contended, Direct
from .sync import Client, default_client

WALK_BATCH = 4096


class FdObject:
    """An object's fd (a map's, a program's), closed with its wrapper when owned (by close()
    or at the end of a `with` block); the object lives on while pinned or held."""

    client: Client
    fd: int
    owned: bool

    def pin(self, path: str | bytes) -> None:
        """BPF_OBJ_PIN at path, on a bpffsd mount (the pin keeps the object alive: a map, a
        program loaded)."""
        self.client.obj_pin(self.fd, path)

    def fileno(self) -> int:
        """The object's fd: a real fd (os.dup, fork, SCM_RIGHTS share it; a program's may be
        stored in a prog_array)."""
        return self.fd

    def close(self) -> None:
        """Close the fd when owned (the object lives on while pinned or held, a program also
        while in a prog_array)."""
        if self.owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Map(FdObject, MutableMapping):
    """A map fd as a dict: `m[k]`, `m[k] = v`, `del m[k]`, `in`, iteration, `items()`, and
    the batch calls. key and value say how Python values become the map's bytes (see
    bpffs.client.codecs): None for bytes, int, a struct format, a ctypes type or a Codec."""

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
        self._direct: Direct | str | None = None  # attached on the first read
        self._memory: Direct | None = None  # memory() mapped
        # an array indexed by plain ints reads value i without encoding the key
        self._int_index = self.map_type == MapType.ARRAY and isinstance(self.key_codec,
                                                                        IntCodec)

    @property
    def _is_array(self) -> bool:
        return self.map_type != MapType.HASH

    @classmethod
    def create(cls, map_type: int, key_size: int, value_size: int, max_entries: int,
               name: str = "", flags: int = 0, key: Any = None, value: Any = None,
               client: Client | None = None) -> Map:
        """A new map (BPF_MAP_CREATE), owned by the returned Map: it lives while the Map
        is open or something pins or holds it."""
        client = client or default_client()
        fd = client.map_create(map_type, key_size, value_size, max_entries, flags, name)
        return cls(fd, key, value, client)

    @classmethod
    def pinned(cls, path: str | bytes, key: Any = None, value: Any = None,
               client: Client | None = None, file_flags: int = 0) -> Map:
        """The map pinned at path (BPF_OBJ_GET), as cilium's LoadPinnedMap."""
        client = client or default_client()
        return cls(client.obj_get(path, file_flags), key, value, client)

    # -- codecs with the map named in their errors ---------------------------------------------
    def _describe(self) -> str:
        name = f"'{self.info['name']}'" if self.info.get("name") else f"id {self.info['id']}"
        return (f"{self.info['type']} map {name} (key {self.info['bytes_key']} bytes, value"
                f" {self.info['bytes_value']} bytes)")

    def _encode(self, codec: Codec, data: Any, what: str) -> bytes:
        try:
            return codec.encode(data)
        except BpfError as e:
            raise BpfError(e.errno, f"{self._describe()}: {what} {data!r:.80}: {e.strerror}"
                           ) from None
        except (TypeError, ValueError, struct.error, OverflowError) as e:
            kind = ValueError if isinstance(e, ValueError) else TypeError
            detail = str(e) if "expected" in str(e) else f"expected {codec.expects}: {e}"
            raise kind(f"{self._describe()}: bad {what} {data!r:.80}: {detail}") from None

    def encode_key(self, key: Any) -> bytes:
        """The key's bytes by the key codec (TypeError/EINVAL naming this map if it cannot)."""
        return self._encode(self.key_codec, key, "key")

    def encode_value(self, value: Any) -> bytes:
        """The value's bytes by the value codec (TypeError/EINVAL naming this map)."""
        return self._encode(self.value_codec, value, "value")

    # -- reads in place (bpffs.client.direct) ------------------------------------------------
    @property
    def direct(self) -> Direct | None:
        """The map's memory mapped into this process, which reads use (the first read maps
        it); None when reads go through the socket, and `direct_reason` says why."""
        found = self._direct
        if found is None:
            found = self._direct = self.client.map_direct(self.fd)
        return found if type(found) is Direct else None

    @property
    def direct_reason(self) -> str | None:
        """Why reads of this map go through the socket (None: they are read in place)."""
        return None if self.direct is not None else str(self._direct)

    def memory(self) -> memoryview:
        """The map's values in place, as the kernel's mmap of an array map: value i at
        i * round_up(value_size, 8). Writable when the array was created BPF_F_MMAPABLE and
        this fd may write: such writes need no request, and the daemon journals them within
        its flush interval, as a program's. Read-only otherwise, and for hash maps (whose
        layout is bpffs.vm.maps.layout's). The mapping lives while the Map does."""
        writable = self.map_type == MapType.ARRAY and bool(self.info["flags"] & BPF_F_MMAPABLE)
        try:
            self._memory = self.client.map_memory(self.fd, writable)
        except BpfError as e:
            if not writable or e.errno != errno.EPERM:  # EPERM: a read-only fd
                raise
            self._memory = self.client.map_memory(self.fd, False)
        return self._memory.memory

    def close(self) -> None:
        """Close the fd when owned, and let go of the map's memory here (unmapped once no
        view of it from memory() is left)."""
        if self._direct is not None and self.fd >= 0:
            try:
                calls.forget_mapping(self.client.session, os.fstat(self.fd).st_ino)
            except OSError:
                pass  # closed behind our back: forget_closed will see it
        self._direct = self._memory = None
        super().close()

    # -- the mapping protocol -----------------------------------------------------------------
    def __getitem__(self, key: Any) -> Any:
        mapped = self._direct if type(self._direct) is Direct else self.direct
        if mapped is not None and not self.client.owes_replies:
            try:
                if self._int_index and type(key) is int and key >= 0:
                    raw = mapped.reader.lookup(key)  # type: ignore[arg-type]
                else:  # the codec's bytes have the key's size: no check needed
                    raw = mapped.lookup_checked(self.encode_key(key))
            except Contended:
                raw = NotImplemented
            if raw is None:
                raise KeyError(key)
            if raw is not NotImplemented:
                return self.value_codec.decode(raw)
        try:
            raw = self.client.map_lookup_elem(self.fd, self.encode_key(key))
        except BpfError as e:
            if e.errno == errno.ENOENT:
                raise KeyError(key) from None
            raise
        return self.value_codec.decode(raw)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.update_elem(key, value)

    def update_elem(self, key: Any, value: Any, flags: int = BPF_ANY) -> None:
        """One element with explicit flags (BPF_ANY, BPF_NOEXIST: EEXIST if present,
        BPF_EXIST: ENOENT if absent), as libbpf's bpf_map_update_elem."""
        self.client.map_update_elem(self.fd, self.encode_key(key), self.encode_value(value),
                                    flags)

    def update(self, *args: Any, flags: int = BPF_ANY, **kwargs: Any) -> None:  # type: ignore[override]
        """dict.update: `m.update({k: v, ...})`, `m.update([(k, v), ...])`, keywords. Every
        key and value is encoded before anything is written, so a bad one writes nothing;
        flags apply to each element (so a key named "flags" goes in the mapping, not as a
        keyword). Also `m.update(key, value[, flags])` for one element (cilium's Map.Update;
        update_elem is the explicit spelling)."""
        if len(args) in (2, 3) and not kwargs:
            if len(args) == 3:
                flags = args[2]
            self.update_elem(args[0], args[1], flags)
            return
        if len(args) > 1:
            raise TypeError(f"Map.update takes a mapping or pairs (dict.update), or key,"
                            f" value[, flags]; got {len(args)} positional arguments")
        other = args[0] if args else ()
        pairs = other.items() if isinstance(other, Mapping) else other
        try:
            items = list(pairs)
        except TypeError:
            raise TypeError(f"Map.update: expected a mapping or an iterable of (key, value)"
                            f" pairs, got {type(other).__name__}") from None
        items += kwargs.items()
        keys, values = [], []
        for item in items:
            try:
                k, v = item
            except (TypeError, ValueError):
                raise TypeError(f"Map.update: expected (key, value) pairs, got"
                                f" {item!r:.80}") from None
            keys.append(self.encode_key(k))
            values.append(self.encode_value(v))
        if not keys:
            return
        if self.map_type in (MapType.PROG_ARRAY, MapType.PERF_EVENT_ARRAY):
            for k, v in zip(keys, values, strict=True):  # fd values: bound one by one
                self.client.map_update_elem(self.fd, k, v, flags)
        else:
            self.client.map_update_batch(self.fd, keys, values, flags)

    def __delitem__(self, key: Any) -> None:
        try:
            self.client.map_delete_elem(self.fd, self.encode_key(key))
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
        """A hash map's element count; an array's max_entries."""
        return self.client.obj_get_info_by_fd(self.fd)["entries"]

    def items(self) -> Iterator[tuple[Any, Any]]:  # type: ignore[override]
        """Every (key, value), read in batches (a live view: concurrent changes may show)."""
        for key, value in self._walk():
            yield self.key_codec.decode(key), self.value_codec.decode(value)

    def values(self) -> Iterator[Any]:  # type: ignore[override]
        """Every value, read in batches."""
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
        """BPF_MAP_GET_NEXT_KEY: the key after `key` (the first with None); ENOENT at the
        end."""
        raw = self.client.map_get_next_key(self.fd, None if key is None
                                           else self.encode_key(key))
        return self.key_codec.decode(raw)

    # -- batches ------------------------------------------------------------------------------
    def update_batch(self, items: Mapping[Any, Any] | Iterable[tuple[Any, Any]],
                     flags: int = BPF_ANY) -> int:
        """BPF_MAP_UPDATE_BATCH: returns how many were written (on failure a BatchError's
        `count` says how many were before it)."""
        pairs = items.items() if isinstance(items, Mapping) else items
        keys, values = [], []
        for k, v in pairs:
            keys.append(self.encode_key(k))
            values.append(self.encode_value(v))
        return self.client.map_update_batch(self.fd, keys, values, flags)

    def delete_batch(self, keys: Iterable[Any]) -> int:
        """BPF_MAP_DELETE_BATCH: returns how many were deleted."""
        return self.client.map_delete_batch(self.fd, [self.encode_key(k) for k in keys])

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

    # -- the object (pin, fileno, close, with: FdObject) ---------------------------------------
    def __repr__(self) -> str:
        return (f"<Map id {self.info['id']} {self.info['type']} {self.info['name']!r}"
                f" key {self.info['bytes_key']}B value {self.info['bytes_value']}B>")
