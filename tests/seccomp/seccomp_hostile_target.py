"""A target that makes hostile bpf() calls and prints each call's errno as JSON.

    python3 seccomp_hostile_target.py PIN

Run plainly against a kernel bpffs pin it shows the kernel's answers; run under `bpffs exec`
against a bpffsd pin, the supervisor's. The test compares the two. Raw syscalls through ctypes,
as a static or Go binary would make them (no libbpf in the way).
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys

NR_BPF = 321  # x86_64
MAP_LOOKUP_ELEM, OBJ_GET, OBJ_GET_INFO_BY_FD = 1, 7, 15
GARBAGE_CMD = 9999
UNMAPPED = 0x10  # the first page is never mapped
KERNEL_ADDRESS = 0xFFFF888000000000  # x86_64's direct map: never the caller's

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def bpf(cmd: int, attr: int, size: int) -> int:
    """The call's result, or -errno."""
    r = libc.syscall(ctypes.c_long(NR_BPF), ctypes.c_long(cmd), ctypes.c_void_p(attr),
                     ctypes.c_long(size))
    return -ctypes.get_errno() if r < 0 else r


KEEP: list[ctypes.Array] = []  # buffers live until exit: the kernel gets their addresses


def buf(data: bytes) -> ctypes.Array:
    b = ctypes.create_string_buffer(data, len(data))
    KEEP.append(b)
    return b


def at(data: bytes) -> int:
    """The address of a buffer holding data."""
    return ctypes.addressof(buf(data))


def info_written(fd: int) -> list:
    """info_len written back and the map's shape (type, key, value, max_entries, flags,
    name) from a 40-byte info request: the kernel writes only what fits."""
    info = buf(b"\xff" * 48)
    attr = buf(struct.pack("<IIQ", fd, 40, ctypes.addressof(info)))
    r = bpf(OBJ_GET_INFO_BY_FD, ctypes.addressof(attr), 16)
    fields = struct.unpack_from("<IIIIII16s8s", info.raw)
    return [r, struct.unpack_from("<I", attr.raw, 4)[0], fields[0], *fields[2:6],
            fields[6].rstrip(b"\0").decode(), fields[7].hex()]


def main() -> None:
    pin = buf(os.fsencode(sys.argv[1]) + b"\0")
    get = buf(struct.pack("<QII", ctypes.addressof(pin), 0, 0))
    fd = bpf(OBJ_GET, ctypes.addressof(get), 16)
    assert fd >= 0, f"OBJ_GET: {fd}"
    key, value = buf(b"\3\0\0\0"), buf(b"\0" * 8)

    def lookup(key_ptr: int, value_ptr: int, size: int = 32, tail: bytes = b"") -> int:
        return bpf(MAP_LOOKUP_ELEM, at(struct.pack("<I4xQQQ", fd, key_ptr, value_ptr, 0)
                                       + tail), size)

    big = buf(b"\0" * 8192)
    pipe, _ = os.pipe()
    tail_set = b"\0" * 200 + b"\1" + b"\0" * 55
    results = {
        "lookup ok": lookup(ctypes.addressof(key), ctypes.addressof(value)),
        "value written": value.raw.hex(),
        "key unmapped": lookup(UNMAPPED, ctypes.addressof(value)),
        "value unmapped": lookup(ctypes.addressof(key), UNMAPPED),
        "attr unmapped": bpf(MAP_LOOKUP_ELEM, UNMAPPED, 32),
        "attr at a kernel address": bpf(MAP_LOOKUP_ELEM, KERNEL_ADDRESS, 32),
        "value at a kernel address": lookup(ctypes.addressof(key), KERNEL_ADDRESS),
        "attr over a page": bpf(MAP_LOOKUP_ELEM, ctypes.addressof(big), 4097),
        "attr with a non-zero tail": lookup(ctypes.addressof(key), ctypes.addressof(value),
                                            32 + len(tail_set), tail_set),
        "attr with a zero tail": lookup(ctypes.addressof(key), ctypes.addressof(value),
                                        288, b"\0" * 256),
        "byte past the command's members": bpf(
            OBJ_GET, at(struct.pack("<QII", ctypes.addressof(pin), 0, 0) + b"\0" * 8 + b"\1"),
            32),
        "garbage command": bpf(GARBAGE_CMD, ctypes.addressof(big), 64),
        "garbage command, attr unmapped": bpf(GARBAGE_CMD, UNMAPPED, 64),
        "info of fd 99999": bpf(OBJ_GET_INFO_BY_FD,
                                at(struct.pack("<IIQ", 99999, 88, ctypes.addressof(big))), 16),
        "info into unmapped memory": bpf(OBJ_GET_INFO_BY_FD,
                                         at(struct.pack("<IIQ", fd, 88, UNMAPPED)), 16),
        "info of a pipe": bpf(OBJ_GET_INFO_BY_FD,
                              at(struct.pack("<IIQ", pipe, 88, ctypes.addressof(big))), 16),
        "info with a non-zero tail": bpf(OBJ_GET_INFO_BY_FD, at(struct.pack(
            "<IIQ", fd, 4096, ctypes.addressof(buf(b"\0" * 200 + b"\1" + b"\0" * 3895)))), 16),
        "info written": info_written(fd),
        "info_len over a page": bpf(OBJ_GET_INFO_BY_FD,
                                    at(struct.pack("<IIQ", fd, 1 << 31, ctypes.addressof(big))),
                                    16),
        "lookup on fd 99999": bpf(MAP_LOOKUP_ELEM, at(struct.pack(
            "<I4xQQQ", 99999, ctypes.addressof(key), ctypes.addressof(value), 0)), 32),
        "lookup on a pipe": bpf(MAP_LOOKUP_ELEM, at(struct.pack(
            "<I4xQQQ", pipe, ctypes.addressof(key), ctypes.addressof(value), 0)), 32),
        "path unmapped": bpf(OBJ_GET, at(struct.pack("<QII", UNMAPPED, 0, 0)), 16),
    }
    results["OBJ_GET with a full fd table"] = obj_get_with_full_fd_table(get)
    print(json.dumps(results, sort_keys=True))


def obj_get_with_full_fd_table(attr: ctypes.Array) -> int:
    """EMFILE: the new fd cannot be installed (last: it leaves the fd table full)."""
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    try:
        while True:
            os.open("/dev/null", os.O_RDONLY)
    except OSError:
        pass
    return bpf(OBJ_GET, ctypes.addressof(attr), 16)


if __name__ == "__main__":
    main()
