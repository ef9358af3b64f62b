"""The program's log: where its lines go, in what format, and at what rate.

- :class:`LogLimit`: lines about a persistent error a stranger can cause at will, one per interval per event,
  the next saying how many were left out.
- :class:`RateLimitedHandler`: the program's one handler passes at most :data:`LINES_PER_SECOND` lines a
  second on average (:data:`LINES_BURST` at once), so that no flood of any kind can fill a disk; the first
  line after some were dropped is preceded by one saying how many.
- :class:`JsonFormatter`: ``--log-format json``, one JSON object a line (``time`` in ISO 8601 UTC, ``level``,
  ``logger``, ``message``, and ``exc`` with a traceback).
- :class:`JournalFormatter`: text lines on a stderr that systemd's journal reads (``$JOURNAL_STREAM``) start
  with the syslog priority of their level (``<6>`` for INFO...), so ``journalctl -p warning`` filters them,
  and leave the time out (the journal stamps each line).
- :func:`configure`: the program's logging (stderr, or ``-l FILE``), set up once at start.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

from trio_dht.token_bucket import TokenBucket

LINES_PER_SECOND = 20.0
"""Log lines the program writes per second, on average (about 260 MB a day at most)."""
LINES_BURST = 200
"""Log lines the program may write at once (start-up writes about 10)."""
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")


class LogLimit:
    """Lines about a persistent error, at most one per ``every`` seconds; the next says how many were left
    out."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._logged_at = -math.inf
        self._unlogged = 0

    def line(self, text: str, now: float) -> str | None:
        """``text`` to log now (with the count left out since the last), or None: leave it out."""
        self._unlogged += 1
        if now - self._logged_at < self.every:
            return None
        self._logged_at = now
        count, self._unlogged = self._unlogged, 0
        return f"{text} ({count} such events since the last such line)" if count > 1 else text


ALWAYS_LOGGED = frozenset({"trio_dht", "trio_dht.app"})
"""Loggers whose ERROR lines bypass the rate limit: the program's start and stop, never a stranger's doing."""


class RateLimitedHandler(logging.Handler):
    """Hands records to ``inner`` while a token bucket (``rate`` a second, ``burst`` at once) allows, and
    drops the rest. The first record to pass after some were dropped is preceded by a WARNING saying how many,
    at most one such line per :attr:`REPORT_EVERY` seconds (under a steady flood the count grows meanwhile).
    ``clock`` gives seconds (a fake one in tests)."""

    REPORT_EVERY = 10.0

    def __init__(
        self,
        inner: logging.Handler,
        rate: float = LINES_PER_SECOND,
        burst: float = LINES_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.rate = rate
        self._bucket = TokenBucket(rate, burst, clock())
        self._clock = clock
        self.dropped = 0
        """Records dropped in all."""
        self._unreported = 0
        self._reported_at = -math.inf

    def emit(self, record: logging.LogRecord) -> None:
        """Pass ``record`` on if the budget allows. The program's own ERROR lines (its loggers in
        :data:`ALWAYS_LOGGED`: the failure that stops it) always pass, whatever came before them."""
        now = self._clock()
        always = record.levelno >= logging.ERROR and record.name in ALWAYS_LOGGED
        if not always and not self._bucket.take(now):
            self.dropped += 1
            self._unreported += 1
            return
        due = now - self._reported_at >= self.REPORT_EVERY
        if self._unreported and (due or always):
            self._report_dropped(now)
        self.inner.handle(record)

    def _report_dropped(self, now: float) -> None:
        self._reported_at = now
        count, self._unreported = self._unreported, 0
        note = logging.LogRecord(
            __name__,
            logging.WARNING,
            __file__,
            0,
            "%d log lines dropped (more than %g a second)",
            (count, self.rate),
            None,
        )
        self.inner.handle(note)

    def close(self) -> None:
        """Say how many lines were dropped since the last such note, then close."""
        if self._unreported:
            self._report_dropped(self._clock())
        self.inner.close()
        super().close()

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        self.inner.setFormatter(fmt)

    def flush(self) -> None:
        self.inner.flush()


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``, ``message``,
    and ``exc`` (the formatted traceback) when the record carries an exception."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        doc = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False)


class JournalFormatter(logging.Formatter):
    """``<priority>logger: message``, the priority being syslog's for the record's level (DEBUG 7, INFO 6,
    WARNING 4, ERROR 3, CRITICAL 2)."""

    PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in self.PRIORITIES if record.levelno >= level), 7)
        return f"<{priority}>{super().format(record)}"


def to_journal(stream: IO[str], environ: Mapping[str, str]) -> bool:
    """Whether ``stream`` is the journal's: ``$JOURNAL_STREAM`` (``device:inode``) names its file."""
    try:
        device, inode = (int(part) for part in environ.get("JOURNAL_STREAM", "").split(":"))
        stat = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of ``--log-format`` (``text`` or ``json``)."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"not a log format: {log_format!r} (use {' or '.join(FORMATS)})")


def open_log_file(path: Path) -> logging.Handler:
    """A handler appending to ``path``, opened now (OSError if it cannot be); it reopens the file when it was
    moved or removed (log rotation)."""
    return logging.handlers.WatchedFileHandler(path, mode="a", encoding="utf-8")


def configure(
    verbose: int,
    handler: logging.Handler | None = None,
    log_format: str = "text",
    *,
    stream: IO[str] | None = None,
    environ: Mapping[str, str] = os.environ,
) -> None:
    """The program's logging: trio_dht's lines from INFO (DEBUG with ``-v``), other libraries' from WARNING
    (INFO with ``-v``, DEBUG with ``-vv``), through ``handler`` (default: ``stream``, stderr; as
    :class:`JournalFormatter` lines when that is the journal's and the format is text), rate-limited (not
    with ``-vv``, which asks for every line). Like :func:`logging.basicConfig`, it adds no handler to a root
    logger that has one already (an embedding program's, a test runner's)."""
    root = logging.getLogger()
    if not root.handlers:
        stream = stream or sys.stderr
        inner = handler if handler is not None else logging.StreamHandler(stream)
        journal = handler is None and log_format == "text" and to_journal(stream, environ)
        inner.setFormatter(JournalFormatter() if journal else formatter(log_format))
        root.addHandler(inner if verbose >= 2 else RateLimitedHandler(inner))
    elif handler is not None:
        handler.close()
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING)
    logging.getLogger("trio_dht").setLevel(logging.DEBUG if verbose else logging.INFO)
