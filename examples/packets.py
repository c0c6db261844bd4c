"""Write the sample inputs the README's commands use: `in.pcap` (a classic pcap of Ethernet
frames: ARP, IPv4/UDP, IPv6/UDP and one of an unknown protocol, which tc_classifier drops) and
`pkt.bin` (one IPv4/UDP frame, for `bpffs prog run ... data_in pkt.bin`).

    python3 examples/packets.py [DIR]      # default: the directory of this file
"""

import struct
import sys
from pathlib import Path

MAC_DST, MAC_SRC = bytes.fromhex("020000000002"), bytes.fromhex("020000000001")


def ether(proto: int, payload: bytes) -> bytes:
    return MAC_DST + MAC_SRC + struct.pack("!H", proto) + payload


def ipv4_udp(sport: int, dport: int, data: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                         bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    words = struct.unpack("!10H", header)
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    header = header[:10] + struct.pack("!H", ~total & 0xFFFF) + header[12:]
    return ether(0x0800, header + udp)


def ipv6_udp(sport: int, dport: int, data: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    header = struct.pack("!IHBB16s16s", 6 << 28, len(udp), 17, 64,
                         bytes.fromhex("fd00" + "00" * 13 + "01"),
                         bytes.fromhex("fd00" + "00" * 13 + "02"))
    return ether(0x86DD, header + udp)


def arp_request() -> bytes:
    return ether(0x0806, struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, MAC_SRC,
                                     bytes([10, 0, 0, 1]), bytes(6), bytes([10, 0, 0, 2])))


def frames() -> list[bytes]:
    return [arp_request(), ipv4_udp(1234, 53, b"query"), ipv6_udp(1234, 53, b"query"),
            ipv4_udp(5000, 6000, b"x" * 64), ether(0x88B5, b"local experimental")]


def write_pcap(path: Path, packets: list[bytes]) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))  # DLT_EN10MB
        for i, frame in enumerate(packets):
            f.write(struct.pack("<IIII", 1700000000 + i, 0, len(frame), len(frame)) + frame)


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    write_pcap(out / "in.pcap", frames())
    (out / "pkt.bin").write_bytes(ipv4_udp(1234, 53, b"query"))


if __name__ == "__main__":
    main()
