"""The DHT node: sans-IO cores (routing, search, storage, listeners, tokens, rate limits); Trio shell."""

from trio_dht.node.dht import DEFAULT_PORT, DhtNode, RequestFailed, open_node

__all__ = ["DEFAULT_PORT", "DhtNode", "RequestFailed", "open_node"]
