"""Exponential backoff with jitter (sans-IO): how long to wait after failures in a row.

After ``n`` failures in a row the wait is ``initial * factor ** (n - 1)``, at most ``maximum``, less a random
part of up to ``jitter`` of it (drawn uniformly), so that clients failing together do not retry together and
no wait exceeds ``maximum``. :meth:`Backoff.delay` is that formula for a count kept elsewhere (the push
dispatcher counts per lane and per push); :meth:`Backoff.failed` and :meth:`Backoff.succeeded` keep the count
themselves (the proxy client's LISTEN streams and SUBSCRIBE retries).
"""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Waits of ``initial``, ``initial * factor``, ... up to ``maximum``, each less up to ``jitter`` of it.

    :meth:`succeeded` starts over; for a stream, :meth:`ended` counts it a success only once it stayed up
    ``stable_after`` seconds (a server that accepts and drops every stream at once must not be hammered).
    """

    __slots__ = ("_rng", "factor", "failures", "initial", "jitter", "maximum", "stable_after")

    def __init__(
        self,
        initial: float = 0.25,
        maximum: float = 60.0,
        *,
        factor: float = 2.0,
        jitter: float = 0.2,
        stable_after: float = 10.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not initial > 0 or not maximum > 0 or factor < 1 or not 0 <= jitter < 1:
            raise ValueError("need initial > 0, maximum > 0, factor >= 1 and 0 <= jitter < 1")
        self.initial = min(initial, maximum)  # a first wait above the cap is the cap
        self.maximum = maximum
        self.factor = float(factor)
        self.jitter = jitter
        self.stable_after = stable_after
        self._rng = rng
        self.failures = 0
        """Failures in a row counted by :meth:`failed`."""

    def delay(self, failures: int) -> float:
        """The wait after ``failures`` (at least 1) failures in a row."""
        try:
            wait = min(self.maximum, self.initial * self.factor ** (failures - 1))
        except OverflowError:  # a very long outage: the wait stopped growing long ago
            wait = self.maximum
        return wait * (1 - self.jitter * (1 - self._rng()))

    def failed(self) -> float:
        """Count a failure; the wait before the next attempt."""
        self.failures += 1
        return self.delay(self.failures)

    def succeeded(self) -> None:
        self.failures = 0

    def ended(self, lasted: float) -> float:
        """A stream that had started ended after ``lasted`` seconds; the wait before restarting it."""
        if lasted >= self.stable_after:
            self.succeeded()
        return self.failed()
