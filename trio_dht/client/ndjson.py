"""Reading the proxy's NDJSON bodies (sans-IO): lines put back together across chunks, each one a value.

GET, LISTEN and SUBSCRIBE replies carry one value JSON per line (a 64 KiB value is a ~90 KB line, split over
many chunks and reads). A line ``{}`` is OpenDHT's "no values here" marker (SUBSCRIBE's reply to a new or
refreshed subscription); ``"expired": true`` marks an expiration in a LISTEN stream.
"""

from __future__ import annotations

import json
import logging

from trio_dht.api import ValueEvent
from trio_dht.rest.value_json import ValueJsonError, value_from_json

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20
"""Longest line accepted (the largest value, 64 KiB, is about 90 KB of JSON)."""


class LineTooLong(ValueError):
    """A line longer than :data:`MAX_LINE`: not a proxy speaking OpenDHT's JSON."""


class LineSplitter:
    """Complete lines out of arbitrary chunks: ``feed(chunk)`` as they come, then ``end()``."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._pending = bytearray()
        self._max_line = max_line

    def feed(self, data: bytes) -> list[bytes]:
        """The lines ``data`` completes (without their ``\\n``; blank lines dropped)."""
        self._pending += data
        if b"\n" not in data:
            if len(self._pending) > self._max_line:
                raise LineTooLong(f"a line longer than {self._max_line} bytes")
            return []
        *lines, rest = self._pending.split(b"\n")
        self._pending = bytearray(rest)
        if len(rest) > self._max_line:
            raise LineTooLong(f"a line longer than {self._max_line} bytes")
        return [bytes(line) for line in lines if line.strip()]

    def end(self) -> list[bytes]:
        """The last line, if the body did not end with a newline."""
        rest, self._pending = bytes(self._pending), bytearray()
        return [rest] if rest.strip() else []


def parse_line(line: bytes) -> ValueEvent | None:
    """One line as a :class:`ValueEvent`; None for the empty object ``{}``.

    Raises :class:`~trio_dht.rest.value_json.ValueJsonError` for a line that is not a value.
    """
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        raise ValueJsonError("a line that is not JSON") from None
    if obj == {}:
        return None
    value = value_from_json(obj)
    return ValueEvent(value, expired=obj.get("expired") is True)


def value_events(lines: list[bytes], source: str) -> list[ValueEvent]:
    """The values of ``lines`` (``{}`` lines left out); a line that is not a value is skipped with a warning
    naming ``source``."""
    events = []
    for line in lines:
        try:
            event = parse_line(line)
        except ValueJsonError as exc:
            log.warning("skipped a line from %s that is not a value: %s", source, exc)
            continue
        if event is not None:
            events.append(event)
    return events
