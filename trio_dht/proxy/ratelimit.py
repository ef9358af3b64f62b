"""Per-client request rate limiting (sans-IO: the caller passes the time)."""

from __future__ import annotations

from dataclasses import dataclass

from trio_dht.proxy.config import RateLimit
from trio_dht.proxy.conn_limits import client_key


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets keyed by client address; IPv4-mapped IPv6 counts as IPv4, IPv6 is grouped per /64."""

    def __init__(self, limit: RateLimit, *, max_clients: int = 100_000) -> None:
        self.limit = limit
        self.max_clients = max_clients
        self._buckets: dict[str, _Bucket] = {}
        self.refused = 0

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
            bucket = self._buckets[key[0]] = _Bucket(float(self.limit.burst), now)
        else:
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(float(self.limit.burst), bucket.tokens + elapsed * self.limit.per_second)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        self.refused += 1
        return False

    def _prune(self, now: float) -> None:
        """Forget clients whose buckets have refilled (they would start full anyway)."""
        refill = self.limit.burst / self.limit.per_second
        self._buckets = {k: b for k, b in self._buckets.items() if now - b.updated < refill}
        if len(self._buckets) >= self.max_clients:  # all busy: drop the oldest half
            keep = sorted(self._buckets.items(), key=lambda kv: kv[1].updated)[len(self._buckets) // 2 :]
            self._buckets = dict(keep)
