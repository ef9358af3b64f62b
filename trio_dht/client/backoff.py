"""Exponential backoff with jitter (sans-IO), for restarting LISTEN streams and retrying SUBSCRIBE."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delays ``initial``, ``initial * factor``, ... up to ``maximum``, each scaled by ``1 ± jitter``.

    :meth:`succeeded` starts over; a stream counts as a success only once it stayed up ``stable_after``
    seconds (a proxy that accepts and drops every stream at once must not be hammered).
    """

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
        if not 0 < initial <= maximum or factor < 1 or not 0 <= jitter < 1:
            raise ValueError("need 0 < initial <= maximum, factor >= 1 and 0 <= jitter < 1")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self.stable_after = stable_after
        self._rng = rng
        self.failures = 0

    def failed(self) -> float:
        """Count a failure; the delay before the next attempt."""
        base = min(self.maximum, self.initial * self.factor**self.failures)
        self.failures += 1
        return base * (1 + self.jitter * (2 * self._rng() - 1))

    def succeeded(self) -> None:
        self.failures = 0

    def ended(self, lasted: float) -> float:
        """A stream that had started ended after ``lasted`` seconds; the delay before restarting it."""
        if lasted >= self.stable_after:
            self.succeeded()
        return self.failed()
