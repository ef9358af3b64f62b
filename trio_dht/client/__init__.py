"""The device side of OpenDHT's REST proxy: ``async with open_proxy_client("http://host:8000") as dht``.

The client implements :class:`trio_dht.api.Dht` (get, put, listen, cancel_put, info), so code can switch
between a node and a proxy. With a push token, listens SUBSCRIBE and the app feeds the pushes it receives to
``await dht.push_notification_received(data)``; without one, they keep LISTEN streams open.
"""

from trio_dht.client.health import ProxyHealth, ProxyStatus
from trio_dht.client.http import ProxyError, ProxyHTTPError, ProxyTimeout
from trio_dht.client.proxy_client import ProxyClient, open_proxy_client
from trio_dht.client.push_state import InvalidPushNotification, PushResult
from trio_dht.push.payloads import Dialect

__all__ = [
    "Dialect",
    "InvalidPushNotification",
    "ProxyClient",
    "ProxyError",
    "ProxyHTTPError",
    "ProxyHealth",
    "ProxyStatus",
    "ProxyTimeout",
    "PushResult",
    "open_proxy_client",
]
