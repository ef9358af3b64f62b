"""The proxy's ASGI application: path canonicalisation, limits and the fast path in front of a Quart-Trio app.

Request flow (:class:`ProxyApp`): per-IP rate limit (429) → declared body size (413) → RESTinio-style path
matching (:mod:`~trio_dht.rest.paths`) → hot routes on the raw-ASGI fast path, everything else to Quart with
the path canonicalised (unknown paths as they came). Quart answers unknown paths with 404, wrong methods with
405, all as JSON with the proxy's headers.

Other modules add routes by passing Quart blueprints: ``create_app(dht, config, blueprints=[push_bp])``. Their
views take keys as ``<hash:key>`` (an :class:`~trio_dht.infohash.InfoHash`), reach the shared state with
:func:`~trio_dht.proxy.routes.proxy_state`, and build replies with :mod:`~trio_dht.proxy.handlers` and
:func:`~trio_dht.proxy.routes.to_response`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import trio
from quart import Blueprint, Response, abort, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from trio_dht.api import Dht
from trio_dht.proxy.config import ProxyConfig
from trio_dht.proxy.fastpath import Receive, Scope, Send, fast_handler, send_reply, serve_fast
from trio_dht.proxy.handlers import BASE_HEADERS, error
from trio_dht.proxy.permanent import PutJournal
from trio_dht.proxy.routes import STATE_KEY, HashConverter, proxy_blueprint, to_response
from trio_dht.proxy.state import ProxyState, PushHooks
from trio_dht.rest.paths import canonical_path

log = logging.getLogger(__name__)

TOO_MANY_REQUESTS = error(429, "Too many requests")
TOO_LARGE = error(413, "Request Entity Too Large")


class ProxyResponse(Response):
    default_mimetype = "application/json"


def create_quart(state: ProxyState, blueprints: Iterable[Blueprint] = ()) -> QuartTrio:
    """The Quart-Trio app serving every proxy route (and ``blueprints``) on canonical paths."""
    app = QuartTrio(__name__)
    app.response_class = ProxyResponse
    app.config.update(
        MAX_CONTENT_LENGTH=state.config.max_body,
        BODY_TIMEOUT=state.config.limits.http_body_timeout,  # then a 408 (counted below)
        PROVIDE_AUTOMATIC_OPTIONS=False,
        JSON_SORT_KEYS=True,
    )
    app.extensions[STATE_KEY] = state
    app.url_map.converters["hash"] = HashConverter
    app.url_map.merge_slashes = False  # no redirects: a path is a route or a 404
    app.url_map.strict_slashes = False
    app.register_blueprint(proxy_blueprint())
    for bp in blueprints:
        app.register_blueprint(bp)

    @app.before_request
    async def refuse_head() -> None:
        if request.method == "HEAD":  # Werkzeug adds HEAD to GET routes; a HEAD on /listen would never end
            abort(405)

    @app.after_request
    async def base_headers(response: Response) -> Response:
        for name, value in BASE_HEADERS:
            response.headers.setdefault(name, value)
        return response

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        if exc.code == 408:
            state.http_counters.body_timeouts += 1
        reply = error(exc.code or 500, exc.name)
        response = to_response(reply)
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            response.headers["Allow"] = ", ".join(m for m in exc.valid_methods if m != "HEAD")
        return response

    @app.errorhandler(Exception)
    async def internal_error(exc: Exception) -> Response:
        log.exception("proxy route failed", exc_info=exc)
        return to_response(error(500, "Internal server error"))

    return app


def shield_final_send(send: Send) -> Send:
    """Shield the last body message: hypercorn closes the connection inside that ``send``, and quart-trio
    cancels its request nursery on ``http.disconnect`` half-way through it, leaving the socket open forever.
    """

    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            with trio.CancelScope(shield=True):
                await send(message)
        else:
            await send(message)

    return wrapped


class ProxyApp:
    """The ASGI callable to serve. ``.state`` is the shared :class:`ProxyState`, ``.quart`` the Quart app."""

    def __init__(self, state: ProxyState, quart: QuartTrio) -> None:
        self.state = state
        self.quart = quart

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.quart(scope, receive, send)
            return
        state = self.state
        client = scope.get("client")
        if state.limiter is not None and client and not state.limiter.allow(client[0], trio.current_time()):
            await send_reply(send, TOO_MANY_REQUESTS)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > state.config.max_body):
                await send_reply(send, TOO_LARGE if value.isdigit() else error(400, "Bad Content-Length"))
                return
        raw_path = scope.get("raw_path") or scope["path"].encode("utf-8")
        match = canonical_path(raw_path)
        if match is not None:
            path, key = match
            handler = fast_handler(scope["method"], path) if state.config.fast_path else None
            if handler is not None:
                await serve_fast(handler, state, scope, receive, send, key)
                return
            scope = {**scope, "path": path, "raw_path": path.encode("ascii")}
        await self.quart(scope, receive, shield_final_send(send))


def create_app(
    dht: Dht,
    config: ProxyConfig | None = None,
    *,
    blueprints: Iterable[Blueprint] = (),
    push: PushHooks | None = None,
    journal: PutJournal | None = None,
) -> ProxyApp:
    """The REST proxy for ``dht``: an ASGI app (serve it with :func:`trio_dht.proxy.server.serve_proxy`).

    ``blueprints`` add routes (SUBSCRIBE/UNSUBSCRIBE live in the push package); ``push`` plugs in pings,
    permanent-put refresh warnings and push statistics; ``journal`` keeps permanent puts across restarts.
    """
    state = ProxyState(dht, config or ProxyConfig(), push, journal)
    return ProxyApp(state, create_quart(state, blueprints))
