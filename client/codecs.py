"""Key and value codecs for Map: how Python values become a map's fixed-size bytes.

    Map(fd, key=int, value=int)                  little-endian unsigned ints of the map's sizes
    Map(fd, key=IntCodec(4, signed=True))
    Map(fd, key=StructCodec("<IHH"))             tuples (or a namedtuple class: Struct(fmt, T))
    Map(fd, value=MyCtypesStructure)             ctypes structures and scalars
    Map(fd)                                      bytes in and out (the default)

Without a codec a map takes bytes-like objects only: an int is refused with TypeError rather
than turned into bytes (bytes(4) is four zero bytes, and the byte order would be a guess).
Give key=int / value=int for little-endian unsigned ints of the map's sizes.
"""

from __future__ import annotations

import ctypes
import errno
import operator
import struct
from typing import Any

from bpffs.vm.errors import BpfError


class Codec:
    """How values of one Python type become a map field's fixed-size bytes, and back.
    Subclass it (size, encode, decode) for a type of your own."""

    size: int
    expects = "a value"  # what encode takes, for error messages

    def encode(self, value: Any) -> bytes:
        """value -> exactly `size` bytes; TypeError/ValueError/BpfError(EINVAL) when it
        cannot be."""
        raise NotImplementedError

    def decode(self, data: bytes) -> Any:
        """`size` bytes -> the Python value."""
        raise NotImplementedError


class BytesCodec(Codec):
    """Bytes in and out, unchanged (the default): bytes, bytearray, memoryview or any other
    buffer of exactly `size` bytes."""

    def __init__(self, size: int):
        self.size = size
        self.expects = f"{size} bytes (bytes-like)"

    def encode(self, value: Any) -> bytes:
        if isinstance(value, bytes):
            data = value
        else:
            try:
                data = memoryview(value).tobytes()
            except TypeError:
                hint = (" (no codec for ints: pass bytes, or give key=int / value=int or a"
                        " codec)" if isinstance(value, int) else "")
                raise TypeError(f"expected {self.size} bytes (bytes-like), got"
                                f" {type(value).__name__}{hint}") from None
        if len(data) != self.size:
            raise BpfError(errno.EINVAL, f"expected {self.size} bytes, got {len(data)}")
        return data

    def decode(self, data: bytes) -> bytes:
        return data


class IntCodec(Codec):
    """Python ints as `size`-byte integers (little-endian, unsigned unless signed=True).
    Only true integers are taken: a float or a str is a TypeError, not truncated."""

    def __init__(self, size: int, signed: bool = False, byteorder: str = "little"):
        self.size, self.signed, self.byteorder = size, signed, byteorder
        self.expects = f"an int of {size} bytes"

    def encode(self, value: Any) -> bytes:
        try:
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"expected an int of {self.size} bytes, got"
                            f" {type(value).__name__}") from None
        try:
            return value.to_bytes(self.size, self.byteorder, signed=self.signed)
        except OverflowError:
            raise BpfError(errno.EINVAL, f"{value} does not fit in {self.size} bytes") from None

    def decode(self, data: bytes) -> int:
        return int.from_bytes(data, self.byteorder, signed=self.signed)


class StructCodec(Codec):
    """Tuples (or `factory`, such as a namedtuple class, on the way out) packed with a
    struct format."""

    def __init__(self, fmt: str, factory: Any = None):
        self.struct = struct.Struct(fmt)
        self.size = self.struct.size
        self.factory = factory
        self.expects = f"a tuple for struct format {fmt!r}"

    def encode(self, value: Any) -> bytes:
        try:
            return self.struct.pack(*value)
        except TypeError:
            raise TypeError(f"expected {self.expects}, got {type(value).__name__}") from None
        except struct.error as e:
            raise TypeError(f"expected {self.expects}: {e}") from None

    def decode(self, data: bytes) -> Any:
        fields = self.struct.unpack(data)
        return self.factory(*fields) if self.factory else fields


class CtypesCodec(Codec):
    """ctypes structures, unions, arrays and scalars (bcc's table types); a scalar type's
    values come back as plain Python values."""

    def __init__(self, ctype: type):
        self.ctype = ctype
        self.size = ctypes.sizeof(ctype)
        self.expects = f"a {ctype.__name__} (ctypes)"

    def encode(self, value: Any) -> bytes:
        if not isinstance(value, self.ctype):
            try:
                converted = self.ctype(value)
            except TypeError as e:
                raise TypeError(f"expected {self.expects}, got {type(value).__name__}: {e}"
                                ) from None
            if (isinstance(value, int) and isinstance(converted, ctypes._SimpleCData)
                    and converted.value != value):  # ctypes wraps ints silently
                raise BpfError(errno.EINVAL, f"{value} does not fit in a"
                               f" {self.ctype.__name__}")
            value = converted
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
