"""A token bucket (sans-IO): the one budget of events per second with a burst."""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` held; it starts full. Every call takes the time ``now``."""

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = now

    @property
    def updated(self) -> float:
        """The latest time :meth:`take` was given."""
        return self._at

    def take(self, now: float) -> bool:
        """Spend one token if one is held now; False (and nothing spent) if none is. A time earlier than the
        last one adds nothing."""
        if now > self._at:
            tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
        else:
            tokens = self._tokens
        if tokens < 1:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1
        return True
