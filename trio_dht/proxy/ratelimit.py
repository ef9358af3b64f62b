"""Per-client request rate limiting (sans-IO: the caller passes the time).

The table of clients holds at most ``Limits.http_rate_clients``; when full, a quarter of it is freed in one
pass, oldest clients first, those whose buckets have refilled (they would start full anyway) before busy
ones (:func:`~trio_dht.sources.evict_oldest`): a flood of new clients costs amortised O(1) each.
"""

from __future__ import annotations

from trio_dht.proxy.settings import RateLimit
from trio_dht.sources import client_key, evict_oldest
from trio_dht.token_bucket import TokenBucket


class HttpRateLimiter:
    """Token buckets keyed by client address; IPv4-mapped IPv6 counts as IPv4, IPv6 is grouped per /64."""

    def __init__(self, limit: RateLimit, *, max_clients: int = 100_000) -> None:
        self.limit = limit
        self.max_clients = max_clients
        self._buckets: dict[str, TokenBucket] = {}
        self.refused = 0
        self.evicted = 0
        """Clients forgotten to make room."""

    client_key = staticmethod(client_key)

    def allow(self, host: str, now: float) -> bool:
        """Take one token for ``host``; False (and counted) when its bucket is empty."""
        key = self.client_key(host)
        if key is None or (key[1] and not self.limit.loopback):
            return True
        bucket = self._buckets.get(key[0])
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._prune(now)
            limit = self.limit
            bucket = self._buckets[key[0]] = TokenBucket(limit.per_second, limit.burst, now)
        if bucket.take(now):
            return True
        self.refused += 1
        return False

    def __len__(self) -> int:
        """Clients tracked."""
        return len(self._buckets)

    def _prune(self, now: float) -> None:
        """Free a quarter of the table, oldest first: clients whose buckets have refilled, then busy ones."""
        refill = self.limit.burst / self.limit.per_second
        self.evicted += evict_oldest(self._buckets, self.max_clients, lambda b: now - b.updated >= refill)
