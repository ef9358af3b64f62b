"""The proxy as an ASGI application: the routes of :data:`~trio_dht.proxy.routes.ROUTES` on a raw-ASGI path,
and a Quart-Trio app for everything else (and for mounting).

Request flow (:class:`ProxyApp`): per-IP rate limit (429) → declared body size (413) → the route
(:func:`trio_dht.rest.paths.match`) → its handler, its answer sent straight as ASGI messages; a request that
is no route goes to Quart with its path canonicalised (unknown paths as they came), which answers unknown
paths with 404, wrong methods with 405, all as JSON with the proxy's headers. hypercorn serves this app on TLS
and on the connections the plain-HTTP front end hands over (:mod:`~trio_dht.proxy.frontend`).

The Quart app (``ProxyApp.quart``) has the same routes, derived from the same table and handlers, so it is a
complete proxy on its own. Other code adds routes by passing Quart blueprints: ``create_app(dht, config,
blueprints=[bp])`` (or the same argument to :func:`~trio_dht.proxy.server.serve_proxy`). Their views take keys
as ``<hash:key>`` (an :class:`~trio_dht.infohash.InfoHash`), reach the shared state with :func:`proxy_state`,
and answer with :func:`to_response`. A blueprint may serve SUBSCRIBE/UNSUBSCRIBE when the proxy has no push
hooks (with them, those routes are the table's), and the sign and encrypt routes when the DHT has no identity.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from time import perf_counter
from typing import Any

import trio
from quart import Blueprint, Quart, Response, abort, current_app, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import BaseConverter

from trio_dht.api import Dht
from trio_dht.infohash import InfoHash
from trio_dht.proxy.connection import ClientGone
from trio_dht.proxy.permanent import PutJournal
from trio_dht.proxy.replies import (
    BAD_CONTENT_LENGTH,
    BASE_HEADERS,
    INTERNAL_ERROR,
    REQUEST_TIMEOUT,
    TOO_LARGE,
    TOO_MANY_REQUESTS,
    Reply,
    error,
)
from trio_dht.proxy.routes import ROUTES, Answer, Later, Request, RouteSpec
from trio_dht.proxy.settings import ProxyConfig
from trio_dht.proxy.state import ProxyState, PushHooks
from trio_dht.proxy.streams import ListenStream
from trio_dht.rest.paths import Route, canonical_path, match

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

STATE_KEY = "trio_dht.proxy"
"""Where the :class:`ProxyState` lives in the Quart app's ``extensions``."""


# -- the raw-ASGI path ---------------------------------------------------------------------------------------

_BASE = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in BASE_HEADERS]
_UNTYPED = [header for header in _BASE if header[0] != b"content-type"]
"""The base headers of a reply with a ``Content-Type`` of its own (first of its headers)."""


class BodyTooLarge(Exception):
    pass


async def send_reply(send: Send, reply: Reply) -> None:
    """Send a reply with the proxy's headers (and a Content-Length, unless it is chunked); a ``Content-Type``
    first of its own headers replaces the base one."""
    headers = list(_BASE) if not reply.headers or reply.headers[0][0] != "Content-Type" else list(_UNTYPED)
    if reply.chunks is None:
        headers.insert(0, (b"content-length", str(len(reply.body)).encode("ascii")))
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    for data in reply.chunks or ():
        await send({"type": "http.response.body", "body": data, "more_body": True})
    await send(
        {"type": "http.response.body", "body": b"" if reply.chunks else reply.body, "more_body": False}
    )


async def send_stream(send: Send, receive: Receive, body: Any) -> None:
    """Send a 200 whose headers go out at once, then each chunk of ``body`` as it comes (chunked encoding),
    until the body ends or the client goes away."""
    ended = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            await send({"type": "http.response.start", "status": 200, "headers": _BASE})
            async with body as chunks:
                async for chunk in chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            ended = True
            nursery.cancel_scope.cancel()  # stop watching for a disconnect
        if ended:  # outside the watcher's scope: hypercorn ends the response (keep-alive timer, close) in it
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        release = getattr(body, "release", None)  # a listen stream never entered gives back its slot
        if release is not None:
            release()


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body; :class:`BodyTooLarge` past ``limit``, :class:`ClientGone` on a disconnect."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def counting_send(state: ProxyState, route: Route | None, send: Send) -> Send:
    """``send``, counting the response in ``state.request_counts`` once it ends, or a listen stream once its
    head is sent, as the front end counts them (its status from its start; the latency from now)."""
    start = perf_counter()
    status = 0
    counted_at_head = route is Route.LISTEN

    async def counted(message: dict[str, Any]) -> None:
        nonlocal status
        kind = message["type"]
        if kind == "http.response.start":
            status = message["status"]
        await send(message)
        stream = counted_at_head and status == 200
        if (kind == "http.response.start" and stream) or (
            kind == "http.response.body" and not message.get("more_body", False) and not stream
        ):
            state.request_counts.observe(route, status, perf_counter() - start)

    return counted


async def serve_route(
    spec: RouteSpec, state: ProxyState, key: InfoHash | None, scope: Scope, receive: Receive, send: Send
) -> None:
    """Answer a request of a route; an unexpected error becomes a 500 if no response has started yet."""
    started = False

    async def tracking_send(message: dict[str, Any]) -> None:
        nonlocal started
        started = True
        await send(message)

    client = scope.get("client")
    body: bytes | None = b""
    if spec.reads_body:
        body = None
        try:
            with trio.move_on_after(state.config.limits.http_body_timeout):
                body = await read_body(receive, state.config.max_body)
        except BodyTooLarge:
            await send_reply(send, TOO_LARGE)
            return
        except ClientGone:
            return
        if body is None:
            state.http_counters.body_timeouts += 1
            await send_reply(send, REQUEST_TIMEOUT)  # the body is not all read: the connection closes
            return
    try:
        answer: Answer = spec.handler(state, Request(key, body, client[0] if client else None))
        if isinstance(answer, Later):
            answer = await answer.reply()
        if isinstance(answer, Reply):
            await send_reply(tracking_send, answer)
        else:
            await send_stream(tracking_send, receive, answer)
    except Exception:
        log.exception("proxy route failed on %s %s", scope.get("method"), scope.get("path"))
        if not started:
            await send_reply(send, INTERNAL_ERROR)


# -- the Quart app -------------------------------------------------------------------------------------------


class ProxyResponse(Response):
    default_mimetype = "application/json"


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
    """A Quart response for a reply, with the proxy's headers."""
    if reply.chunks is not None:
        response = streaming_response(_iterate(reply.chunks))
        response.status_code = reply.status
        return response
    response = current_app.response_class(reply.body, status=reply.status)
    for name, value in (*BASE_HEADERS, *reply.headers):
        response.headers[name] = value
    return response


async def _iterate(chunks: tuple[bytes, ...]) -> AsyncIterator[bytes]:
    for data in chunks:
        yield data


def streaming_response(body: Any, *, endless: bool = False) -> Response:
    response = current_app.response_class(body, status=200)
    for name, value in BASE_HEADERS:
        response.headers[name] = value
    if endless:
        response.timeout = None  # Quart's RESPONSE_TIMEOUT would cut the stream
    return response


def _quart_view(spec: RouteSpec) -> Callable[..., Awaitable[Response]]:
    """The Quart view of a route: its handler, its answer as a Quart response."""

    async def view(key: InfoHash | None = None) -> Response:
        body = await request.get_data(cache=False) if spec.reads_body else b""
        answer = spec.handler(proxy_state(), Request(key, body, request.remote_addr))
        if isinstance(answer, Later):
            answer = await answer.reply()
        if isinstance(answer, Reply):
            return to_response(answer)
        return streaming_response(answer, endless=isinstance(answer, ListenStream))

    return view


def _quart_rule(shape: str) -> str:
    return shape.replace("{hash}", "<hash:key>")


def create_quart(state: ProxyState, blueprints: Iterable[Blueprint] = ()) -> QuartTrio:
    """The Quart-Trio app serving every route of the table (and ``blueprints``) on canonical paths."""
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
    views = {route: _quart_view(spec) for route, spec in ROUTES.items()}
    for (method, shape), route in state.served.items():
        app.add_url_rule(
            _quart_rule(shape),
            route.name.lower(),
            views[route],
            methods=[method],
            provide_automatic_options=False,
        )
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
        response = to_response(error(exc.code or 500, exc.name))
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            response.headers["Allow"] = ", ".join(m for m in exc.valid_methods if m != "HEAD")
        return response

    @app.errorhandler(Exception)
    async def internal_error(exc: Exception) -> Response:
        log.exception("proxy route failed", exc_info=exc)
        return to_response(INTERNAL_ERROR)

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
        raw_path = scope.get("raw_path") or scope["path"].encode("utf-8")
        route = match(scope["method"], raw_path, state.served)
        send = counting_send(state, None if route is None else route[0], send)
        client = scope.get("client")
        if state.limiter is not None and client and not state.limiter.allow(client[0], trio.current_time()):
            await send_reply(send, TOO_MANY_REQUESTS)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > state.config.max_body):
                await send_reply(send, TOO_LARGE if value.isdigit() else BAD_CONTENT_LENGTH)
                return
        if route is not None:
            await serve_route(ROUTES[route[0]], state, route[1], scope, receive, send)
            return
        canonical = canonical_path(raw_path)
        if canonical is not None:
            path = canonical[0]
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

    ``blueprints`` add routes; ``push`` serves SUBSCRIBE/UNSUBSCRIBE and plugs in pings, permanent-put refresh
    warnings and push statistics; ``journal`` keeps permanent puts across restarts.
    """
    state = ProxyState(dht, config or ProxyConfig(), push, journal)
    return ProxyApp(state, create_quart(state, blueprints))
