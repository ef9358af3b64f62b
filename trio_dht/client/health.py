"""How healthy a proxy is, from its ``GET /`` node info (sans-IO).

An answer without a ``node_id`` is *disconnected*; otherwise the node's peers decide, by
:func:`trio_dht.rest.health.peer_status` (the rule the proxy's own ``GET /healthz`` uses): *connected* with
good peers, *connecting* with only dubious ones, **isolated** with none (a "zombie" proxy, which OpenDHT's
client takes for a healthy one), reported as such, not trusted as connected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trio_dht.api import FamilyStats, NodeInfo
from trio_dht.infohash import InfoHash
from trio_dht.rest.health import ProxyStatus, peer_status

__all__ = ["ProxyHealth", "ProxyStatus", "health_from_info", "unreachable"]


@dataclass(frozen=True, slots=True)
class ProxyHealth:
    """The result of one health check. ``error`` says why a proxy is disconnected."""

    status: ProxyStatus = ProxyStatus.DISCONNECTED
    node_id: InfoHash | None = None
    ipv4: FamilyStats = field(default_factory=FamilyStats)
    ipv6: FamilyStats = field(default_factory=FamilyStats)
    public_ip: str = ""
    error: str = "not checked yet"

    @property
    def connected(self) -> bool:
        return self.status is ProxyStatus.CONNECTED

    @property
    def good(self) -> int:
        return self.ipv4.good + self.ipv6.good

    def node_info(self) -> NodeInfo:
        """The proxy's node as a :class:`NodeInfo` (a zero id before the first good answer)."""
        return NodeInfo(node_id=self.node_id or InfoHash(), ipv4=self.ipv4, ipv6=self.ipv6)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"status": self.status.value, "good": self.good}
        doc["dubious"] = self.ipv4.dubious + self.ipv6.dubious
        if self.node_id is not None:
            doc["node_id"] = self.node_id.hex()
        if self.public_ip:
            doc["public_ip"] = self.public_ip
        if self.error:
            doc["error"] = self.error
        return doc


def unreachable(reason: str) -> ProxyHealth:
    return ProxyHealth(ProxyStatus.DISCONNECTED, error=reason)


def _count(doc: Any, name: str) -> int:
    value = doc.get(name, 0) if isinstance(doc, dict) else 0
    return value if type(value) is int and value >= 0 else 0


def _family(doc: Any) -> FamilyStats:
    good, dubious, incoming = (_count(doc, name) for name in ("good", "dubious", "incoming"))
    return FamilyStats(good=good, dubious=dubious, incoming=incoming)


def health_from_info(doc: Any) -> ProxyHealth:
    """Classify a parsed ``GET /`` body (anything: a bad body is DISCONNECTED, with the reason)."""
    if not isinstance(doc, dict):
        return unreachable("node info is not a JSON object")
    try:
        node_id = InfoHash.from_hex(doc["node_id"])
    except (KeyError, TypeError, ValueError):
        return unreachable("node info without a node_id")
    ipv4, ipv6 = _family(doc.get("ipv4")), _family(doc.get("ipv6"))
    public_ip = doc.get("public_ip")
    public_ip = public_ip if isinstance(public_ip, str) else ""
    status, error = peer_status(ipv4, ipv6)
    return ProxyHealth(status, node_id, ipv4, ipv6, public_ip, error)
