"""`bpffs mount` and `bpffs status`: the daemon's own commands (no bpftool equivalent)."""

from __future__ import annotations

import time

from ..sync import Client
from .args import Args, usage
from .output import Output

MOUNT_USAGE = ("Usage: bpffs mount DIR [--instance NAME] [--target-pid PID] [--allow-other]\n"
               "       a bpffs at DIR (in the mount namespace of PID); a named instance\n"
               "       persists and is shared by every mount of that name")
STATUS_USAGE = "Usage: bpffs status\n       the daemon, its objects, instances and persistence"
PID_MAX = 2**31 - 1  # pid_t


def mount(client: Client, args: Args, out: Output) -> None:
    """bpffs mount DIR [--instance NAME] [--target-pid PID] [--allow-other]"""
    directory = args.next("mount directory")
    instance = target_pid = None
    allow_other = False
    while args:
        word = args.next("mount option")
        if word == "--instance":
            instance = args.next("instance name")
        elif word == "--target-pid":
            target_pid = args.next_int("pid", 1, PID_MAX)
        elif word == "--allow-other":
            allow_other = True
        else:
            raise usage(f"unknown mount option {word}")
    result = client.mount(directory, instance, target_pid, allow_other)
    where = f" in the mount namespace of pid {target_pid}" if target_pid else ""
    shown = f"instance {result['instance']!r}" if result["instance"] else "an unnamed instance"
    out.line(f"mounted {shown} at {directory}{where}")
    out.emit(result)


def status(client: Client, args: Args, out: Output) -> None:
    args.done()
    info = client.status()
    out.line(f"bpffsd {info['version']} (pid {info['pid']}) on {info['socket']}")
    objects = ", ".join(f"{n} {k}{'s' if n != 1 else ''}"
                        for k, n in sorted(info["objects"].items())) or "no objects"
    out.line(f"objects: {objects}; {info['memlock_pages'] * 4} KiB charged;"
             f" {info['object_fds']} open fds; {info['connections']} connections")
    if info.get("lingering_maps"):
        out.line(f"freed maps still mapped by clients (still charged):"
                 f" {info['lingering_maps']}")
    for inst in info["instances"]:
        name = repr(inst["name"]) if inst["name"] else "(unnamed)"
        where = f"mounted at {', '.join(inst['mounts'])}" if inst["mounts"] else "not mounted"
        out.line(f"instance {name}: {inst['pins']} pin{'s' if inst['pins'] != 1 else ''};"
                 f" {where}")
    persist = info.get("persistence")
    if persist is None:
        out.line("persistence: off")
    else:
        when = (time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(persist["last_snapshot"]))
                if persist["last_snapshot"] else "never")
        failure = f"; FAILING: {persist['journal_failure']}" if persist["journal_failure"] \
            else ""
        out.line(f"persistence: {persist['state_dir']}: journal {persist['journal_bytes']} bytes,"
                 f" last snapshot {when}, {persist['persisted_objects']} objects"
                 f" persisted{failure}")
        restored = persist["restored"]
        problems = restored.get("problems", []) + restored.get("truncated", [])
        out.line(f"last restore: {restored.get('records', 0)} records"
                 + (f"; {len(problems)} problems: {'; '.join(problems)}" if problems else ""))
        for obj in persist.get("unplaced", []):
            out.line(f"UNPLACED {obj['kind']} {obj['name']!r} pinned at"
                     f" {', '.join(obj['paths'])}: {obj['reason']}")
        if persist.get("held"):
            out.line(f"persistence HELD: {persist['held']}")
    out.emit(info)
