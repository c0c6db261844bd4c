"""`bpffs`: the command-line tool, in bpftool's grammar.

    bpffs [OPTIONS] { map | prog | pcap | mount | status | version | help } COMMAND ...
    bpffs [--socket PATH] exec [--] CMD [ARGS...]   (an unmodified BPF tool against bpffsd)
    OPTIONS := { -j|--json | -p|--pretty | -f|--bpffs | -n|--nomount | --socket PATH |
                 -h|--help | -V|--version }

Options may come anywhere, as bpftool's (`bpffs map dump pinned X --json`); `--` ends them.
Keywords may be abbreviated to any unambiguous prefix (`bpffs m s`). `bpffs OBJECT help` (or
`--help` anywhere) shows the object's commands. Errors print one line (`Error: ...` on stderr,
or {"error": ...} with --json) and exit with 256 - errno.
"""

from __future__ import annotations

import errno
import os
import select
import sys
import traceback
from importlib.metadata import PackageNotFoundError, version

from bpffs.vm.errors import BpfError

from ..sync import Client
from . import map as map_cmd
from .args import Args, is_prefix, usage
from .exec import exec_words
from .exec import run as run_exec
from .output import Output, exit_status
from .system import MOUNT_USAGE, STATUS_USAGE, mount, status

OBJECTS = ["map", "prog", "pcap", "mount", "status", "doctor", "version", "help"]
# bpftool's flags, getopt's long names and short letters; -n, -d and -m change nothing here.
LONG_FLAGS = {"json": "json", "pretty": "pretty", "bpffs": "bpffs", "nomount": None,
              "debug": None, "mapcompat": None, "version": "version", "help": "help"}
SHORT_FLAGS = {"j": "json", "p": "pretty", "f": "bpffs", "n": None, "d": None, "m": None,
               "V": "version", "h": "help"}
DISTRIBUTION = "bpffsd"  # pyproject.toml's name: client and daemon are one distribution
SIGPIPE_STATUS = 128 + 13  # what a shell reports for bpftool killed by SIGPIPE


def print_help() -> None:
    print(__doc__.strip())


def parse_options(argv: list[str]) -> tuple[dict, list[str]]:
    """Global options from anywhere in argv, as bpftool's getopt_long permutes them; the other
    words in order. `--` ends the options. A dash-word this table does not know is an error
    before the object word and is left for the command after it (pcap run's `--pcap`, mount's
    `--instance`, a negative number that the command refuses with its own message)."""
    opts: dict = {"json": False, "pretty": False, "bpffs": False, "socket": None,
                  "version": False, "help": False}
    words: list[str] = []
    rest = list(argv)
    while rest:
        word = rest.pop(0)
        if word == "--":
            words += rest
            break
        if word == "--socket" or word.startswith("--socket="):
            if "=" in word:
                opts["socket"] = word.split("=", 1)[1]
            elif rest:
                opts["socket"] = rest.pop(0)
            else:
                raise usage("--socket needs a path")
            continue
        if word.startswith("--") and word[2:] in LONG_FLAGS:
            names = [LONG_FLAGS[word[2:]]]
        elif (word.startswith("-") and not word.startswith("--") and len(word) > 1
              and all(letter in SHORT_FLAGS for letter in word[1:])):
            names = [SHORT_FLAGS[letter] for letter in word[1:]]  # -jp, as getopt
        else:
            if word.startswith("-") and word != "-" and not words:
                raise usage(f"unknown option {word}")
            words.append(word)
            continue
        for name in names:
            if name:
                opts[name] = True
    return opts, words


def object_usage(obj: str, json_mode: bool) -> None:
    """Print the commands of one object (`bpffs map help`), or the whole tool's; with --json,
    `null` as bpftool."""
    if json_mode:
        print("null")
    elif obj == "map":
        print(map_cmd.USAGE)
    elif obj == "prog":
        from . import prog as prog_cmd

        print(prog_cmd.USAGE)
    elif obj == "pcap":
        from .pcap import USAGE

        print(USAGE)
    elif obj == "mount":
        print(MOUNT_USAGE)
    elif obj in ("status", "doctor"):
        print(STATUS_USAGE)
    else:
        print_help()


def asks_help(obj: str, words: list[str]) -> bool:
    """`help` where a command or its first argument goes (`map help`, `map create help`,
    `mount help`): bpftool prints the object's usage there; we never take it for a file
    named help (write ./help for that)."""
    if obj in ("mount", "status", "doctor"):
        return bool(words) and words[0] == "help"
    if not words:
        return False
    # the command word may be abbreviated (`map h`: no other command starts with h)
    return is_prefix(words[0], "help") or (len(words) > 1 and words[1] == "help")


def stdout_closed() -> bool:
    """Whether stdout is a pipe or socket whose reader has gone (poll says POLLERR/POLLHUP):
    tells `bpffs ... | head -1` apart from an EPIPE on the daemon's socket."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError):
        return False


def quiet_exit_on_closed_stdout() -> int:
    """As bpftool killed by SIGPIPE: no message, status 141. stdout goes to /dev/null so that
    Python's final flush of what is still buffered does not complain either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return SIGPIPE_STATUS


def describe(e: OSError) -> str:
    """`Error: ENOENT: in.pcap: No such file or directory`: the errno's name, the file, the
    reason (a BpfError already reads so)."""
    if isinstance(e, BpfError):
        return str(e)
    name = errno.errorcode.get(e.errno, "") if e.errno else ""
    parts = [p for p in (name, e.filename and str(e.filename), e.strerror or str(e)) if p]
    return ": ".join(parts)


def installed_version() -> str:
    """The distribution's version, pyproject.toml's (the daemon reports the same one)."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # a checkout used without an install
        return "unknown"


def run(argv: list[str], out: Output) -> int:
    """Parse argv and run the command it names; the exit status."""
    opts, words = parse_options(argv)
    out.json, out.pretty = opts["json"] or opts["pretty"], opts["pretty"]
    args = Args(words)
    if opts["version"] and not opts["help"]:  # -V anywhere, as bpftool's
        args = Args(["version"])
    obj = args.keyword(OBJECTS, "object") if args else "help"
    if opts["help"] or obj == "help" or asks_help(obj, args.words):
        object_usage(obj, out.json)
        return 0
    if obj == "version":
        number = installed_version()
        out.line(f"bpffs v{number}")
        out.emit({"version": number})
        return 0
    with Client(opts["socket"]) as client:
        if obj == "map":
            map_cmd.run(client, args, out, opts["bpffs"])
        elif obj == "prog":  # imported when used: the ELF loader and dpkt take ~0.2 s
            from . import prog as prog_cmd

            prog_cmd.run(client, args, out, opts["bpffs"])
        elif obj == "pcap":
            from . import pcap as pcap_cmd

            pcap_cmd.run(client, args, out, opts["bpffs"])
        elif obj == "mount":
            mount(client, args, out)
        else:
            status(client, args, out)
    return out.status


def main(argv: list[str] | None = None) -> int:
    """The console script. Whatever happens, the user sees one `Error: ...` line and a status,
    never a traceback (BPFFS_DEBUG=1 shows it for internal errors)."""
    argv = sys.argv[1:] if argv is None else argv
    request = exec_words(argv)  # before option parsing: CMD's own -j/-p stay CMD's
    if request is not None:
        return run_exec(request[1], request[0])
    # Until the options are parsed, JSON mode is guessed the same way for errors in parsing.
    out = Output(json_mode=any(w in ("-j", "--json") for w in argv),
                 pretty=any(w in ("-p", "--pretty") for w in argv))
    try:
        status = run(argv, out)
        sys.stdout.flush()  # a closed pipe shows here rather than at interpreter exit
        return status
    except BrokenPipeError as e:
        if stdout_closed():
            return quiet_exit_on_closed_stdout()
        return fail(out, e)
    except OSError as e:
        return fail(out, e)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug in bpffs: say so in one line, not a traceback
        if os.environ.get("BPFFS_DEBUG"):
            traceback.print_exc()
        return fail(out, e, internal=True)


def fail(out: Output, e: BaseException, internal: bool = False) -> int:
    """Report e as bpftool reports errors; if stdout is gone meanwhile, exit as on SIGPIPE."""
    try:
        if internal:
            out.error(f"internal error in bpffs: {type(e).__name__}: {e} (set BPFFS_DEBUG=1"
                      " for the traceback, and please report it)")
        else:
            assert isinstance(e, OSError)
            out.error(describe(e))
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        return quiet_exit_on_closed_stdout()
    return 255 if internal else exit_status(getattr(e, "errno", None))
