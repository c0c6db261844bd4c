"""Tiering, as JITs do it: a program asked to run on the "auto" tier runs on the compiled tier
at once, and one daemon thread (never the event loop) compiles it to native code meanwhile;
its next runs use the native code (Program.promote).

One thread for the whole process compiles one program at a time: LLVM takes a core while it
works, and the daemon has the event loop and its workers to keep responsive. The queue holds
weak references, so a program unloaded before its turn is never compiled. Nothing here needs
llvmlite: the thread calls back into Program, which imports the native tier.
"""

from __future__ import annotations

import queue
import threading
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..program import Program

_queue: queue.SimpleQueue[weakref.ref[Program]] = queue.SimpleQueue()
_lock = threading.Lock()
_thread: threading.Thread | None = None
THREAD_NAME = "bpffs-native-compiler"


def submit(prog: Program) -> None:
    """Compile `prog` to native code in the background (Program.promote when done)."""
    global _thread
    _queue.put(weakref.ref(prog))
    with _lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_work, name=THREAD_NAME, daemon=True)
            _thread.start()


def _work() -> None:
    while True:
        prog = _queue.get()()
        if prog is not None:
            prog.promote()  # catches what compiling raises: the program stays compiled
        del prog
