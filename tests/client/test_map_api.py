"""Map's Python contract (issue 12): no silent zeros for ints on a map without codecs,
dict.update semantics, and type errors that name the map and what it expected."""

from __future__ import annotations

import ctypes
import errno

import pytest
from helpers import raises_errno

from bpffs.client import BPF_NOEXIST, IntCodec, Map, MapType, StructCodec


def test_an_int_on_a_map_without_codecs_is_refused_not_stored_as_zeros(client) -> None:
    with Map.create(MapType.HASH, 4, 8, 16, name="raw", client=client) as m:
        with pytest.raises(TypeError) as info:
            m[4] = 8  # bytes(4) would be four zero bytes
        message = str(info.value)
        assert "'raw'" in message and "4 bytes" in message and "int" in message
        assert "key=int" in message  # says how to get int keys
        with pytest.raises(TypeError, match="value"):
            m[b"\1\0\0\0"] = 8
        assert dict(m.items()) == {}, "nothing was stored"
        with pytest.raises(TypeError):
            m[4]
        with pytest.raises(TypeError):
            del m[4]
        with pytest.raises(TypeError):
            m.update_batch({4: 8})
        assert len(m) == 0
        # bytes-likes are taken as they are
        m[bytearray(b"abcd")] = memoryview(bytes(range(8)))
        m[(ctypes.c_uint32 * 1)(7)] = bytes(8)
        assert m[b"abcd"] == bytes(range(8)) and m[b"\7\0\0\0"] == bytes(8)


def test_update_is_dicts(client) -> None:
    with Map.create(MapType.HASH, 4, 8, 16, key=int, value=int, client=client) as m:
        m.update({1: 10, 2: 20})
        m.update([(3, 30)])
        m.update(((4, 40),), flags=BPF_NOEXIST)
        assert dict(m.items()) == {1: 10, 2: 20, 3: 30, 4: 40}
        with raises_errno(errno.EEXIST):
            m.update({1: 11}, flags=BPF_NOEXIST)
        m.update({})
        m.update(5, 50)  # cilium's Map.Update(key, value, flags) form stays
        m.update(6, 60, BPF_NOEXIST)
        m.update_elem(7, 70, flags=BPF_NOEXIST)
        assert m[5] == 50 and m[6] == 60 and m[7] == 70
        with pytest.raises(TypeError, match="pairs"):
            m.update([1, 2])
        with pytest.raises(TypeError, match="mapping"):
            m.update(42)
        # a bad element anywhere writes nothing
        with pytest.raises(TypeError, match="key"):
            m.update({8: 80, "nine": 90})
        assert 8 not in m
    with Map.create(MapType.ARRAY, 4, 4, 4, value=int, client=client) as a:
        a.update({0: 1, 3: 4})
        assert list(a.values()) == [1, 0, 0, 4]
    with Map.create(MapType.HASH, 4, 4, 4, key=StructCodec("<HH"), client=client) as s:
        s.update({(1, 2): b"abcd"})
        assert s[(1, 2)] == b"abcd"


def test_wrong_key_types_name_the_map_and_the_expected_type(client) -> None:
    with Map.create(MapType.HASH, 4, 8, 4, name="flows", key=StructCodec("<HH"),
                    client=client) as m:
        with pytest.raises(TypeError) as info:
            m[5] = b"12345678"  # a struct key wants a tuple
        message = str(info.value)
        assert "'flows'" in message and "<HH" in message and "key" in message
        with pytest.raises(TypeError, match=r"'flows'.*<HH"):
            m[(1, 2, 3)] = b"12345678"  # one field too many
    with Map.create(MapType.HASH, 4, 8, 4, name="counts", key=int, value=int,
                    client=client) as m:
        with pytest.raises(TypeError, match=r"'counts'.*an int of 4 bytes.*str"):
            m["1"] = 1
        with pytest.raises(TypeError, match=r"'counts'.*value.*an int of 8 bytes.*float"):
            m[1] = 2.5  # not truncated to 2
        with pytest.raises(OSError, match=r"'counts'.*does not fit") as big:
            m[2**32] = 1
        assert big.value.errno == errno.EINVAL
    with Map.create(MapType.HASH, 4, 8, 4, name="raw", client=client) as m, \
            pytest.raises(OSError, match=r"'raw'.*key.*expected 4 bytes, got 3") as err:
        m[b"abc"] = bytes(8)
    assert err.value.errno == errno.EINVAL


def test_ctypes_scalars_refuse_ints_they_would_wrap(client) -> None:
    with Map.create(MapType.HASH, 4, 2, 4, key=IntCodec(4), value=ctypes.c_int16,
                    client=client) as m:
        m[1] = -2
        with raises_errno(errno.EINVAL):
            m[2] = 70000  # ctypes would store 4464
        assert dict(m.items()) == {1: -2}
