"""The DHT node: a sans-IO protocol (``protocol``) over sans-IO parts (routing, storage, searches, listens,
transactions, tokens, rate limits), the Trio drivers of searches and listens, and the Trio shell (``dht``)."""

from trio_dht.node.dht import DEFAULT_PORT, DhtNode, RequestFailed, open_node

__all__ = ["DEFAULT_PORT", "DhtNode", "RequestFailed", "open_node"]
