"""OpenDHT's REST proxy server ("dhtnode --proxyserver"), on Quart-Trio and hypercorn, for any
:class:`~trio_dht.api.Dht`.

The names below are imported when first used (an HTTP worker process loads only the modules it needs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trio_dht._lazy import lazy_exports

if TYPE_CHECKING:
    from trio_dht.proxy.app import ProxyApp, create_app
    from trio_dht.proxy.config import ProxyConfig, RateLimit
    from trio_dht.proxy.server import serve_proxy
    from trio_dht.proxy.state import ProxyState, PushHooks

_EXPORTS = {
    "ProxyApp": "trio_dht.proxy.app",
    "create_app": "trio_dht.proxy.app",
    "ProxyConfig": "trio_dht.proxy.config",
    "RateLimit": "trio_dht.proxy.config",
    "serve_proxy": "trio_dht.proxy.server",
    "ProxyState": "trio_dht.proxy.state",
    "PushHooks": "trio_dht.proxy.state",
}

__all__ = ["ProxyApp", "ProxyConfig", "ProxyState", "PushHooks", "RateLimit", "create_app", "serve_proxy"]


__getattr__ = lazy_exports(__name__, _EXPORTS)
