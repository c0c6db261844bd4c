"""How bpffsd's log lines look, shared by the daemon and its mount workers (which write to the
same standard error): local time to the millisecond and the pid on every line, or, when
standard error is journald's stream, only the priority prefix (journald stamps the rest)."""

from __future__ import annotations

import datetime
import logging
import os
import sys

LINE = "%(asctime)s bpffsd[%(process)d]: %(levelname)s %(name)s: %(message)s"
JOURNAL_LINE = "%(levelname)s %(name)s: %(message)s"


class TimestampFormatter(logging.Formatter):
    """Log lines start with local time in ISO 8601, to the millisecond, with the UTC offset."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        when = datetime.datetime.fromtimestamp(record.created).astimezone()
        return when.isoformat(timespec="milliseconds")


class JournalFormatter(logging.Formatter):
    """For journald, which stamps the time and the pid itself: only the sd-daemon(3) priority
    prefix (<3> error ... <7> debug), so `journalctl -p` filters by level."""

    PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
                logging.DEBUG: 7}

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{self.PRIORITY.get(record.levelno, 6)}>"
        return prefix + super().format(record).replace("\n", "\n" + prefix)


def stderr_is_journal() -> bool:
    """systemd connected our stderr to journald: JOURNAL_STREAM names that stream's
    device:inode (checked against fd 2, since a child's stderr may go elsewhere)."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(2)
        return (int(dev), int(ino)) == (st.st_dev, st.st_ino)
    except (ValueError, OSError):
        return False


def stderr_handler() -> logging.Handler:
    """A handler writing bpffsd's lines to standard error, as it is now."""
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter(JOURNAL_LINE))
    else:
        handler.setFormatter(TimestampFormatter(LINE))
    return handler


def setup(level: int) -> None:
    """Send every logger's lines to standard error (replacing any handler set before)."""
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(stderr_handler())
    root.setLevel(level)
