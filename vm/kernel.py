"""The running kernel's bpf(2), through ctypes: the oracle for differential tests and the
baseline of every benchmark. Nothing in the daemon depends on it.

Each call packs the command's part of `union bpf_attr` as the uapi header lays it out and raises
OSError with the kernel's errno. `available()` says whether this process may use it (root and a
kernel with bpf(2)); callers skip cleanly when it is False.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from collections.abc import Iterator

from .uapi import BPF_ANY, Cmd, MapType, ProgType

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
_ATTR_SIZE = 128  # larger than every layout used here; the kernel checks the tail is zero
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: Cmd, attr: ctypes.Array) -> int:
    if _SYS_BPF is None:
        raise OSError(errno.ENOSYS, "bpf(2): unsupported architecture")
    ret = _libc.syscall(_SYS_BPF, int(cmd), attr, _ATTR_SIZE)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd.name}): {os.strerror(err)}")
    return ret


def _attr(payload: bytes) -> ctypes.Array:
    return ctypes.create_string_buffer(payload.ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)


def _addr(buf: ctypes.Array | None) -> int:
    return 0 if buf is None else ctypes.addressof(buf)


_available: bool | None = None


def available() -> bool:
    """True when this process can create kernel maps (root on a bpf-capable kernel)."""
    global _available
    if _available is None:
        try:
            os.close(map_create(MapType.ARRAY, 4, 4, 1))
            _available = True
        except OSError:
            _available = False
    return _available


def map_create(
    map_type: int, key_size: int, value_size: int, max_entries: int, map_flags: int = 0
) -> int:
    return _bpf(Cmd.MAP_CREATE, _attr(struct.pack("IIIII", map_type, key_size, value_size,
                                                 max_entries, map_flags)))


def _elem_attr(fd: int, key: ctypes.Array | None, value: ctypes.Array | None,
               flags: int = 0) -> ctypes.Array:
    return _attr(struct.pack("I4xQQQ", fd, _addr(key), _addr(value), flags))


class MapOps:
    """Element operations on one kernel map with buffers allocated once (for benchmarks)."""

    def __init__(self, fd: int, key_size: int, value_size: int):
        self.fd, self.key_size, self.value_size = fd, key_size, value_size
        self._key = ctypes.create_string_buffer(key_size)
        self._value = ctypes.create_string_buffer(value_size)
        self._update = _elem_attr(fd, self._key, self._value)
        self._lookup = _elem_attr(fd, self._key, self._value)

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        self._key.raw, self._value.raw = key, value
        struct.pack_into("Q", self._update, 24, flags)
        _bpf(Cmd.MAP_UPDATE_ELEM, self._update)

    def lookup(self, key: bytes) -> bytes:
        self._key.raw = key
        _bpf(Cmd.MAP_LOOKUP_ELEM, self._lookup)
        return self._value.raw


def map_update_elem(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    _bpf(Cmd.MAP_UPDATE_ELEM, _elem_attr(fd, k, v, flags))


def map_lookup_elem(fd: int, key: bytes, value_size: int) -> bytes:
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value_size)
    _bpf(Cmd.MAP_LOOKUP_ELEM, _elem_attr(fd, k, v))
    return v.raw


def map_delete_elem(fd: int, key: bytes) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    _bpf(Cmd.MAP_DELETE_ELEM, _elem_attr(fd, k, None))


def map_get_next_key(fd: int, key: bytes | None, key_size: int) -> bytes:
    k = None if key is None else ctypes.create_string_buffer(key, len(key))
    nxt = ctypes.create_string_buffer(key_size)
    _bpf(Cmd.MAP_GET_NEXT_KEY, _elem_attr(fd, k, nxt))
    return nxt.raw


def map_update_batch(fd: int, keys: bytes, values: bytes, count: int, flags: int = BPF_ANY) -> int:
    """BPF_MAP_UPDATE_BATCH over `count` packed keys and values; returns the count done."""
    k = ctypes.create_string_buffer(keys, len(keys))
    v = ctypes.create_string_buffer(values, len(values))
    # struct { u64 in_batch, out_batch, keys, values; u32 count, map_fd; u64 elem_flags, flags; }
    attr = _attr(struct.pack("QQQQIIQQ", 0, 0, _addr(k), _addr(v), count, fd, flags, 0))
    _bpf(Cmd.MAP_UPDATE_BATCH, attr)
    return struct.unpack_from("I", attr, 32)[0]


def map_lookup_batch(fd: int, key_size: int, value_size: int, count: int
                     ) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of a map, read by BPF_MAP_LOOKUP_BATCH `count` at a time."""
    keys = ctypes.create_string_buffer(key_size * count)
    values = ctypes.create_string_buffer(value_size * count)
    in_batch, out_batch = ctypes.create_string_buffer(8), ctypes.create_string_buffer(8)
    first = True
    while True:
        attr = _attr(struct.pack("QQQQIIQQ", 0 if first else _addr(in_batch),
                                 _addr(out_batch), _addr(keys), _addr(values), count, fd, 0, 0))
        try:
            _bpf(Cmd.MAP_LOOKUP_BATCH, attr)
            done = False
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
            done = True
        got = struct.unpack_from("I", attr, 32)[0]
        k, v = keys.raw, values.raw
        for i in range(got):
            yield k[i * key_size:(i + 1) * key_size], v[i * value_size:(i + 1) * value_size]
        if done:
            return
        in_batch.raw, first = out_batch.raw, False


def prog_load(
    prog_type: int,
    insns: bytes,
    license: str = "GPL",
    log_level: int = 0,
    log_size: int = 65536,
    kern_version: int = 0,
    btf_fd: int = 0,
    func_info: tuple[tuple[int, int], ...] = (),
) -> tuple[int, str]:
    """BPF_PROG_LOAD; returns (fd, verifier log). On rejection the OSError's
    `verifier_log` attribute holds the log. `func_info` is (insn offset, BTF FUNC type id) of
    each function, for what the kernel allows only with BTF (tail calls in subprograms)."""
    lic = ctypes.create_string_buffer(license.encode())
    code = ctypes.create_string_buffer(insns, len(insns))
    log = ctypes.create_string_buffer(log_size) if log_level else None
    payload = struct.pack("IIQQIIQI", prog_type, len(insns) // 8, _addr(code), _addr(lic),
                          log_level, log_size if log_level else 0, _addr(log), kern_version)
    finfo = None
    if func_info:
        records = b"".join(struct.pack("II", off, type_id) for off, type_id in func_info)
        finfo = ctypes.create_string_buffer(records, len(records))
        # ... u32 prog_flags; char prog_name[16]; u32 prog_ifindex, expected_attach_type,
        # prog_btf_fd, func_info_rec_size; u64 func_info; u32 func_info_cnt
        payload += struct.pack("<I16sIIIIQI", 0, b"", 0, 0, btf_fd, 8, _addr(finfo),
                               len(func_info))
    attr = _attr(payload)
    try:
        fd = _bpf(Cmd.PROG_LOAD, attr)
    except OSError as e:
        e.verifier_log = log.value.decode(errors="replace") if log is not None else ""
        raise
    return fd, (log.value.decode(errors="replace") if log is not None else "")


def btf_load(blob: bytes, log_size: int = 65536) -> int:
    """BPF_BTF_LOAD of a raw BTF blob (header, types, strings); returns the BTF fd. On
    rejection the OSError's `verifier_log` holds the kernel's BTF log."""
    buf = ctypes.create_string_buffer(blob, len(blob))
    log = ctypes.create_string_buffer(log_size)
    try:
        return _bpf(Cmd.BTF_LOAD, _attr(struct.pack("QQIII", _addr(buf), _addr(log), len(blob),
                                                    log_size, 1)))
    except OSError as e:
        e.verifier_log = log.value.decode(errors="replace")
        raise


def prog_test_run(
    fd: int,
    data_in: bytes,
    repeat: int = 1,
    data_size_out: int | None = None,
    ctx_in: bytes | None = None,
    ctx_size_out: int = 0,
) -> tuple[int, bytes, int, bytes]:
    """BPF_PROG_TEST_RUN; returns (retval, data_out, duration in ns per run, ctx_out)."""
    out_cap = data_size_out if data_size_out is not None else len(data_in) + 256
    din = ctypes.create_string_buffer(data_in, len(data_in))
    dout = ctypes.create_string_buffer(out_cap)
    cin = None if ctx_in is None else ctypes.create_string_buffer(ctx_in, len(ctx_in))
    cout = ctypes.create_string_buffer(ctx_size_out) if ctx_size_out else None
    # struct { u32 prog_fd, retval, data_size_in, data_size_out; u64 data_in, data_out;
    #          u32 repeat, duration, ctx_size_in, ctx_size_out; u64 ctx_in, ctx_out; ... }
    attr = _attr(struct.pack("IIIIQQIIIIQQ", fd, 0, len(data_in), out_cap, _addr(din),
                             _addr(dout), repeat, 0, 0 if cin is None else len(ctx_in),
                             ctx_size_out, _addr(cin), _addr(cout)))
    _bpf(Cmd.PROG_TEST_RUN, attr)
    retval, _, size_out = struct.unpack_from("III", attr, 4)
    duration, _, ctx_out_size = struct.unpack_from("III", attr, 36)
    ctx_out = cout.raw[:ctx_out_size] if cout is not None else b""
    return retval, dout.raw[:size_out], duration, ctx_out


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(os.fsencode(path))
    _bpf(Cmd.OBJ_PIN, _attr(struct.pack("QI", _addr(p), fd)))


def obj_get(path: str, file_flags: int = 0) -> int:
    p = ctypes.create_string_buffer(os.fsencode(path))
    return _bpf(Cmd.OBJ_GET, _attr(struct.pack("QII", _addr(p), 0, file_flags)))


__all__ = [
    "MapOps",
    "ProgType",
    "available",
    "btf_load",
    "map_create",
    "map_delete_elem",
    "map_get_next_key",
    "map_lookup_elem",
    "map_update_batch",
    "map_update_elem",
    "obj_get",
    "obj_pin",
    "prog_load",
    "prog_test_run",
]
