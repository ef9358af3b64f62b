"""The source a peer or client is counted under, and the eviction of a full table of sources (sans-IO).

* :func:`client_key`: IPv4 as it is (also when IPv4-mapped in IPv6), IPv6 per /64 (its network address),
  and whether it is a loopback address. The node's rate limiter, its storage quotas and every per-client
  cap of the proxy (connections, listens, rate limits, subscriptions, permanent puts) key on it.
* :func:`evict_oldest`: free a quarter of a full table in one pass, oldest first, light entries before
  busy ones, so that a flood of new sources costs amortised O(1) each.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
from collections.abc import Callable
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


@functools.lru_cache(maxsize=4096)  # a source is usually a recent one: parse its address once
def client_key(host: str) -> tuple[str, bool] | None:
    """(the key a source is counted under, is loopback), or None if ``host`` is not an IP address (an IPv6
    scope, ``%eth0``, is ignored)."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Address(int(addr) >> 64 << 64)), addr.is_loopback
    return str(addr), addr.is_loopback


def evict_oldest(table: dict[K, V], cap: int, light: Callable[[V], bool]) -> int:
    """Make room in ``table`` (insertion order: oldest first) once it holds ``cap``: down to three quarters of
    ``cap``, one pass evicting the oldest entries ``light`` says little is lost with, then (only if that freed
    too few) the oldest others. Returns how many were evicted."""
    excess = len(table) - (cap - max(1, cap // 4))
    if excess <= 0:
        return 0
    evict = []
    for key, value in table.items():
        if len(evict) >= excess:
            break
        if light(value):
            evict.append(key)
    for key in evict:
        del table[key]
    rest = excess - len(evict)
    if rest > 0:
        for key in list(itertools.islice(table, rest)):
            del table[key]
    return excess
