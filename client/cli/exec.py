"""`bpffs exec [--socket S] [--] CMD [ARGS...]`: run an unmodified BPF tool against bpffsd.

CMD's bpf() calls, and the statfs/readlink/fdinfo/mount calls tools make to accept a bpffs
mount and bpf fds, are answered by bpffsd through seccomp user notification (no LD_PRELOAD:
static and Go binaries too). The exit status is CMD's (128 + N when signal N killed it).
no_new_privs is set for CMD: setuid programs run without their privileges under it.
"""

from __future__ import annotations

import sys

from bpffs.vm.errors import BpfError

USAGE = "Usage: bpffs exec [--socket PATH] [--] CMD [ARGS...]"
USAGE_STATUS = 2


def parse(argv: list[str]) -> tuple[str | None, list[str]]:
    """(socket, command) from exec's arguments; ValueError on a usage error."""
    socket_path = None
    rest = list(argv)
    while rest and rest[0].startswith("-"):
        word = rest.pop(0)
        if word == "--":
            break
        if word == "--socket" and rest:
            socket_path = rest.pop(0)
        elif word.startswith("--socket="):
            socket_path = word.split("=", 1)[1]
        else:
            raise ValueError(f"unknown option {word}")
    if not rest:
        raise ValueError("no command given")
    return socket_path, rest


def exec_words(argv: list[str]) -> tuple[str | None, list[str]] | None:
    """For `bpffs`'s main: (global --socket, exec's words) when argv's command is `exec`,
    else None. exec is looked for before the global options are parsed, so that the
    command's own options (`bpftool -j ...`) are never taken for bpffs's."""
    socket_path, rest = None, list(argv)
    while rest and rest[0].startswith("--socket"):
        word = rest.pop(0)
        if "=" in word:
            socket_path = word.split("=", 1)[1]
        elif rest:
            socket_path = rest.pop(0)
    if rest and rest[0] == "exec":
        return socket_path, rest[1:]
    return None


def run(argv: list[str], socket_path: str | None = None) -> int:
    """exec's words after `exec` (socket_path: the global --socket, if given); exit status."""
    try:
        own_socket, command = parse(argv)
    except ValueError as e:
        print(f"Error: {e}\n{USAGE}", file=sys.stderr)
        return USAGE_STATUS
    from bpffs.client.seccomp import run as supervise

    try:
        return supervise(command, own_socket or socket_path)
    except BpfError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 255
    except OSError as e:
        print(f"Error: bpffs exec: {e.strerror or e}", file=sys.stderr)
        return 255


def main(argv: list[str] | None = None) -> int:
    return run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
