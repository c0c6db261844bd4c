"""Typed errors against a daemon (no mount needed): a refused program is a VerifierError whose
`log` is the verifier's, from the low-level call, the ELF loader and the CLI; a batch that
stops part-way is a BatchError with the `count` done; a test run whose output does not fit is
a RunOutputError with the run's `output`. Each is still a BpfError (an OSError) with the
kernel's errno."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import DaemonProcess

from bpffs.client import Client
from bpffs.client.cli import main as bpffs_main
from bpffs.client.loader import read_object
from bpffs.client.loader.load import LoadOptions, load_object
from bpffs.vm import asm
from bpffs.vm.errors import BatchError, BpfError, RunOutputError, VerifierError
from bpffs.vm.isa import R0, R1
from bpffs.vm.uapi import MapType, ProgType

# r0 = *(u64 *)(r1 + 4096): past the end of the context, refused by the verifier.
OUT_OF_CONTEXT = asm.program(asm.ldx(8, R0, R1, 4096), asm.exit())
REFUSAL = "invalid bpf_context access off=4096 size=8"
REFUSED_C = """
SEC("socket") int f(struct __sk_buff *skb) {
    return *(volatile int *)((char *)skb + 4096);  /* past the context: refused */
}
char _license[] SEC("license") = "GPL";
"""


@pytest.fixture(scope="module")
def mountless(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path_factory.mktemp("typed"), mount=False).start()
    yield d
    assert d.stop() == 0, d.log_text()
    assert "Traceback" not in d.log_text(), d.log_text()


@pytest.fixture
def conn(mountless: DaemonProcess) -> Iterator[Client]:
    with mountless.client() as c:
        yield c


def _k(i: int) -> bytes:
    return i.to_bytes(4, "little")


def test_a_refused_program_is_a_verifier_error_with_the_log(conn: Client) -> None:
    with pytest.raises(VerifierError) as info:
        conn.prog_load(ProgType.SCHED_CLS, OUT_OF_CONTEXT, log_level=1)
    err = info.value
    assert isinstance(err, BpfError) and isinstance(err, OSError)
    assert err.errno == errno.EACCES and REFUSAL in err.strerror
    assert "0: (79) r0 = *(u64 *)(r1 +4096)" in err.log and REFUSAL in err.log


def test_without_log_level_the_refusal_carries_no_log(conn: Client) -> None:
    """As the kernel: no log was asked for, so none comes back (the errno and message do)."""
    with pytest.raises(BpfError) as info:
        conn.prog_load(ProgType.SCHED_CLS, OUT_OF_CONTEXT)
    assert type(info.value) is BpfError and info.value.errno == errno.EACCES


def test_a_log_too_big_for_its_buffer_is_enospc_with_what_fit(conn: Client) -> None:
    code = asm.program(*[asm.mov64_imm(R0, n) for n in range(50)], OUT_OF_CONTEXT)
    with pytest.raises(VerifierError) as info:
        conn.prog_load(ProgType.SCHED_CLS, code, log_level=1, log_size=128)
    assert info.value.errno == errno.ENOSPC and REFUSAL in info.value.strerror
    assert len(info.value.log) == 127 and info.value.log.startswith("0: (b7) r0 = 0")


def test_the_loader_raises_the_verifier_error_with_the_log(conn: Client, build) -> None:
    """log_level 0: the loader loads again with a log to say why, as libbpf does."""
    obj = build(REFUSED_C)
    with pytest.raises(VerifierError, match="loading program 'f'") as info:
        load_object(conn, read_object(str(obj)), LoadOptions())
    assert info.value.errno == errno.EACCES and "invalid bpf_context access" in info.value.log


def test_the_cli_prints_the_verifier_log_and_exits_with_the_errno(
        mountless: DaemonProcess, build, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    obj = build(REFUSED_C)
    status = bpffs_main(["--socket", str(mountless.socket), "prog", "load", str(obj),
                         str(tmp_path / "p")])
    stderr = capsys.readouterr().err
    assert status == 256 - errno.EACCES, stderr
    log, _, error = stderr.rpartition("Error: ")
    assert "invalid bpf_context access" in log
    assert error.startswith("EACCES: ") and "loading program 'f'" in error


@pytest.mark.parametrize("chunk", [2, 3, 8192], ids=lambda n: f"chunk{n}")
def test_a_batch_that_stops_part_way_is_a_batch_error_with_the_count(conn: Client,
                                                                      chunk: int) -> None:
    """6 elements into a 4-element map: 4 go in whether the failing request is the client's
    second or third (count summed over requests) or its only one (the daemon's count)."""
    fd = conn.map_create(MapType.HASH, 4, 4, 4)
    try:
        with pytest.raises(BatchError) as info:
            conn.map_update_batch(fd, [_k(i) for i in range(6)], [_k(i) for i in range(6)],
                                  chunk=chunk)
        assert info.value.errno == errno.E2BIG and info.value.count == 4
        assert isinstance(info.value, BpfError)
        with pytest.raises(BatchError) as info:
            conn.map_delete_batch(fd, [_k(0), _k(1), _k(9), _k(2)])
        assert info.value.errno == errno.ENOENT and info.value.count == 2
    finally:
        os.close(fd)


def test_a_run_whose_output_does_not_fit_carries_the_output(conn: Client) -> None:
    fd = conn.prog_load(ProgType.SOCKET_FILTER, asm.program(asm.mov64_imm(R0, 7), asm.exit()))
    try:
        with pytest.raises(RunOutputError) as info:
            conn.prog_test_run(fd, bytes(range(64)), data_size_out=16)
        with_room = conn.prog_test_run(fd, bytes(range(64)))
    finally:
        os.close(fd)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, BpfError)
    assert info.value.output["retval"] == with_room.retval == 7
    assert info.value.output["data_out"] == with_room.data_out and len(with_room.data_out) > 16
