"""The kernel state a program run sees, which an emulator has to be told.

A helper that in the kernel reads the current task, the clock, routes, cgroups, tunnels or
perf counters reads it from the run's `RunEnv` instead. The daemon fills in the caller's
identity; the rest comes from the options of a test run (`bpffs prog run ... ` or
`prog_test_run(fd, data, **options)`):

  cpu             int   CPU the program runs on (get_smp_processor_id, BPF_F_CURRENT_CPU) [0]
  comm            str   current->comm (get_current_comm) ["bpffs-run"]
  pid, tgid       int   current task (get_current_pid_tgid) [the caller's pid]
  uid, gid        int   current credentials (get_current_uid_gid) [the caller's]
  cgroup_classid  int   net_cls classid of the packet's cgroup (get_cgroup_classid) [0]
  route_realm     int   realm of the packet's route, dst->tclassid (get_route_realm) [0]
  tunnel_key      dict  received tunnel metadata {tunnel_id, remote_ipv4} (skb_get_tunnel_key)
                        [none: the helper fails with -EINVAL, as on a non-tunnel device]
  interfaces      list  ifindexes that exist, for clone_redirect [[1] (loopback)]
  perf_counters   dict  map index -> counter value read by perf_event_read [the event's 0]
  ktime_ns        int   fixed bpf_ktime_get_ns value [CLOCK_MONOTONIC]
  seed            int   seed of get_prandom_u32 [random]
  kernel_memory   dict  address -> bytes that probe_read may read [none]
  budget          int   instructions per run before the VM stops the program [1,000,000]
"""

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import BpfError

DEFAULT_BUDGET = 1_000_000


@dataclass
class RunEnv:
    cpu: int = 0
    comm: str = "bpffs-run"
    pid: int = field(default_factory=os.getpid)
    tgid: int | None = None
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    cgroup_classid: int = 0
    route_realm: int = 0
    tunnel_key: dict | None = None
    interfaces: list[int] = field(default_factory=lambda: [1])
    perf_counters: dict[int, int] = field(default_factory=dict)
    ktime_ns: int | None = None
    seed: int | None = None
    kernel_memory: dict[int, bytes] = field(default_factory=dict)
    budget: int = DEFAULT_BUDGET
    trace: Callable[[str], None] | None = None
    rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        if self.tgid is None:
            self.tgid = self.pid

    def ktime(self) -> int:
        return time.monotonic_ns() if self.ktime_ns is None else self.ktime_ns

    OPTIONS = ("cpu", "comm", "pid", "tgid", "cgroup_classid", "route_realm", "tunnel_key",
               "interfaces", "perf_counters", "ktime_ns", "seed", "kernel_memory", "budget")

    @classmethod
    def from_options(cls, options: dict[str, Any], *, pid: int, uid: int, gid: int,
                     trace: Callable[[str], None] | None = None) -> RunEnv:
        """An environment from a client's options. Each is checked against its type and range
        here, once: an unknown option or a bad value is EINVAL naming it (a typo must not
        silently run with defaults, and a bad value must not reach a helper mid-run)."""
        unknown = set(options) - set(_CHECKS) - {"tier"}
        if unknown:
            raise BpfError(errno.EINVAL, f"unknown run option(s) {', '.join(sorted(unknown))}"
                           f" (known: {', '.join(cls.OPTIONS)})")
        kwargs = {k: _CHECKS[k](k, v) for k, v in options.items() if k in _CHECKS}
        return cls(pid=kwargs.pop("pid", pid), uid=uid, gid=gid, trace=trace, **kwargs)


def _bad(name: str, value: Any, expected: str) -> BpfError:
    return BpfError(errno.EINVAL, f"run option {name}={value!r}: expected {expected}")


def _uint(bits: int) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if type(value) is not int or not 0 <= value < 1 << bits:
            raise _bad(name, value, f"an integer in [0, 2**{bits})")
        return value
    return check


_u32, _u64 = _uint(32), _uint(64)


def _comm(name: str, value: Any) -> str:
    """Any string: like set_task_comm(), get_current_comm keeps its first TASK_COMM_LEN - 1
    bytes."""
    if not isinstance(value, str):
        raise _bad(name, value, "a string")
    return value


def _tunnel_key(name: str, value: Any) -> dict:
    if not isinstance(value, dict) or set(value) - {"tunnel_id", "remote_ipv4"}:
        raise _bad(name, value, "a dict of tunnel_id and remote_ipv4")
    return {k: _u32(f"{name}.{k}", v) for k, v in value.items()}


def _interfaces(name: str, value: Any) -> list[int]:
    if not isinstance(value, list):
        raise _bad(name, value, "a list of ifindexes")
    return [_u32(name, v) for v in value]


def _table(key: Callable[[str, Any], int], value_check: Callable[[str, Any], Any],
           expected: str) -> Callable[[str, Any], dict]:
    def check(name: str, value: Any) -> dict:
        if not isinstance(value, dict):
            raise _bad(name, value, expected)
        # msgpack may carry integer keys as strings (JSON-born options): accept digits only
        return {key(name, int(k) if isinstance(k, str) and k.isdigit() else k):
                value_check(name, v) for k, v in value.items()}
    return check


def _bytes(name: str, value: Any) -> bytes:
    if not isinstance(value, (bytes, bytearray)):
        raise _bad(name, value, "bytes")
    return bytes(value)


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "cpu": _u32, "comm": _comm, "pid": _u32, "tgid": _u32, "cgroup_classid": _u32,
    "route_realm": _u32, "tunnel_key": _tunnel_key, "interfaces": _interfaces,
    "perf_counters": _table(_u32, _u64, "a dict of map index -> counter value"),
    "ktime_ns": _u64, "seed": _u64,
    "kernel_memory": _table(_u64, _bytes, "a dict of address -> bytes"),
    "budget": _u64,
}
assert set(_CHECKS) == set(RunEnv.OPTIONS)


class PerfEvent:
    """A perf event opened on one CPU (PERF_COUNT_SW_BPF_OUTPUT): the target of
    perf_event_output when stored in a PERF_EVENT_ARRAY, and a counter for perf_event_read.
    The daemon sets `on_output` to deliver samples to the event's fd."""

    def __init__(self, cpu: int = 0):
        self.cpu = cpu
        self.count = 0
        self.on_output: Callable[[int, bytes], None] | None = None

    def output(self, cpu: int, data: bytes) -> None:
        self.count += 1
        if self.on_output is not None:
            self.on_output(cpu, data)
