"""trio_dht: a pure-Python OpenDHT node, REST proxy and push gateway on Trio.

``async with trio_dht.open_node(port=4222, bootstrap=[("host", 4222)]) as node:`` then ``await node.put(key,
value)``, ``await node.get(key)`` and ``async with node.listen(key) as events: async for ev in events: ...``.
A device without a node uses the same calls through a proxy: ``trio_dht.open_proxy_client(url, ...)``.

The names below are imported when first used, so that a process that needs one corner of the package (an
HTTP worker, :mod:`trio_dht.proxy.http_worker`) does not load the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trio_dht._lazy import lazy_exports

if TYPE_CHECKING:
    from trio_dht.api import Dht, NodeInfo, ValueEvent
    from trio_dht.client import ProxyClient, open_proxy_client
    from trio_dht.infohash import InfoHash
    from trio_dht.node import DhtNode, open_node
    from trio_dht.value import Query, Value

__version__ = "0.1.0"

_EXPORTS = {
    "Dht": "trio_dht.api",
    "NodeInfo": "trio_dht.api",
    "ValueEvent": "trio_dht.api",
    "ProxyClient": "trio_dht.client",
    "open_proxy_client": "trio_dht.client",
    "InfoHash": "trio_dht.infohash",
    "DhtNode": "trio_dht.node",
    "open_node": "trio_dht.node",
    "Query": "trio_dht.value",
    "Value": "trio_dht.value",
}

__all__ = [
    "Dht",
    "DhtNode",
    "InfoHash",
    "NodeInfo",
    "ProxyClient",
    "Query",
    "Value",
    "ValueEvent",
    "__version__",
    "open_node",
    "open_proxy_client",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)
