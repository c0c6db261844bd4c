"""A small reader of BTF (the `.BTF` section of a clang-built object): just enough of the type
graph to read libbpf's BTF-defined map definitions in `.maps`.

libbpf's macros encode each attribute of a map as a pointer member of an anonymous struct:
`__uint(name, N)` is `int (*name)[N]` (the value is the array length) and `__type(name, T)` is
`typeof(T) *name` (the value is the size of T). Layout: include/uapi/linux/btf.h.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field
from enum import IntEnum

from bpffs.vm.errors import BpfError

BTF_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type/str offsets+lengths
_TYPE = struct.Struct("<III")  # name_off, info (vlen | kind << 24 | kind_flag << 31), size/type
_MAX_RESOLVE_DEPTH = 32  # libbpf's MAX_RESOLVE_DEPTH: longer modifier chains are malformed


class Kind(IntEnum):
    """BTF_KIND_* values (include/uapi/linux/btf.h)."""

    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


# Bytes that follow the common header, per kind: (fixed, per vlen entry).
_EXTRA = {Kind.INT: (4, 0), Kind.ARRAY: (12, 0), Kind.STRUCT: (0, 12), Kind.UNION: (0, 12),
          Kind.ENUM: (0, 8), Kind.FUNC_PROTO: (0, 8), Kind.VAR: (4, 0), Kind.DATASEC: (0, 12),
          Kind.DECL_TAG: (4, 0), Kind.ENUM64: (0, 12)}
_MODIFIERS = {Kind.TYPEDEF, Kind.VOLATILE, Kind.CONST, Kind.RESTRICT, Kind.TYPE_TAG}
_SIZED = {Kind.INT, Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.FLOAT, Kind.ENUM64}


@dataclass
class BtfType:
    kind: Kind
    name: str
    size_or_type: int  # size for sized kinds, the referenced type id otherwise
    members: list[tuple[str, int, int]] = field(default_factory=list)  # (name, type, offset)
    array: tuple[int, int] | None = None  # (element type, nelems)


def _malformed(message: str) -> BpfError:
    return BpfError(errno.EINVAL, f"malformed BTF: {message}")


class Btf:
    """The types of one .BTF section; type id 0 is void."""

    def __init__(self, data: bytes):
        if len(data) < _HEADER.size:
            raise _malformed(f"{len(data)} bytes is shorter than the header")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = \
            _HEADER.unpack_from(data)
        if magic != BTF_MAGIC:
            raise _malformed(f"bad magic {magic:#x} (big-endian objects are not supported)")
        if version != 1:
            raise _malformed(f"unsupported version {version}")
        body = data[hdr_len:]
        if (hdr_len < _HEADER.size or type_off + type_len > len(body)
                or str_off + str_len > len(body)):
            raise _malformed("section offsets point past its end")
        self._strings = body[str_off:str_off + str_len]
        self.types: list[BtfType | None] = [None]
        self._parse(body[type_off:type_off + type_len])

    def string(self, offset: int) -> str:
        """The string at offset in the string section."""
        if offset >= len(self._strings) and offset:
            raise _malformed(f"string offset {offset} past the string section")
        end = self._strings.find(b"\0", offset)
        return self._strings[offset:end if end >= 0 else None].decode(errors="replace")

    def _parse(self, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            if pos + _TYPE.size > len(data):
                raise _malformed("truncated type record")
            name_off, info, size_or_type = _TYPE.unpack_from(data, pos)
            pos += _TYPE.size
            vlen, raw_kind = info & 0xFFFF, (info >> 24) & 0x1F
            try:
                kind = Kind(raw_kind)
            except ValueError:
                raise _malformed(f"unknown kind {raw_kind} of type {len(self.types)}") from None
            fixed, per_entry = _EXTRA.get(kind, (0, 0))
            end = pos + fixed + per_entry * vlen
            if end > len(data):
                raise _malformed(f"truncated {kind.name} record of type {len(self.types)}")
            t = BtfType(kind, self.string(name_off), size_or_type)
            if kind == Kind.ARRAY:
                elem, _index, nelems = struct.unpack_from("<III", data, pos)
                t.array = (elem, nelems)
            elif kind in (Kind.STRUCT, Kind.UNION, Kind.DATASEC):
                for i in range(vlen):
                    a, b, c = struct.unpack_from("<III", data, pos + 12 * i)
                    # struct: (name_off, type, bit offset); datasec: (var type, offset, size)
                    t.members.append((self.string(a), b, c) if kind != Kind.DATASEC
                                     else ("", a, b))
            self.types.append(t)
            pos = end

    def type(self, type_id: int) -> BtfType:
        """The type with that id (EINVAL for a dangling reference)."""
        if not 0 < type_id < len(self.types):
            raise _malformed(f"reference to type {type_id}, which does not exist")
        t = self.types[type_id]
        assert t is not None
        return t

    def skip_modifiers(self, type_id: int) -> BtfType:
        """The type behind typedefs and const/volatile/restrict."""
        t = self.type(type_id)
        for _ in range(_MAX_RESOLVE_DEPTH):
            if t.kind not in _MODIFIERS:
                return t
            t = self.type(t.size_or_type)
        raise _malformed(f"modifier chain of type {type_id} is too long")

    def size_of(self, type_id: int, depth: int = 0) -> int:
        """The type's size in bytes, as the compiler laid it out."""
        if depth > _MAX_RESOLVE_DEPTH:
            raise _malformed(f"type {type_id} nests too deeply")
        t = self.skip_modifiers(type_id)
        if t.kind in _SIZED:
            return t.size_or_type
        if t.kind == Kind.PTR:
            return 8
        if t.kind == Kind.ARRAY and t.array:
            return t.array[1] * self.size_of(t.array[0], depth + 1)
        raise _malformed(f"type {type_id} ({t.kind.name}) has no size")

    def datasec(self, name: str) -> list[tuple[str, int]]:
        """The variables of a data section: (name, type id of the variable's type)."""
        for t in self.types[1:]:
            if t is not None and t.kind == Kind.DATASEC and t.name == name:
                out = []
                for _, var_id, _offset in t.members:
                    var = self.type(var_id)
                    if var.kind != Kind.VAR:
                        raise _malformed(f"{name} entry {var_id} is a {var.kind.name}, not a VAR")
                    out.append((var.name, var.size_or_type))
                return out
        return []

    def map_attributes(self, name: str, type_id: int) -> dict[str, int]:
        """The attributes of one BTF-defined map: {"type": 1, "key_size": 4, ...}. `key` and
        `value` (the __type form) become key_size and value_size."""
        t = self.skip_modifiers(type_id)
        if t.kind != Kind.STRUCT:
            raise BpfError(errno.EINVAL, f"map '{name}' in .maps is a {t.kind.name}, not a"
                           " struct of __uint/__type members")
        attrs: dict[str, int] = {}
        for member, member_type, _ in t.members:
            ptr = self.skip_modifiers(member_type)
            if ptr.kind != Kind.PTR:
                raise BpfError(errno.EINVAL, f"map '{name}': member '{member}' is not a pointer"
                               " (declare it with __uint or __type)")
            target = self.skip_modifiers(ptr.size_or_type)
            if member in ("key", "value"):
                attrs[f"{member}_size"] = self.size_of(ptr.size_or_type)
            elif target.kind == Kind.ARRAY and target.array is not None:
                attrs[member] = target.array[1]
            else:
                raise BpfError(errno.EINVAL, f"map '{name}': member '{member}' is not an"
                               " __uint (int (*name)[N])")
        return attrs
