"""Plain and JSON output in bpftool's shapes, and its error convention: a plain error is one
`Error: message` line on stderr; with --json it is {"error": message} on stdout. The exit
status is 256 - errno (EEXIST -> 239), 255 when there is no errno."""

from __future__ import annotations

import contextlib
import errno
import json
import sys
from collections.abc import Iterator
from typing import Any

from bpffs.vm.errors import BpfError


def hex_bytes(data: bytes) -> str:
    return " ".join(f"{b:02x}" for b in data)


def json_bytes(data: bytes) -> list[str]:
    return [f"0x{b:02x}" for b in data]


class Output:
    def __init__(self, json_mode: bool = False, pretty: bool = False):
        self.json = json_mode or pretty
        self.pretty = pretty
        self.status = 0  # exit status of a command that printed its answer yet failed

    def fail_with(self, err: int) -> None:
        """End with bpftool's status for err after printing (lookup: "Not found")."""
        self.status = exit_status(err)

    def emit(self, value: Any) -> None:
        """A JSON document (only in JSON mode)."""
        if self.json:
            print(json.dumps(value, indent=4 if self.pretty else None, default=_default,
                             separators=None if self.pretty else (",", ":")))  # as bpftool

    def line(self, text: str = "") -> None:
        if not self.json:
            print(text)

    def error(self, message: str) -> None:
        if self.json:
            print(json.dumps({"error": message}, separators=(",", ":")))
        else:
            print(f"Error: {message}", file=sys.stderr)


def _default(value: Any) -> Any:
    if isinstance(value, bytes):
        return json_bytes(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def exit_status(err: int | None) -> int:
    return 256 - err if err and 0 < err < 256 else 255


@contextlib.contextmanager
def named(path: str) -> Iterator[None]:
    """Errors about a file name it (`in.pcap: ENOENT: No such file or directory`): a command
    that reads one file and writes another must say which one failed."""
    try:
        yield
    except BpfError as e:
        raise BpfError(e.errno, f"{path}: {e.strerror}") from None
    except OSError as e:
        raise BpfError(e.errno or errno.EIO, f"{path}: {e.strerror or e}") from None
