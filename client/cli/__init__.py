"""`bpffs`: the command-line tool, in bpftool's grammar.

    bpffs [OPTIONS] { map | prog | pcap | mount | status | version | help } COMMAND ...
    OPTIONS := { -j|--json | -p|--pretty | -f|--bpffs | -n|--nomount | --socket PATH }

Keywords may be abbreviated to any unambiguous prefix (`bpffs m s`). Errors print one line
(`Error: ...` on stderr, or {"error": ...} with --json) and exit with 256 - errno.
"""

from __future__ import annotations

import sys

from bpffs.daemon import __version__
from bpffs.vm.errors import BpfError

from ..sync import Client
from . import map as map_cmd
from .args import Args, usage
from .output import Output, exit_status
from .system import mount, status

OBJECTS = ["map", "prog", "pcap", "mount", "status", "doctor", "version", "help"]


def print_help() -> None:
    print(__doc__.strip())


def parse_options(argv: list[str]) -> tuple[dict, list[str]]:
    opts = {"json": False, "pretty": False, "bpffs": False, "socket": None}
    rest = list(argv)
    while rest and rest[0].startswith("-") and rest[0] != "-":
        word = rest.pop(0)
        if word in ("-j", "--json"):
            opts["json"] = True
        elif word in ("-p", "--pretty"):
            opts["pretty"] = True
        elif word in ("-f", "--bpffs"):
            opts["bpffs"] = True
        elif word in ("-n", "--nomount", "-d", "--debug", "-m", "--mapcompat"):
            pass  # bpftool's options that change nothing here
        elif word == "--socket":
            if not rest:
                raise usage("--socket needs a path")
            opts["socket"] = rest.pop(0)
        elif word in ("-V", "--version"):
            rest = ["version"]
        elif word in ("-h", "--help"):
            rest = ["help"]
        else:
            raise usage(f"unknown option {word}")
    return opts, rest


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Output(json_mode="-j" in argv or "--json" in argv,
                 pretty="-p" in argv or "--pretty" in argv)
    try:
        opts, words = parse_options(argv)
        args = Args(words)
        if not args:
            print_help()
            return 0
        obj = args.keyword(OBJECTS, "object")
        if obj == "help":
            print_help()
            return 0
        if obj == "version":
            out.line(f"bpffs v{__version__}")
            out.emit({"version": __version__})
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
    except OSError as e:
        out.error(str(e) if isinstance(e, BpfError) else e.strerror or str(e))
        return exit_status(e.errno)
    except KeyboardInterrupt:
        return 130
