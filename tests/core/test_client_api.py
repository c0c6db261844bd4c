"""The client library (libbpf-named calls, the dict-like Map and its codecs, batches, the trio
AsyncClient) and the `bpffs` CLI, whose output is compared with the real bpftool's on a kernel
bpffs when bpftool is installed."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import json
import os
import shutil
import subprocess
import threading
from collections import namedtuple
from pathlib import Path

import pytest
import trio
from helpers import in_child, raises_errno

from bpffs import client as libbpf
from bpffs.client import (
    BPF_EXIST,
    BPF_NOEXIST,
    AsyncClient,
    BpfError,
    Client,
    IntCodec,
    Map,
    MapType,
    StructCodec,
    calls,
    default_client,
)
from bpffs.client.cli import main as cli_entry
from bpffs.vm import kernel


def k(i: int) -> bytes:
    return i.to_bytes(4, "little")


# -- libbpf-named calls on the default connection ------------------------------------------------
@pytest.mark.fuse
def test_libbpf_calls(use_daemon, bpf_dir: Path) -> None:
    fd = libbpf.map_create(MapType.HASH, 4, 8, 4, name="flows")
    libbpf.map_update_elem(fd, k(1), bytes(8), BPF_NOEXIST)
    with raises_errno(errno.EEXIST):
        libbpf.map_update_elem(fd, k(1), bytes(8), BPF_NOEXIST)
    assert libbpf.map_get_next_key(fd) == k(1)
    libbpf.obj_pin(fd, str(bpf_dir / "flows"))
    libbpf.close(fd)
    again = libbpf.obj_get(str(bpf_dir / "flows"))
    assert libbpf.map_lookup_elem(again, k(1)) == bytes(8)
    info = libbpf.obj_get_info_by_fd(again)
    assert (info["name"], info["type"], info["pinned"]) == ("flows", "hash",
                                                            [str(bpf_dir / "flows")])
    by_id = libbpf.map_get_fd_by_id(libbpf.map_get_next_id(info["id"] - 1))
    assert libbpf.obj_get_info_by_fd(by_id)["id"] == info["id"], "the same map, found by id"
    libbpf.close(by_id)
    libbpf.map_delete_elem(again, k(1))
    with raises_errno(errno.ENOENT):
        libbpf.map_lookup_elem(again, k(1))
    libbpf.close(again)


def test_default_client_is_per_thread_and_per_process(use_daemon) -> None:
    mine = default_client()
    assert default_client() is mine
    other: list[Client] = []
    t = threading.Thread(target=lambda: other.append(default_client()))
    t.start()
    t.join()
    assert other[0] is not mine
    other[0].close()
    child_pid = in_child(lambda: default_client().daemon_info and default_client().pid)
    assert child_pid != os.getpid(), "a forked child makes its own connection"


def test_errors_are_bpf_errors_with_the_kernels_errno(client) -> None:
    with pytest.raises(BpfError) as info:
        client.map_create(MapType.HASH, 0, 8, 1)
    assert isinstance(info.value, OSError) and info.value.errno == errno.EINVAL
    assert str(info.value).startswith("EINVAL: hash map needs key_size")


def test_no_daemon_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BpfError) as info:
        Client(str(tmp_path / "nothing.sock"))
    assert info.value.errno == errno.ENOENT
    assert "is the daemon running?" in str(info.value)


# -- Map ------------------------------------------------------------------------------------------
@pytest.mark.fuse
def test_map_is_a_mutable_mapping(client, bpf_dir: Path) -> None:
    with Map.create(MapType.HASH, 4, 8, 8, name="counts", key=int, value=int,
                    client=client) as m:
        assert len(m) == 0 and 1 not in m
        m[1] = 10
        m[2] = 20
        m.update(3, 30, flags=BPF_NOEXIST)
        with raises_errno(errno.EEXIST):
            m.update(3, 31, flags=BPF_NOEXIST)
        with raises_errno(errno.ENOENT):
            m.update(4, 40, flags=BPF_EXIST)
        assert m[1] == 10 and 2 in m and len(m) == 3
        assert dict(m.items()) == {1: 10, 2: 20, 3: 30}
        assert sorted(m) == [1, 2, 3] and sorted(m.values()) == [10, 20, 30]
        del m[2]
        with pytest.raises(KeyError):
            m[2]
        with pytest.raises(KeyError):
            del m[2]
        assert m.get(2, "missing") == "missing"
        assert m.pop(1) == 10 and dict(m.items()) == {3: 30}
        m.pin(str(bpf_dir / "counts"))
        assert repr(m).startswith("<Map id ") and "hash 'counts'" in repr(m)
    with Map.pinned(str(bpf_dir / "counts"), key=int, value=int, client=client) as again:
        assert dict(again.items()) == {3: 30}
        assert again.get_next_key() == 3


def test_array_map_semantics_through_map(client) -> None:
    with Map.create(MapType.ARRAY, 4, 4, 3, value=int, client=client) as a:
        assert len(a) == 3 and list(a.items()) == [(0, 0), (1, 0), (2, 0)]
        a[2] = 7
        assert a[2] == 7
        with raises_errno(errno.EINVAL):
            del a[0]
        with raises_errno(errno.E2BIG):
            a[3] = 1
        with pytest.raises(KeyError):
            a[3]


class Flow(ctypes.Structure):
    _fields_ = [("saddr", ctypes.c_uint32), ("dport", ctypes.c_uint16), ("proto", ctypes.c_uint8)]


Pair = namedtuple("Pair", "packets bytes")


def test_codecs(client) -> None:
    with Map.create(MapType.HASH, 8, 16, 4, key=Flow, value=StructCodec("<QQ", Pair),
                    client=client) as m:
        m[Flow(0x0A000001, 443, 6)] = Pair(3, 1500)
        (key, value), = m.items()
        assert (key.saddr, key.dport, key.proto) == (0x0A000001, 443, 6)
        assert value == Pair(3, 1500)
    with Map.create(MapType.HASH, 4, 2, 4, key=IntCodec(4, signed=True),
                    value=ctypes.c_int16, client=client) as m:
        m[-1] = -2
        assert dict(m.items()) == {-1: -2}
        assert client.map_lookup_elem(m.fd, b"\xff" * 4) == b"\xfe\xff"
        with raises_errno(errno.EINVAL):
            m[2**31] = 0  # does not fit in a signed 4-byte key
    with Map.create(MapType.HASH, 4, 4, 4, client=client) as raw:
        raw[b"abcd"] = b"1234"
        assert raw[b"abcd"] == b"1234"
        with raises_errno(errno.EINVAL):
            raw[b"abc"] = b"1234"
    fd = client.map_create(MapType.HASH, 4, 8, 1)
    with raises_errno(errno.EINVAL):
        Map(fd, key="<H", client=client)  # a 2-byte codec for a 4-byte key
    with pytest.raises(TypeError):
        Map(fd, key=object(), client=client)
    os.close(fd)


def test_map_batches(client) -> None:
    with Map.create(MapType.HASH, 4, 4, 10_000, key=int, value=int, client=client) as m:
        assert m.update_batch({i: i * 2 for i in range(10_000)}) == 10_000
        assert len(m) == 10_000 and m[9999] == 19998
        assert dict(m.items()) == {i: i * 2 for i in range(10_000)}  # walks in 3 batches
        assert m.delete_batch(range(5000)) == 5000
        assert m.pop_all() == {i: i * 2 for i in range(5000, 10_000)}
        assert len(m) == 0


def test_batch_failures_report_how_far_they_got(client) -> None:
    fd = client.map_create(MapType.HASH, 4, 4, 4)
    with pytest.raises(BpfError) as info:
        client.map_update_batch(fd, [k(i) for i in range(6)], [k(i) for i in range(6)])
    assert info.value.errno == errno.E2BIG and info.value.count == 4
    with pytest.raises(BpfError) as info:
        client.map_delete_batch(fd, [k(0), k(1), k(9), k(2)])
    assert info.value.errno == errno.ENOENT and info.value.count == 2
    keys, _, cursor = client.map_lookup_batch(fd, 1)
    assert len(keys) == 1 and cursor == keys[0]
    rest, _, end = client.map_lookup_batch(fd, 10, cursor)
    assert sorted(keys + rest) == [k(2), k(3)] and end is None
    with raises_errno(errno.EINVAL):
        client.map_lookup_batch(fd, 0)
    with raises_errno(errno.EINVAL):
        client.map_update_batch(fd, [k(1)], [])
    os.close(fd)


def test_pipelined_calls_return_in_order_and_an_error_stays_with_its_call(client) -> None:
    """Client.start: requests in flight together; a failed one raises at its own result;
    results collected out of order or never leave the connection in step."""
    fd = client.map_create(MapType.HASH, 4, 4, 4)
    client.map_update_elem(fd, k(1), k(10))  # binds the fd: a pipelined call cannot
    op = calls.OPERATIONS
    results = [client.start(op["map_lookup_elem"](client.session, fd, k(1))),
               client.start(op["map_update_elem"](client.session, fd, k(2), k(20),
                                                  BPF_NOEXIST)),
               client.start(op["map_lookup_elem"](client.session, fd, k(3))),  # missing
               client.start(op["map_lookup_elem"](client.session, fd, k(2)))]
    assert results[0]() == k(10)
    assert results[1]() is None
    with raises_errno(errno.ENOENT):
        results[2]()
    assert results[3]() == k(20)
    assert client.map_lookup_elem(fd, k(1)) == k(10)  # nothing left unread on the socket
    abandoned = client.start(op["map_lookup_elem"](client.session, fd, k(3)))  # an error
    later = client.start(op["map_lookup_elem"](client.session, fd, k(1)))
    assert later() == k(10)  # collected out of order: the earlier reply is kept for its call
    assert client.map_lookup_elem(fd, k(2)) == k(20)
    del abandoned  # never collected: the connection stays in step all the same
    client.start(op["map_lookup_elem"](client.session, fd, k(3)))  # owed, then a plain call
    assert client.map_lookup_elem(fd, k(1)) == k(10)
    with Client(client.path) as elsewhere:
        other = elsewhere.map_create(MapType.HASH, 4, 4, 4)  # not bound on `client` yet
    with raises_errno(errno.EINVAL):  # it would need a bind first: two requests
        client.start(op["map_lookup_elem"](client.session, other, k(1)))()
    assert client.map_lookup_elem(fd, k(2)) == k(20)
    os.close(other)
    os.close(fd)


@pytest.mark.kernel
def test_batch_update_against_the_kernel(client) -> None:
    """BPF_MAP_UPDATE_BATCH on a map too small: both stop with E2BIG after filling it."""
    keys, values = b"".join(k(i) for i in range(6)), b"".join(k(i) for i in range(6))
    kfd = kernel.map_create(MapType.HASH, 4, 4, 4)
    with raises_errno(errno.E2BIG):
        kernel.map_update_batch(kfd, keys, values, 6)
    kernel_keys = set()
    key = None
    while True:
        try:
            key = kernel.map_get_next_key(kfd, key, 4)
        except OSError:
            break
        kernel_keys.add(key)
    os.close(kfd)
    fd = client.map_create(MapType.HASH, 4, 4, 4)
    with raises_errno(errno.E2BIG):
        client.map_update_batch(fd, [k(i) for i in range(6)], [k(i) for i in range(6)])
    ours, _, _ = client.map_lookup_batch(fd, 10)
    os.close(fd)
    assert set(ours) == kernel_keys == {k(i) for i in range(4)}


# -- trio ----------------------------------------------------------------------------------------
async def test_async_client(daemon) -> None:
    async with await AsyncClient.connect(str(daemon.socket)) as c:
        fd = await c.map_create(MapType.HASH, 4, 4, 64)
        with raises_errno(errno.ENOENT):
            await c.map_lookup_elem(fd, k(1))

        async def writer(base: int) -> None:
            for i in range(base, base + 16):
                await c.map_update_elem(fd, k(i), k(i * 3))

        async with trio.open_nursery() as nursery:  # one connection, concurrent tasks
            for base in (0, 16, 32, 48):
                nursery.start_soon(writer, base)
        keys, values, _ = await c.map_lookup_batch(fd, 100)
        assert dict(zip(keys, values, strict=True)) == {k(i): k(i * 3) for i in range(64)}
        assert (await c.obj_get_info_by_fd(fd))["entries"] == 64
        os.close(fd)


# -- CLI ----------------------------------------------------------------------------------------
def cli(daemon, *argv: str, ok: bool = True) -> subprocess.CompletedProcess:
    """`bpffs ARGV`, the console script in a new process."""
    result = subprocess.run(["bpffs", *argv], env=daemon.env, capture_output=True, text=True,
                            timeout=60)
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def cli_main(daemon, *argv: str) -> subprocess.CompletedProcess:
    """The same CLI, its main() called in this process: a session of many commands costs no
    interpreter start-up each (about 0.5 s, mostly imports)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli_entry(["--socket", str(daemon.socket), *argv])
    return subprocess.CompletedProcess(["bpffs", *argv], status, out.getvalue(), err.getvalue())


def bpftool(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bpftool", *argv], capture_output=True, text=True, timeout=60)


KEY1 = ("key", "1", "0", "0", "0")
VALUE2 = ("value", "2", "0", "0", "0", "0", "0", "0", "0")
# The same session for both tools: (command words, what to compare).
SESSION = [
    (("map", "update", "@", *KEY1, *VALUE2), "all"),
    (("map", "lookup", "@", *KEY1), "all"),
    (("map", "lookup", "@", "key", "9", "0", "0", "0"), "all"),
    (("map", "getnext", "@"), "all"),
    (("map", "getnext", "@", *KEY1), "status"),
    (("map", "dump", "@"), "all"),
    (("map", "update", "@", *KEY1, *VALUE2, "noexist"), "status"),
    (("map", "update", "@", "key", "hex", "02", "00", "00", "00", *VALUE2, "exist"), "status"),
    (("map", "delete", "@", *KEY1), "all"),
    (("map", "delete", "@", *KEY1), "status"),
    (("map", "dump", "@"), "all"),
]


def _pinned_argv(words: tuple[str, ...], pin: str) -> list[str]:
    out = []
    for w in words:
        out += ["pinned", pin] if w == "@" else [w]
    return out


def session(tool, pin: str) -> list[tuple]:
    results = []
    for words, _ in SESSION:
        argv = _pinned_argv(words, pin)
        plain, js = tool(*argv), tool("-j", *argv)
        doc = json.loads(js.stdout) if js.stdout else None
        if isinstance(doc, dict) and "error" in doc:
            doc["error"] = "(message)"  # ours say more than bpftool's
        results.append((plain.returncode, plain.stdout, js.returncode, doc))
    return results


@pytest.mark.fuse
def test_cli_map_session(daemon, bpf_dir: Path) -> None:
    pin = str(bpf_dir / "flows")
    cli(daemon, "map", "create", pin, "type", "hash", "key", "4", "value", "8", "entries", "16",
        "name", "flows")
    results = session(lambda *a: cli_main(daemon, *a), pin)
    assert [r[0] for r in results] == [0, 0, 254, 0, 254, 0, 239, 254, 0, 254, 0]
    assert results[1][1] == "key: 01 00 00 00  value: 02 00 00 00 00 00 00 00\n"
    assert results[1][3] == {"key": ["0x01", "0x00", "0x00", "0x00"],
                                         "value": ["0x02"] + ["0x00"] * 7}
    assert results[5][1].endswith("Found 1 element\n")
    assert results[10][1] == "Found 0 elements\n" and results[10][3] == []
    show = cli(daemon, "map", "show", "pinned", pin).stdout.splitlines()
    assert show[0].endswith(": hash  name flows  flags 0x0")
    assert show[1] == "\tkey 4B  value 8B  max_entries 16  memlock 4096B"


@pytest.mark.fuse
def test_cli_errors_are_one_line_and_the_errno_status(daemon, bpf_dir: Path) -> None:
    bad = cli(daemon, "map", "create", str(bpf_dir / "x"), "type", "hash", "key", "0", "value",
              "8", "entries", "16", ok=False)
    assert bad.returncode == 256 - errno.EINVAL
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("Error: EINVAL: ")
    js = cli(daemon, "-j", "map", "show", "pinned", str(bpf_dir / "missing"), ok=False)
    assert js.returncode == 256 - errno.ENOENT and "error" in json.loads(js.stdout)
    usage = cli(daemon, "map", "frobnicate", ok=False)
    assert usage.returncode != 0 and usage.stderr.startswith("Error: ")


needs_bpftool = pytest.mark.skipif(shutil.which("bpftool") is None,
                                   reason="bpftool is not installed (install.sh installs it)")


@pytest.mark.fuse
@pytest.mark.kernel
@needs_bpftool
def test_cli_output_is_bpftools(daemon, bpf_dir: Path, kernel_bpffs: Path) -> None:
    """The same session through bpftool on a kernel bpffs and through bpffs on ours: the same
    stdout (plain and JSON) and exit status at each step. Error lines on stderr differ on
    purpose (ours say more)."""
    theirs_pin, ours_pin = str(kernel_bpffs / "flows"), str(bpf_dir / "flows")
    create = ("map", "create", "@", "type", "hash", "key", "4", "value", "8", "entries", "16",
              "name", "flows")
    assert bpftool(*[theirs_pin if w == "@" else w for w in create]).returncode == 0
    cli(daemon, *[ours_pin if w == "@" else w for w in create])
    theirs = session(bpftool, theirs_pin)
    ours = session(lambda *a: cli_main(daemon, *a), ours_pin)
    for (words, compare), t, o in zip(SESSION, theirs, ours, strict=True):
        if compare == "all":
            assert o == t, f"{' '.join(words)}:\nbpftool: {t}\nbpffs:   {o}"
        else:
            assert (o[0], o[2]) == (t[0], t[2]), f"{' '.join(words)}: exit statuses differ"
    shown = {}
    for name, tool, pin in (("bpftool", bpftool, theirs_pin),
                            ("bpffs", lambda *a: cli_main(daemon, *a), ours_pin)):
        doc = json.loads(tool("-j", "map", "show", "pinned", pin).stdout)
        shown[name] = {f: doc[f] for f in ("type", "name", "flags", "bytes_key", "bytes_value",
                                           "max_entries", "frozen")}
        plain = tool("map", "show", "pinned", pin).stdout.splitlines()
        shown[name + " plain"] = [plain[0].split(":", 1)[1], plain[1].rsplit("memlock", 1)[0]]
    assert shown["bpftool"] == shown["bpffs"]  # ids and memlock (memcg today) differ
    assert shown["bpftool plain"] == shown["bpffs plain"]


@pytest.mark.fuse
def test_cli_names_maps_by_id_name_or_pin(daemon, bpf_dir: Path) -> None:
    """`map pin`, `map show` (one, all, with -f pins), `getnext` and updates through each way
    of naming a map, plain and JSON."""
    def run(*argv: str) -> subprocess.CompletedProcess:
        return cli_main(daemon, *argv)

    pin, second = str(bpf_dir / "arr"), str(bpf_dir / "second")
    assert run("map", "create", pin, "type", "array", "key", "4", "value", "4", "entries", "2",
               "name", "cli_arr").returncode == 0
    shown = json.loads(run("-j", "map", "show", "pinned", pin).stdout)
    assert {f: shown[f] for f in ("type", "name", "bytes_key", "bytes_value", "max_entries")} \
        == {"type": "array", "name": "cli_arr", "bytes_key": 4, "bytes_value": 4,
            "max_entries": 2}
    mid = str(shown["id"])
    assert json.loads(run("-j", "map", "show", "id", mid).stdout) == shown
    assert json.loads(run("-j", "map", "show", "name", "cli_arr").stdout) == shown
    assert run("map", "update", "name", "cli_arr", "key", "1", "0", "0", "0", "value", "hex",
               "ff", "00", "00", "00").returncode == 0
    assert run("map", "lookup", "id", mid, "key", "1", "0", "0", "0").stdout \
        == "key: 01 00 00 00  value: ff 00 00 00\n"
    assert run("map", "getnext", "pinned", pin, "key", "0", "0", "0", "0").stdout \
        == "key:\n00 00 00 00\nnext key:\n01 00 00 00\n"
    assert json.loads(run("-j", "map", "getnext", "id", mid).stdout) \
        == {"key": None, "next_key": ["0x00"] * 4}
    assert run("map", "pin", "id", mid, second).returncode == 0
    assert os.path.exists(second)
    listed = json.loads(run("-j", "-f", "map", "show").stdout)
    mine = [m for m in listed if m["id"] == int(mid)]
    assert len(mine) == 1 and sorted(mine[0]["pinned"]) == sorted([pin, second])
    plain = run("-f", "map", "show", "id", mid).stdout.splitlines()
    assert plain[0] == f"{mid}: array  name cli_arr  flags 0x0"
    assert sorted(plain[2:]) == sorted([f"\tpinned {pin}", f"\tpinned {second}"])
    again = run("map", "pin", "id", mid, second)
    assert again.returncode == 256 - errno.EEXIST and again.stderr.startswith("Error: EEXIST")
    missing = run("-j", "map", "pin", "id", "4000000000", str(bpf_dir / "x"))
    assert missing.returncode == 256 - errno.ENOENT
    assert json.loads(missing.stdout) == {"error": "ENOENT: no map with id 4000000000"}


def test_cli_status_counts_the_daemons_objects(daemon, client) -> None:
    """`bpffs status` (the console script, finding the daemon by BPFFS_SOCKET)."""
    before = json.loads(cli(daemon, "-j", "status").stdout)
    fd = client.map_create(MapType.HASH, 4, 4, 1)
    try:
        during = json.loads(cli(daemon, "-j", "status").stdout)
        assert during["objects"].get("map", 0) == before["objects"].get("map", 0) + 1
        assert during["pid"] == daemon.proc.pid and during["socket"] == str(daemon.socket)
        plain = cli(daemon, "status").stdout.splitlines()
        assert plain[0].startswith("bpffsd ") and f"(pid {daemon.proc.pid})" in plain[0]
        assert plain[1].startswith(f"objects: {during['objects']['map']} map")
    finally:
        os.close(fd)
