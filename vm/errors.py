"""The one error type of the BPF object model: an OSError carrying the kernel's errno.

Raised by maps, the verifier and the VM; the daemon sends errno and message to the client,
which raises it again, so a caller sees `BpfError(E2BIG, "hash map 'flows' is full ...")`.
"""

import errno as _errno
from typing import Any


class BpfError(OSError):
    """OSError with the kernel's errno and a message that says what was wrong."""

    # What a reply may carry besides errno and message, declared so that every BpfError has
    # them (an error made locally, such as a connection reset, has neither).
    detail: Any = None  # the reply's extra datum: a batch's count done, a verifier log, ...
    count: int | None = None  # batch calls: elements applied before the failing one

    def __init__(self, err: int, message: str):
        super().__init__(err, message)

    def __str__(self) -> str:
        return f"{_errno.errorcode.get(self.errno, self.errno)}: {self.strerror}"

    def __reduce__(self):
        return (type(self), (self.errno, self.strerror))


class VmFault(Exception):
    """A program stopped at run time: an invalid memory access, an exhausted instruction budget,
    a call the VM cannot make. The run is abandoned; nothing outside its regions was touched."""

    def __init__(self, message: str, pc: int | None = None):
        super().__init__(message if pc is None else f"insn {pc}: {message}")
        self.pc = pc


class MemoryFault(VmFault):
    """A load or store outside every region the program may touch (or a write to a read-only
    one)."""
