"""bpffs.client.load_object: a clang-built object as Map and Program objects by name (cilium's
Collection, bcc's BPF), and tc's pins under the mount tc would find (issue 12)."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest
from helpers import raises_errno

import bpffs.client
from bpffs.client import BpfError, Client, Collection, Map, Program, ProgType, load_object
from bpffs.client.loader.load import bpffsd_mounts, tc_mount

ETH_ARP = bytes(12) + b"\x08\x06" + bytes(28)
ETH_IPV4 = bytes(12) + b"\x08\x00" + b"\x45" + bytes(40)
ETH_OTHER = bytes(12) + b"\x88\xcc" + bytes(30)


@pytest.mark.fuse
def test_load_object_gives_maps_and_programs_by_name(client: Client, bpf_dir: Path,
                                                     examples: dict[str, Path]) -> None:
    with load_object(examples["tc_classifier"], prog_type=ProgType.SCHED_CLS,
                     mount=str(bpf_dir), client=client) as obj:
        assert isinstance(obj, Collection)
        assert set(obj.programs) == {"cls_main", "cls_ingress", "cls_egress"}
        assert set(obj.maps) == {"proto_stats"} and isinstance(obj["proto_stats"], Map)
        assert obj.pinned[-1] == str(bpf_dir / "tc/globals/proto_stats")
        ingress = obj.programs["cls_ingress"]
        assert isinstance(ingress, Program) and ingress.section == "ingress"
        assert ingress.info()["type"] == "sched_cls"
        run = ingress.test_run(ETH_IPV4)
        assert run.retval == 0 and run.effects.get("tc_classid") == 0x10002
        assert ingress.test_run(ETH_OTHER).retval == 2  # TC_ACT_SHOT
        assert obj["proto_stats"][1] == struct.pack("<Q", 1)  # array: int keys, bytes values
        stats = obj.map("proto_stats", value=int)
        assert stats[1] == 1 and stats[3] == 1
        ingress.pin(str(bpf_dir / "cls_in"))
        obj.pin_maps(str(bpf_dir / "maps"))
        fds = [m.fd for m in obj.maps.values()] + [p.fd for p in obj.programs.values()]
    for fd in fds:  # the Collection owned them
        with pytest.raises(OSError):
            os.fstat(fd)
    assert stats[1] == 1, "obj.map() has its own fd"
    stats.close()
    with Program.pinned(str(bpf_dir / "cls_in"), client=client) as again:
        assert again.test_run(ETH_ARP).effects.get("tc_classid") == 0x10001
    with Map.pinned(str(bpf_dir / "maps/proto_stats"), value=int, client=client) as pinned:
        assert pinned[0] == 1 and pinned[1] == 1
    with raises_errno(errno.EINVAL):
        Program.pinned(str(bpf_dir / "maps/proto_stats"), client=client)


@pytest.mark.fuse
def test_load_object_errors(client: Client, bpf_dir: Path, examples: dict[str, Path],
                            tmp_path: Path) -> None:
    with pytest.raises(BpfError, match="prog_type=") as info:
        load_object(examples["tc_classifier"], mount=str(bpf_dir), client=client)
    assert info.value.errno == errno.EINVAL
    assert list(bpf_dir.iterdir()) == [], "a failed load pins nothing"
    with pytest.raises(BpfError, match=r"nothing\.o") as info:
        load_object(tmp_path / "nothing.o", client=client)
    assert info.value.errno == errno.ENOENT
    with load_object(examples["vlan"], client=client) as obj:  # no maps, typed sections
        assert set(obj.programs) == {"push", "pop"}
        with pytest.raises(KeyError, match="no map 'nope'"):
            obj["nope"]


def test_the_loader_is_public_and_lazy() -> None:
    assert {"load_object", "Collection", "Program"} <= set(bpffs.client.__all__)
    assert bpffs.client.load_object is load_object


@pytest.mark.fuse
def test_tc_pins_go_to_the_connected_daemons_mount(start_daemon, examples: dict[str, Path],
                                                   monkeypatch) -> None:
    """No TC_BPF_MNT, no mount=: tc's PIN_GLOBAL_NS and libbpf's pin-by-name maps go to the
    connected daemon's mount (not /sys/fs/bpf), as tc finds its bpffs in /proc/mounts."""
    monkeypatch.delenv("TC_BPF_MNT", raising=False)
    d = start_daemon(mount=True)
    assert d.mount is not None and str(d.mount) != "/sys/fs/bpf"
    assert str(d.mount) in bpffsd_mounts()
    monkeypatch.setenv("BPFFS_SOCKET", str(d.socket))  # the default client: this daemon
    with Client(str(d.socket)) as c:
        assert tc_mount(c) == str(d.mount)
        with load_object(examples["tc_classifier"], prog_type=ProgType.SCHED_CLS) as obj:
            assert obj.pinned[-1] == f"{d.mount}/tc/globals/proto_stats"
        assert (d.mount / "tc/globals/proto_stats").exists()
        with load_object(examples["redirect_fwd"], client=c) as obj:  # LIBBPF_PIN_BY_NAME
            assert obj.pinned == [f"{d.mount}/fwd_target"]
        # $TC_BPF_MNT still comes first, as for tc.
        (d.mount / "elsewhere").mkdir()
        monkeypatch.setenv("TC_BPF_MNT", str(d.mount / "elsewhere"))
        with load_object(examples["tc_classifier"], prog_type=ProgType.SCHED_CLS,
                         client=c) as obj:
            assert obj.pinned[-1] == f"{d.mount}/elsewhere/tc/globals/proto_stats"


def test_bpffsd_mounts_reads_mountinfo_as_tc_reads_proc_mounts(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 0:21 / /sys/fs/bpf rw,nosuid - bpf bpf rw,mode=700\n"
        "90 1 0:52 / /srv/my\\040bpf rw,nosuid,nodev - fuse.bpffsd bpffsd rw,user_id=0\n"
        "91 1 0:53 / /tmp/other rw - fuse.sshfs host:/ rw\n"
        "92 1 0:54 / /run/bpffsd/bpf rw - fuse.bpffsd bpffsd rw\n")
    assert bpffsd_mounts(str(mountinfo)) == ["/srv/my bpf", "/run/bpffsd/bpf"]
    assert bpffsd_mounts(str(tmp_path / "missing")) == []
