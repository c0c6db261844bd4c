"""The errors of the BPF object model: an OSError carrying the kernel's errno, and one subclass
per kind of datum an error carries besides (cilium/ebpf's VerifierError, in internal/errors.go).

Raised by maps, the verifier and the VM; the daemon sends errno, message and that datum to the
client, which raises the same class again, so a caller sees
`BpfError(E2BIG, "hash map 'flows' is full ...")` or `VerifierError(EACCES, ..., log)`.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Callable
from typing import Any, ClassVar


class BpfError(OSError):
    """OSError with the kernel's errno and a message that says what was wrong."""

    # A subclass's one datum: the name of its attribute, which is also its tag in an error
    # reply (bpffs.protocol), so that it keeps one name from where it is made to the caller.
    DETAIL: ClassVar[str] = ""

    def __init__(self, err: int, message: str):
        super().__init__(err, message)

    def __str__(self) -> str:
        return f"{_errno.errorcode.get(self.errno, self.errno)}: {self.strerror}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.errno, self.strerror, *self.detail().values()))

    def detail(self) -> dict[str, Any]:
        """What the error carries besides errno and message, by name ({} for none)."""
        return {self.DETAIL: getattr(self, self.DETAIL)} if self.DETAIL else {}


class VerifierError(BpfError):
    """BPF_PROG_LOAD refused, with the verifier log the caller asked for (log_level > 0) as its
    log_size buffer holds it: the lines up to the refusal."""

    DETAIL = "log"

    def __init__(self, err: int, message: str, log: str):
        super().__init__(err, message)
        self.log = log


class BatchError(BpfError):
    """A map batch call stopped at a failing element: `count` elements took effect before it
    (the kernel's attr.batch.count)."""

    DETAIL = "count"

    def __init__(self, err: int, message: str, count: int):
        super().__init__(err, message)
        self.count = count


class RunOutputError(BpfError):
    """BPF_PROG_TEST_RUN whose data_out does not fit data_size_out (ENOSPC): `output` holds the
    run's results all the same (retval, data_out, duration, ...), as the kernel copies them out
    before it fails."""

    DETAIL = "output"

    def __init__(self, err: int, message: str, output: dict[str, Any]):
        super().__init__(err, message)
        self.output = output


# The subclass an error reply's tagged datum stands for, by tag: made with (errno, message, datum).
DETAILS: dict[str, Callable[[int, str, Any], BpfError]] = {
    VerifierError.DETAIL: VerifierError,
    BatchError.DETAIL: BatchError,
    RunOutputError.DETAIL: RunOutputError,
}


class VmFault(Exception):
    """A program stopped at run time: an invalid memory access, an exhausted instruction budget,
    a call the VM cannot make. The run is abandoned; nothing outside its regions was touched."""

    def __init__(self, message: str, pc: int | None = None):
        super().__init__(message if pc is None else f"insn {pc}: {message}")
        self.pc = pc


class MemoryFault(VmFault):
    """A load or store outside every region the program may touch (or a write to a read-only
    one)."""
