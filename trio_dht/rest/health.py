"""What a proxy's peers say about its health, for the proxy's ``GET /healthz`` and the device client alike.

OpenDHT's client trusts a proxy as *Connected* only when its node has good nodes (``ipv4.good + ipv6.good >
0``), *Connecting* when it has only dubious ones. A node with no peer at all is **isolated**: a proxy in front
of it (a "zombie" proxy, which OpenDHT's client takes for a healthy one) serves GETs from its local storage
and its PUTs fail. :func:`peer_status` is that rule, the one place it is written.
"""

from __future__ import annotations

import enum

from trio_dht.api import FamilyStats


class ProxyStatus(enum.Enum):
    CONNECTED = "connected"
    """The proxy's node has good peers."""
    CONNECTING = "connecting"
    """Only dubious peers so far."""
    ISOLATED = "isolated"
    """The proxy answers but its node has no peers: values may be stale, puts fail."""
    DISCONNECTED = "disconnected"
    """The proxy did not answer, or not with node info (the client's view only)."""


def peer_status(ipv4: FamilyStats, ipv6: FamilyStats) -> tuple[ProxyStatus, str]:
    """CONNECTED, CONNECTING or ISOLATED from a node's routing-table figures, with what is wrong (``""``
    when connected)."""
    if ipv4.good + ipv6.good:
        return ProxyStatus.CONNECTED, ""
    if ipv4.dubious + ipv6.dubious:
        return ProxyStatus.CONNECTING, "the proxy's node has only dubious peers"
    return ProxyStatus.ISOLATED, "the proxy's node has no peers (isolated)"
