"""Incoming request rate limits (OpenDHT: 1024/s per IP, 8192/s overall, over a sliding second). Sans-IO.

IPv6 sources are grouped by /64. Loopback sources are limited per (IP, port) instead, so that many nodes on
one machine (tests, benchmarks) do not share one budget.

The table of sources holds at most ``Limits.udp_rate_sources``. When full, a quarter of it is freed at once,
oldest sources first: one pass evicts those idle for a window or below half their limit (the least to
forget), and only if that frees too little does a second pass evict the oldest busy ones. A flood of new
sources then costs one pass per quarter-table of them (amortised O(1) each), never one scan per packet, and
busy sources keep their windows. A source evicted while active starts a fresh window: the global limit still
holds.
"""

from __future__ import annotations

from collections import deque

from trio_dht.limits import DEFAULT, Limits
from trio_dht.sources import client_key, evict_oldest
from trio_dht.wire.compact import Address, is_ipv6

PER_IP_DEFAULT = 1024
GLOBAL_DEFAULT = 8192
WINDOW = 1.0


def source_key(addr: Address) -> object:
    """What a source's budgets are kept per: :func:`~trio_dht.sources.client_key` (the IPv4 address, the
    IPv6 /64), except that a loopback source is kept per (IP, port).

    Called for every datagram: an IPv4 address (dotted quad, as the socket gives it, already its key) is
    read without parsing, an IPv6 one is parsed once while it stays among the 4096 most recently seen."""
    ip = addr[0]
    if not is_ipv6(ip):
        return addr if ip.startswith("127.") else ip
    key = client_key(ip)
    return addr if key is None or key[1] else key[0]


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


class UdpRateLimiter:
    """``allow(addr, now)`` is False when a request must be dropped. A limit below 0 disables it."""

    def __init__(
        self, per_ip: int = PER_IP_DEFAULT, total: int = GLOBAL_DEFAULT, *, limits: Limits = DEFAULT
    ) -> None:
        self.per_ip = per_ip
        self._global = _Window(total) if total >= 0 else None
        self._sources: dict[object, _Window] = {}
        self.max_sources = limits.udp_rate_sources
        self.dropped = 0
        self.evicted = 0
        """Sources forgotten to make room (idle or not)."""

    def allow(self, addr: Address, now: float) -> bool:
        """Per source first, then global (as OpenDHT): a flooding source cannot use up the global budget."""
        if self.per_ip >= 0:
            key = source_key(addr)
            window = self._sources.get(key)
            if window is None:
                if len(self._sources) >= self.max_sources:
                    self._prune(now)
                window = self._sources[key] = _Window(self.per_ip)
            if not window.allow(now):
                self.dropped += 1
                return False
        if self._global is not None and not self._global.allow(now):
            self.dropped += 1
            return False
        return True

    def __len__(self) -> int:
        return len(self._sources)

    def _prune(self, now: float) -> None:
        """Free a quarter of the table, oldest first: idle or light sources, then (if need be) busy ones."""
        light = self.per_ip // 2
        self.evicted += evict_oldest(
            self._sources,
            self.max_sources,
            lambda window: len(window.times) <= light or now - window.times[-1] >= WINDOW,
        )
