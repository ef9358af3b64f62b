"""The proxy's routes as a Quart blueprint (thin: the logic is in :mod:`trio_dht.proxy.handlers`).

Paths reach Quart already canonicalised by :func:`trio_dht.rest.paths.canonical_path`, so a route names its
key with the ``hash`` converter (40 lowercase hex digits, handed to the view as an :class:`InfoHash`).
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Quart, Response, current_app, request
from werkzeug.routing import BaseConverter

from trio_dht.infohash import InfoHash
from trio_dht.proxy import handlers
from trio_dht.proxy.handlers import BASE_HEADERS, Reply
from trio_dht.proxy.state import ProxyState

STATE_KEY = "trio_dht.proxy"
"""Where the :class:`ProxyState` lives in ``app.extensions``."""


class HashConverter(BaseConverter):
    """``<hash:key>``: a canonical key segment, as an :class:`InfoHash`."""

    regex = "[0-9a-f]{40}"

    def to_python(self, value: str) -> InfoHash:
        return InfoHash.from_hex(value)

    def to_url(self, value: Any) -> str:
        return bytes(value).hex()


def proxy_state(app: Quart | None = None) -> ProxyState:
    """The :class:`ProxyState` of ``app`` (default: the current app), for routes added by other modules."""
    return (app or current_app).extensions[STATE_KEY]


def to_response(reply: Reply) -> Response:
    response = current_app.response_class(reply.body, status=reply.status)
    for name, value in (*BASE_HEADERS, *reply.headers):
        response.headers[name] = value
    return response


def streaming_response(body: Any, *, endless: bool = False) -> Response:
    response = current_app.response_class(body, status=200)
    for name, value in BASE_HEADERS:
        response.headers[name] = value
    if endless:
        response.timeout = None  # Quart's RESPONSE_TIMEOUT would cut the stream
    return response


def _route(bp: Blueprint, rule: str, methods: list[str]) -> Any:
    return bp.route(rule, methods=methods, provide_automatic_options=False)


def proxy_blueprint() -> Blueprint:
    """All of OpenDHT's proxy routes but SUBSCRIBE and UNSUBSCRIBE (push) and sign/encrypt (identity)."""
    bp = Blueprint("proxy", __name__)

    @_route(bp, "/", ["GET"])
    @_route(bp, "/node/info", ["GET"])
    async def node_info() -> Response:
        return to_response(handlers.node_info(proxy_state(), request.remote_addr))

    @_route(bp, "/node/stats", ["GET"])
    async def node_stats() -> Response:
        return to_response(handlers.node_stats(proxy_state()))

    @_route(bp, "/<hash:key>", ["OPTIONS"])
    @_route(bp, "/key/<hash:key>/listen", ["OPTIONS"])
    @_route(bp, "/key/<hash:key>/options", ["GET"])
    async def options(key: InfoHash) -> Response:
        return to_response(handlers.options(proxy_state()))

    @_route(bp, "/<hash:key>", ["GET"])
    @_route(bp, "/key/<hash:key>", ["GET"])
    async def get(key: InfoHash) -> Response:
        return streaming_response(handlers.get(proxy_state(), key))

    @_route(bp, "/<hash:key>", ["POST"])
    @_route(bp, "/key/<hash:key>", ["POST"])
    async def put(key: InfoHash) -> Response:
        body = await request.get_data(cache=False)
        return to_response(await handlers.put(proxy_state(), key, body, request.remote_addr))

    @_route(bp, "/key/<hash:key>/listen", ["GET"])
    @_route(bp, "/<hash:key>", ["LISTEN"])
    async def listen(key: InfoHash) -> Response:
        body = handlers.listen(proxy_state(), key, request.remote_addr)
        if isinstance(body, Reply):
            return to_response(body)
        return streaming_response(body, endless=True)

    @_route(bp, "/node/pingPush", ["POST"])
    async def ping_push() -> Response:
        body = await request.get_data(cache=False)
        return to_response(await handlers.ping_push(proxy_state(), body))

    return bp
