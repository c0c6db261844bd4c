"""Key and value codecs for Map: how Python values become a map's fixed-size bytes.

    Map(fd, key=int, value=int)                  little-endian unsigned ints of the map's sizes
    Map(fd, key=IntCodec(4, signed=True))
    Map(fd, key=StructCodec("<IHH"))             tuples (or a namedtuple class: Struct(fmt, T))
    Map(fd, value=MyCtypesStructure)             ctypes structures and scalars
    Map(fd)                                      bytes in and out (the default)
"""

from __future__ import annotations

import ctypes
import errno
import struct
from typing import Any

from bpffs.vm.errors import BpfError


class Codec:
    size: int

    def encode(self, value: Any) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes) -> Any:
        raise NotImplementedError


class BytesCodec(Codec):
    def __init__(self, size: int):
        self.size = size

    def encode(self, value: Any) -> bytes:
        data = bytes(value)
        if len(data) != self.size:
            raise BpfError(errno.EINVAL, f"expected {self.size} bytes, got {len(data)}")
        return data

    def decode(self, data: bytes) -> bytes:
        return data


class IntCodec(Codec):
    def __init__(self, size: int, signed: bool = False, byteorder: str = "little"):
        self.size, self.signed, self.byteorder = size, signed, byteorder

    def encode(self, value: Any) -> bytes:
        try:
            return int(value).to_bytes(self.size, self.byteorder, signed=self.signed)
        except OverflowError:
            raise BpfError(errno.EINVAL, f"{value} does not fit in {self.size} bytes") from None

    def decode(self, data: bytes) -> int:
        return int.from_bytes(data, self.byteorder, signed=self.signed)


class StructCodec(Codec):
    def __init__(self, fmt: str, factory: Any = None):
        self.struct = struct.Struct(fmt)
        self.size = self.struct.size
        self.factory = factory

    def encode(self, value: Any) -> bytes:
        return self.struct.pack(*value)

    def decode(self, data: bytes) -> Any:
        fields = self.struct.unpack(data)
        return self.factory(*fields) if self.factory else fields


class CtypesCodec(Codec):
    def __init__(self, ctype: type):
        self.ctype = ctype
        self.size = ctypes.sizeof(ctype)

    def encode(self, value: Any) -> bytes:
        if not isinstance(value, self.ctype):
            value = self.ctype(value)
        return bytes(value)

    def decode(self, data: bytes) -> Any:
        obj = self.ctype.from_buffer_copy(data)
        return obj.value if isinstance(obj, ctypes._SimpleCData) else obj


def codec_for(spec: Any, size: int) -> Codec:
    """A codec from what the caller gave: None (bytes), int, a format string, a ctypes type or
    a Codec. The codec's size must match the map's."""
    if spec is None or spec is bytes:
        codec: Codec = BytesCodec(size)
    elif spec is int:
        codec = IntCodec(size)
    elif isinstance(spec, str):
        codec = StructCodec(spec)
    elif isinstance(spec, type) and issubclass(spec, ctypes._SimpleCData | ctypes.Structure
                                               | ctypes.Union | ctypes.Array):
        codec = CtypesCodec(spec)
    elif isinstance(spec, Codec):
        codec = spec
    else:
        raise TypeError(f"cannot make a codec from {spec!r}")
    if codec.size != size:
        raise BpfError(errno.EINVAL, f"codec of {codec.size} bytes for a field of {size} bytes")
    return codec
