"""Log lines about errors a stranger can cause at will, at a bounded rate."""

from __future__ import annotations

import math


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
