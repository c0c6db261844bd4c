"""Every 4.4 helper (ids 1-25): prototypes for the verifier, implementations for the VM.

An implementation is `fn(run, r1, r2, r3, r4, r5) -> int`; errors are returned as the
kernel returns them (a negative errno in r0), never raised. Modules: maps.py (map access and
tail calls), skb.py (packet helpers of socket and tc programs), tracing.py (task, time,
trace_printk, probe_read, perf events).
"""

from . import maps, skb, tracing  # noqa: F401 - they register into HELPERS
from .spec import HELPERS, ArgType, HelperSpec, RetType

__all__ = ["HELPERS", "ArgType", "HelperSpec", "RetType"]
