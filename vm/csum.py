"""Internet checksum arithmetic exactly as the kernel's (include/net/checksum.h,
net/core/utils.c inet_proto_csum_replace*): one's complement sums with end-around carry.

Values are as they lie in memory, read as little-endian integers; one's complement sums do
not care about byte order as long as every operand is read the same way.
"""

U16 = 0xFFFF
U32 = 0xFFFFFFFF


def csum_add(a: int, b: int) -> int:
    s = (a & U32) + (b & U32)
    return (s + (s >> 32)) & U32


def csum_sub(a: int, b: int) -> int:
    return csum_add(a, ~b & U32)


def csum_fold(s: int) -> int:
    s = (s & U16) + (s >> 16)
    s = (s & U16) + (s >> 16)
    return ~s & U16


def csum16_add(a: int, b: int) -> int:
    s = (a & U16) + (b & U16)
    return (s + (s >> 16)) & U16


def csum_replace2(sum16: int, old: int, new: int) -> int:
    return ~csum16_add(csum16_add(~sum16 & U16, ~old & U16), new) & U16


def csum_replace4(sum16: int, old: int, new: int) -> int:
    return csum_fold(csum_add(csum_sub(~sum16 & U32, old), new))


def csum_replace_by_diff(sum16: int, diff: int) -> int:
    return csum_fold(csum_add(diff, ~sum16 & U32))
