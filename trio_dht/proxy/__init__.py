"""OpenDHT's REST proxy server ("dhtnode --proxyserver"), on Quart-Trio and hypercorn, for any
:class:`~trio_dht.api.Dht`.

Serve it with ``await nursery.start(serve_proxy, dht, ProxyConfig(port=8000))``. Every route is one entry of
:data:`trio_dht.rest.paths.TABLE` and one handler of :data:`trio_dht.proxy.routes.ROUTES`; the plain-HTTP
front end, the raw-ASGI path (TLS, hand-overs) and the Quart app all serve them from there.

Adding routes: pass Quart blueprints, ``serve_proxy(dht, config, blueprints=[bp])`` (or
``create_app(dht, config, blueprints=[bp])`` for the ASGI app alone). A view names a key ``<hash:key>`` (an
:class:`~trio_dht.infohash.InfoHash`), finds the proxy's state with :func:`trio_dht.proxy.asgi.proxy_state`
and answers a :class:`~trio_dht.proxy.replies.Reply` with :func:`trio_dht.proxy.asgi.to_response`::

    bp = quart.Blueprint("mine", __name__)

    @bp.route("/key/<hash:key>/size", methods=["GET"])
    async def size(key):
        values = await proxy_state().dht.get(key)
        return to_response(Reply(200, str(len(values)).encode()))

Requests that are no route of the table reach these views (through hypercorn), their paths canonicalised.
Mounting the proxy in an ASGI server of one's own: ``create_app(...)`` is the ASGI callable (the table's
routes on a raw-ASGI path, Quart for the rest), ``create_app(...).quart`` the Quart app alone (every route
too, paths as Quart matches them); the state's timers need ``await nursery.start(app.state.run)``.

The names below are imported when first used (an HTTP worker process loads only the modules it needs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trio_dht._lazy import lazy_exports

if TYPE_CHECKING:
    from trio_dht.proxy.asgi import ProxyApp, create_app
    from trio_dht.proxy.server import serve_proxy
    from trio_dht.proxy.settings import ProxyConfig, RateLimit
    from trio_dht.proxy.state import ProxyState, PushHooks

_EXPORTS = {
    "ProxyApp": "trio_dht.proxy.asgi",
    "create_app": "trio_dht.proxy.asgi",
    "ProxyConfig": "trio_dht.proxy.settings",
    "RateLimit": "trio_dht.proxy.settings",
    "serve_proxy": "trio_dht.proxy.server",
    "ProxyState": "trio_dht.proxy.state",
    "PushHooks": "trio_dht.proxy.state",
}

__all__ = ["ProxyApp", "ProxyConfig", "ProxyState", "PushHooks", "RateLimit", "create_app", "serve_proxy"]


__getattr__ = lazy_exports(__name__, _EXPORTS)
