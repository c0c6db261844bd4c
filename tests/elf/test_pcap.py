"""`bpffs pcap run`: a capture replayed through the protocol classifier, a socket filter and
the redirect forwarder — verdict counts, classids, redirect targets, the packets written — and
damaged captures (truncated records, giant and runt packets, a cut-off file, not a capture)."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import dpkt
import pytest
from helpers import DaemonProcess

from bpffs.client import Client
from bpffs.client.loader import read_object
from bpffs.client.loader.load import LoadOptions, load_object

pytestmark = pytest.mark.fuse

CLI = "import sys; from bpffs.client.cli import main; sys.exit(main(sys.argv[1:]))"
ARP = bytes(12) + b"\x08\x06" + bytes(28)
IPV4 = bytes(12) + b"\x08\x00" + b"\x45" + bytes(45)
IPV6 = bytes(12) + b"\x86\xdd" + b"\x60" + bytes(53)
LLDP = bytes(12) + b"\x88\xcc" + bytes(30)


def write_pcap(path: Path, packets: list[bytes | tuple[bytes, int]]) -> Path:
    """A classic pcap; (data, wire_len) entries are recorded as truncated captures."""
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        for i, p in enumerate(packets):
            data, wire = p if isinstance(p, tuple) else (p, len(p))
            f.write(struct.pack("<IIII", 1700000000 + i, 0, len(data), wire) + data)
    return path


def pcap_run(daemon: DaemonProcess, prog: Path, capture: Path, *extra: str
             ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, "pcap", "run", "pinned", str(prog),
                           "--pcap", str(capture), *extra, "--json"], env=daemon.env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def classifier(client: Client, bpf_dir: Path, examples: dict[str, Path]) -> Path:
    spec = read_object(examples["tc_classifier"])
    with load_object(client, spec, LoadOptions(mount=str(bpf_dir),
                                               sections=["classifier"])) as loaded:
        client.obj_pin(loaded.programs["cls_main"], bpf_dir / "cls")
    return bpf_dir / "cls"


def test_classifier_verdicts_classids_and_output(daemon: DaemonProcess, classifier: Path,
                                                 tmp_path: Path) -> None:
    packets = [ARP, IPV4, IPV4, IPV6, LLDP, IPV4, LLDP]
    out = tmp_path / "out.pcap"
    done = pcap_run(daemon, classifier, write_pcap(tmp_path / "in.pcap", packets),
                    "--out", str(out))
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["packets"] == 7
    assert doc["verdicts"] == {"TC_ACT_OK": 5, "TC_ACT_SHOT": 2}
    assert doc["classids"] == {"1:1": 1, "1:2": 3, "1:3": 1}
    assert (doc["accepted_packets"], doc["written"]) == (5, 5)
    assert doc["accepted_bytes"] == sum(len(p) for p in packets if p is not LLDP)
    with open(out, "rb") as f:
        written = [bytes(buf) for _, buf in dpkt.pcap.Reader(f)]
    assert written == [p for p in packets if p is not LLDP]


def test_damaged_packets_are_counted_not_fatal(daemon: DaemonProcess, classifier: Path,
                                               tmp_path: Path) -> None:
    giant = bytes(12) + b"\x08\x00" + bytes(300_000)
    too_big = bytes(12) + b"\x08\x00" + bytes(70_000)  # a capture can hold it; an skb cannot
    jumbo = bytes(12) + b"\x86\xdd" + bytes(9000)
    capture = write_pcap(tmp_path / "in.pcap", [IPV4, (IPV6[:20], 1500), bytes(10), giant,
                                                too_big, jumbo, ARP])
    done = pcap_run(daemon, classifier, capture)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["packets"] == 4  # IPv4, the truncated IPv6 capture (run as captured), jumbo, ARP
    assert doc["truncated"] == 1
    assert doc["verdicts"] == {"TC_ACT_OK": 4}
    skipped = doc["skipped"]
    assert skipped.pop("shorter than an Ethernet header (14 bytes)") == 1
    assert skipped.pop("giant (over 262144 bytes)") == 1
    ((reason, count),) = skipped.items()
    assert count == 1 and reason.startswith("refused by the test run: data_in of 70014 bytes")


def test_capture_cut_off_mid_record(daemon: DaemonProcess, classifier: Path,
                                    tmp_path: Path) -> None:
    capture = write_pcap(tmp_path / "in.pcap", [IPV4, ARP, IPV6])
    capture.write_bytes(capture.read_bytes()[:-10])
    doc = json.loads(pcap_run(daemon, classifier, capture).stdout)
    assert doc["packets"] == 2
    assert "capture truncated" in doc["damaged"][0]


def test_not_a_capture(daemon: DaemonProcess, classifier: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"hello, this is not a capture")
    done = pcap_run(daemon, classifier, junk)
    assert done.returncode == 256 - errno.EINVAL
    assert "not a pcap" in json.loads(done.stdout)["error"]


def test_socket_filter_accepts_and_truncates(daemon: DaemonProcess, client: Client,
                                             bpf_dir: Path, tmp_path: Path, build) -> None:
    obj = build("""
SEC("socket") int ipv4_headers(struct __sk_buff *skb) {
    return skb->protocol == __builtin_bswap16(ETH_P_IP) ? ETH_HLEN + 20 : 0;
}
char _license[] SEC("license") = "GPL";
""")
    with load_object(client, read_object(obj), LoadOptions(mount=str(bpf_dir))) as loaded:
        client.obj_pin(loaded.programs["ipv4_headers"], bpf_dir / "sf")
    out = tmp_path / "out.pcap"
    done = pcap_run(daemon, bpf_dir / "sf", write_pcap(tmp_path / "in.pcap",
                                                       [IPV4, ARP, IPV4, IPV6]),
                    "--out", str(out))
    doc = json.loads(done.stdout)
    assert doc["verdicts"] == {"accept": 2, "drop": 2}
    assert (doc["accepted_packets"], doc["accepted_bytes"]) == (2, 2 * 34)
    with open(out, "rb") as f:
        assert [bytes(b) for _, b in dpkt.pcap.Reader(f)] == [IPV4[:34], IPV4[:34]]


def test_redirect_targets(daemon: DaemonProcess, client: Client, bpf_dir: Path,
                          tmp_path: Path, examples: dict[str, Path]) -> None:
    spec = read_object(examples["redirect_fwd"])
    with load_object(client, spec, LoadOptions(mount=str(bpf_dir))) as loaded:
        client.map_update_elem(loaded.maps["fwd_target"], bytes(4), struct.pack("<I", 4))
        client.obj_pin(loaded.programs["forward"], bpf_dir / "fwd")
    doc = json.loads(pcap_run(daemon, bpf_dir / "fwd",
                              write_pcap(tmp_path / "in.pcap", [IPV4, ARP])).stdout)
    assert doc["verdicts"] == {"TC_ACT_REDIRECT": 2}
    assert doc["redirects"] == {"ifindex 4 (egress)": 2}


def test_a_replay_is_the_same_on_every_tier_and_with_either_reader(
        daemon: DaemonProcess, client: Client, bpf_dir: Path, tmp_path: Path,
        examples: dict[str, Path], classifier: Path) -> None:
    """The whole summary and the packets written: the native batch driver (with native
    redirects), the Python tiers, and the capture read natively or by the Python walk
    (BPFFS_NATIVE_CLIENT=0), over damaged packets too."""
    spec = read_object(examples["redirect_fwd"])
    with load_object(client, spec, LoadOptions(mount=str(bpf_dir))) as loaded:
        client.map_update_elem(loaded.maps["fwd_target"], bytes(4), struct.pack("<I", 4))
        client.obj_pin(loaded.programs["forward"], bpf_dir / "fwd")
    capture = write_pcap(tmp_path / "in.pcap", [
        ARP, IPV4, (IPV6[:20], 1500), bytes(10), bytes(12) + b"\x08\x00" + bytes(70_000),
        LLDP, *[bytes(12) + t + bytes(n) for n in (46, 1500) for t in (b"\x08\x06",
                                                                       b"\x86\xdd")]])
    for prog in (classifier, bpf_dir / "fwd"):
        seen = []
        for tier, walk in (("native", "1"), ("native", "0"), ("compiled", "1"),
                           ("interpreter", "0")):
            out = tmp_path / f"out-{tier}-{walk}.pcap"
            done = subprocess.run([sys.executable, "-c", CLI, "pcap", "run", "pinned",
                                   str(prog), "--pcap", str(capture), "--out", str(out),
                                   "--tier", tier, "--json"],
                                  env={**daemon.env, "BPFFS_NATIVE_CLIENT": walk},
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            doc = json.loads(done.stdout)
            del doc["seconds"], doc["packets_per_second"]
            seen.append((doc, out.read_bytes()))
        assert all(s == seen[0] for s in seen), prog.name
        assert seen[0][0]["packets"] == 8 and seen[0][0]["truncated"] == 1


def test_kprobe_programs_cannot_replay(daemon: DaemonProcess, client: Client, bpf_dir: Path,
                                       tmp_path: Path, examples: dict[str, Path]) -> None:
    with load_object(client, read_object(examples["perf_events"]),
                     LoadOptions(mount=str(bpf_dir))) as loaded:
        client.obj_pin(loaded.programs["on_write"], bpf_dir / "kp")
    done = pcap_run(daemon, bpf_dir / "kp", write_pcap(tmp_path / "in.pcap", [IPV4]))
    assert done.returncode == 256 - errno.EINVAL
    assert "not KPROBE" in json.loads(done.stdout)["error"]


def test_batch_run_checks_its_input(client: Client, classifier: Path) -> None:
    from bpffs.client.calls import Request

    fd = client.obj_get(classifier)
    try:
        handle, _ = client.run(_bind(client, fd))
        with pytest.raises(OSError, match="packets must be bytes") as e:
            client.run(_one(Request("prog_test_run_batch", (handle, [IPV4, "text"], {}))))
        assert e.value.errno == errno.EINVAL
        stats = client.map_create(2, 4, 8, 1)
        with pytest.raises(OSError, match="not a program") as e:
            client.prog_test_run_batch(stats, [IPV4])
        assert e.value.errno == errno.EINVAL
        os.close(stats)
    finally:
        os.close(fd)


def test_a_replay_that_fails_midway_leaves_the_connection_usable(client: Client,
                                                                 classifier: Path) -> None:
    """Two chunks are in flight while a replay runs; when accounting for one fails (here the
    output writer), the reply still due must not reach the client's next call."""
    from bpffs.client.replay import Replay
    from bpffs.vm.uapi import ProgType

    def failing_writer(timestamp: float, data: bytes) -> None:
        raise BrokenPipeError(errno.EPIPE, "the output went away")

    fd = client.obj_get(classifier)
    try:
        replay = Replay(client, fd, ProgType.SCHED_CLS, failing_writer, chunk=4)
        with pytest.raises(BrokenPipeError):
            for _ in range(3):
                replay.feed([0.0] * 4, [IPV4] * 4, [len(IPV4)] * 4)
        info = client.obj_get_info_by_fd(fd)  # answered with its own reply
        assert info["type"] == "sched_cls"
        assert client.prog_test_run(fd, IPV4).retval == 0  # TC_ACT_OK
    finally:
        os.close(fd)


def _bind(client: Client, fd: int):
    from bpffs.client.calls import bind

    return bind(client.session, fd)


def _one(request):
    yield request


def test_pcapng_and_big_endian_captures(daemon: DaemonProcess, classifier: Path,
                                        tmp_path: Path) -> None:
    packets = [ARP, IPV6, LLDP, IPV4]
    ng = tmp_path / "in.pcapng"
    with open(ng, "wb") as f:
        writer = dpkt.pcapng.Writer(f, linktype=dpkt.pcap.DLT_EN10MB)
        for i, p in enumerate(packets):
            writer.writepkt(p, ts=1700000000 + i)
    big = tmp_path / "big_endian.pcap"
    with open(big, "wb") as f:
        f.write(struct.pack(">IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for p in packets:
            f.write(struct.pack(">IIII", 1, 0, len(p), len(p)) + p)
    for capture in (ng, big):
        doc = json.loads(pcap_run(daemon, classifier, capture).stdout)
        assert doc["verdicts"] == {"TC_ACT_OK": 3, "TC_ACT_SHOT": 1}, capture.name
        assert doc["classids"] == {"1:1": 1, "1:2": 1, "1:3": 1}, capture.name


def test_clone_redirects_of_the_hash_demux(daemon: DaemonProcess, client: Client,
                                           bpf_dir: Path, tmp_path: Path,
                                           examples: dict[str, Path]) -> None:
    with load_object(client, read_object(examples["hash_demux"]),
                     LoadOptions(mount=str(bpf_dir))) as loaded:
        for slot in range(4):  # every hash bucket clones to ifindex 3
            client.map_update_elem(loaded.maps["demux_ports"], struct.pack("<I", slot),
                                   struct.pack("<I", 3))
        client.obj_pin(loaded.programs["demux"], bpf_dir / "demux")
    done = pcap_run(daemon, bpf_dir / "demux", write_pcap(tmp_path / "in.pcap",
                                                          [IPV4, ARP, LLDP]),
                    "--interfaces", "1,3")  # clone_redirect needs the target to exist
    doc = json.loads(done.stdout)
    assert doc["verdicts"] == {"TC_ACT_OK": 3}
    assert doc["clone_redirects"] == {"ifindex 3 (egress)": 3}
    assert doc["redirects"] == {}


def test_a_long_batch_does_not_stall_other_clients(daemon: DaemonProcess, classifier: Path
                                                   ) -> None:
    import threading
    import time

    packets = [IPV4, ARP, IPV6, LLDP] * 65536  # about a second of work: long past the sleep
    done: dict[str, float] = {}

    def replay() -> None:
        with daemon.client() as c:
            fd = c.obj_get(classifier)
            c.prog_test_run_batch(fd, packets, chunk=len(packets))  # one request
            done["batch"] = time.monotonic()
            os.close(fd)

    worker = threading.Thread(target=replay)
    with daemon.client() as other:
        worker.start()
        time.sleep(0.1)  # the batch is running
        other.status()
        done["status"] = time.monotonic()
    worker.join(timeout=120)
    assert done["status"] < done["batch"], "status waited for the whole batch"


@pytest.mark.parametrize("tier", ["interpreter", "native"])
def test_a_long_buffer_run_does_not_stall_other_clients(daemon: DaemonProcess,
                                                        classifier: Path, tier: str) -> None:
    """prog_test_run_buffer runs its packets in steps sized by the clock: another client is
    answered while it runs, on a slow tier and a fast one."""
    import threading
    import time
    from array import array

    from bpffs.client import calls

    count = 65536 if tier == "interpreter" else 1_000_000  # a second or so of work
    frames = [IPV4, ARP, IPV6, LLDP]
    memfd = calls.packets_memfd(b"".join(frames))
    offsets = array("Q", [sum(map(len, frames[:i % 4])) for i in range(count)])
    lengths = array("I", [len(frames[i % 4]) for i in range(count)])
    done: dict[str, float] = {}

    def replay() -> None:
        with daemon.client() as c:
            fd = c.obj_get(classifier)
            c.prog_test_run(fd, IPV4, tier=tier)  # compiled before the clock starts
            done["started"] = time.monotonic()
            run = c.prog_test_run_buffer(fd, memfd, offsets, lengths, tier=tier)
            done["batch"] = time.monotonic()
            done["verdicts"] = len(run.retvals)
            os.close(fd)

    worker = threading.Thread(target=replay)
    try:
        with daemon.client() as other:
            worker.start()
            while "started" not in done:
                time.sleep(0.005)
            time.sleep(0.05)  # the batch is running
            other.status()
            done["status"] = time.monotonic()
        worker.join(timeout=120)
    finally:
        os.close(memfd)
    assert done["verdicts"] == count
    assert done["status"] < done["batch"], "status waited for the whole batch"
