"""bpftool's command-line grammar: keywords matched by any unambiguous prefix, object
references (`id N`, `pinned PATH`, `name NAME`) and DATA (`1 0 0 0`, `0x01 ...`,
`hex 01 00 00 00`)."""

from __future__ import annotations

import errno

from bpffs.vm.errors import BpfError

U32_MAX = 0xFFFF_FFFF


def usage(message: str) -> BpfError:
    return BpfError(errno.EINVAL, message)


def parse_int(word: str, what: str, low: int = 0, high: int = U32_MAX) -> int:
    """A number for a field of the kernel's bpf_attr (a u32 unless told), in any base C's
    strtoul takes. Checked here: a bigger number would reach the wire as a msgpack
    OverflowError, and the kernel's fields would silently truncate it."""
    try:
        value = int(word, 0)
    except ValueError:
        raise usage(f"can't parse {what} '{word}': not a number") from None
    if not low <= value <= high:
        raise usage(f"can't parse {what} '{word}': out of range ({low} to {high})")
    return value


def is_prefix(word: str, keyword: str) -> bool:
    return bool(word) and keyword.startswith(word)


def match(word: str, keywords: list[str], what: str) -> str:
    """The keyword `word` abbreviates. As in bpftool, the first keyword of the table that it
    prefixes wins (`m` is map), so tables list the common keywords first."""
    for keyword in keywords:
        if is_prefix(word, keyword):
            return keyword
    raise usage(f"unknown {what} '{word}' (expected one of: {', '.join(keywords)})")


class Args:
    """A cursor over the words of a command."""

    def __init__(self, words: list[str]):
        self.words = list(words)

    def __bool__(self) -> bool:
        return bool(self.words)

    def peek(self) -> str | None:
        return self.words[0] if self.words else None

    def next(self, what: str) -> str:
        if not self.words:
            raise usage(f"missing {what}")
        return self.words.pop(0)

    def next_int(self, what: str, low: int = 0, high: int = U32_MAX) -> int:
        """The next word as a number in [low, high] (default: a u32, as bpf_attr's fields)."""
        return parse_int(self.next(what), what, low, high)

    def keyword(self, keywords: list[str], what: str) -> str:
        return match(self.next(what), keywords, what)

    def accept(self, keyword: str) -> bool:
        """Consume the next word if it abbreviates keyword."""
        if self.words and is_prefix(self.words[0], keyword):
            self.words.pop(0)
            return True
        return False

    def done(self) -> None:
        if self.words:
            raise usage(f"unexpected argument '{self.words[0]}'")

    def object_ref(self, kind: str) -> tuple[str, str]:
        """`id N`, `pinned PATH` or `name NAME` -> (how, value)."""
        how = self.keyword(["id", "pinned", "name"], f"{kind} reference")
        return how, self.next(f"{kind} {how}")

    def data(self, size: int, what: str) -> bytes:
        """DATA of exactly size bytes: numbers (base prefix honoured), or hex after `hex`."""
        base = 16 if self.accept("hex") else 0
        out = bytearray()
        while len(out) < size:
            word = self.next(f"{what} byte {len(out) + 1} of {size}")
            if base == 16 and len(word) > 2:  # `hex 01000000` as one word
                try:
                    out += bytes.fromhex(word)
                except ValueError:
                    raise usage(f"{what}: '{word}' is not hex bytes") from None
                continue
            try:
                value = int(word, base)
            except ValueError:
                raise usage(f"{what}: '{word}' is not a byte") from None
            if not 0 <= value <= 0xFF:
                raise usage(f"{what}: {word} does not fit in a byte")
            out.append(value)
        if len(out) != size:
            raise usage(f"{what}: {len(out)} bytes given, {size} expected")
        return bytes(out)
