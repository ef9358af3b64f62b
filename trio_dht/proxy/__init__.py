"""OpenDHT's REST proxy server ("dhtnode --proxyserver"), on Quart-Trio and hypercorn, for any
:class:`~trio_dht.api.Dht`.
"""

from trio_dht.proxy.app import ProxyApp, create_app
from trio_dht.proxy.config import ProxyConfig, RateLimit
from trio_dht.proxy.server import serve_proxy
from trio_dht.proxy.state import ProxyState, PushHooks

__all__ = ["ProxyApp", "ProxyConfig", "ProxyState", "PushHooks", "RateLimit", "create_app", "serve_proxy"]
