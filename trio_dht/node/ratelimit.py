"""Incoming request rate limits (OpenDHT: 1024/s per IP, 8192/s overall, over a sliding second). Sans-IO.

IPv6 sources are grouped by /64. Loopback sources are limited per (IP, port) instead, so that many nodes on
one machine (tests, benchmarks) do not share one budget.
"""

from __future__ import annotations

from collections import deque
from ipaddress import IPv6Address

from trio_dht.wire.compact import Address, is_ipv6, is_loopback

PER_IP_DEFAULT = 1024
GLOBAL_DEFAULT = 8192
WINDOW = 1.0
MAX_TRACKED = 65536


class _Window:
    __slots__ = ("limit", "times")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.times: deque[float] = deque()

    def allow(self, now: float) -> bool:
        times = self.times
        while times and now - times[0] >= WINDOW:
            times.popleft()
        if len(times) >= self.limit:
            return False
        times.append(now)
        return True


class RateLimiter:
    """``allow(addr, now)`` is False when a request must be dropped. A limit below 0 disables it."""

    def __init__(self, per_ip: int = PER_IP_DEFAULT, total: int = GLOBAL_DEFAULT) -> None:
        self.per_ip = per_ip
        self._global = _Window(total) if total >= 0 else None
        self._sources: dict[object, _Window] = {}
        self.dropped = 0

    @staticmethod
    def _source(addr: Address) -> object:
        ip = addr[0]
        if is_loopback(ip):
            return addr
        if is_ipv6(ip):
            return IPv6Address(ip).packed[:8]
        return ip

    def allow(self, addr: Address, now: float) -> bool:
        """Per source first, then global (as OpenDHT): a flooding source cannot use up the global budget."""
        if self.per_ip >= 0:
            key = self._source(addr)
            window = self._sources.get(key)
            if window is None:
                if len(self._sources) >= MAX_TRACKED:
                    self._prune(now)
                window = self._sources[key] = _Window(self.per_ip)
            if not window.allow(now):
                self.dropped += 1
                return False
        if self._global is not None and not self._global.allow(now):
            self.dropped += 1
            return False
        return True

    def _prune(self, now: float) -> None:
        for key in [k for k, w in self._sources.items() if not w.times or now - w.times[-1] >= WINDOW]:
            del self._sources[key]
