"""Raw-ASGI serving of the hot routes (GET/POST ``/key/{hash}`` and ``/{hash}``, ``GET /`` and
``/node/info``).

Quart-Trio costs about 0.9 ms of CPU per request against about 0.5 ms for a raw ASGI callable on the same
hypercorn, so these routes skip it. They call the same :mod:`trio_dht.proxy.handlers` functions as the Quart
routes; only the moving of bytes differs. On plain HTTP the front end (:mod:`~trio_dht.proxy.frontend`) serves
these routes before hypercorn sees them; this path serves them on TLS and on handed-over connections.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from trio_dht.infohash import InfoHash
from trio_dht.proxy import handlers
from trio_dht.proxy.handlers import BASE_HEADERS, Reply, error
from trio_dht.proxy.state import ProxyState

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
FastHandler = Callable[[ProxyState, Scope, Receive, Send, InfoHash | None], Awaitable[None]]

_BASE = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in BASE_HEADERS]
TOO_LARGE = error(413, "Request Entity Too Large")
REQUEST_TIMEOUT = error(408, "Request Timeout")
INTERNAL_ERROR = error(500, "Internal server error")


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


async def send_reply(send: Send, reply: Reply) -> None:
    """Send a complete response with the proxy's headers and a Content-Length."""
    headers = [(b"content-length", str(len(reply.body)).encode("ascii")), *_BASE]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body, "more_body": False})


async def send_stream(send: Send, body: Any) -> None:
    """Send a 200 whose headers go out at once, then each chunk of ``body`` as it comes (chunked encoding)."""
    try:
        await send({"type": "http.response.start", "status": 200, "headers": _BASE})
        async with body as chunks:
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        release = getattr(body, "release", None)  # a listen stream never entered gives back its slot
        if release is not None:
            release()


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


async def _node_info(
    state: ProxyState, scope: Scope, receive: Receive, send: Send, key: InfoHash | None
) -> None:
    client = scope.get("client")
    await send_reply(send, handlers.node_info(state, client[0] if client else None))


async def _get(state: ProxyState, scope: Scope, receive: Receive, send: Send, key: InfoHash | None) -> None:
    assert key is not None
    await send_stream(send, handlers.get(state, key))


async def _put(state: ProxyState, scope: Scope, receive: Receive, send: Send, key: InfoHash | None) -> None:
    assert key is not None
    body: bytes | None = None
    try:
        with trio.move_on_after(state.config.limits.http_body_timeout):  # hypercorn's path: not the hot one
            body = await read_body(receive, state.config.max_body)
        if body is None:
            state.http_counters.body_timeouts += 1
            await send_reply(send, REQUEST_TIMEOUT)  # the body is not all read: the connection closes
            return
    except BodyTooLarge:
        await send_reply(send, TOO_LARGE)
        return
    except ClientGone:
        return
    client = scope.get("client")
    await send_reply(send, await handlers.put(state, key, body, client[0] if client else None))


def fast_handler(method: str, path: str) -> FastHandler | None:
    """The fast handler for a canonical path (see :mod:`trio_dht.rest.paths`), if it is a hot route."""
    if method == "GET" and path in ("/", "/node/info"):
        return _node_info
    value_route = len(path) == 41 or (len(path) == 45 and path.startswith("/key/"))  # "/<hex>", "/key/<hex>"
    if value_route and method == "GET":
        return _get
    if value_route and method == "POST":
        return _put
    return None


async def serve_fast(
    handler: FastHandler, state: ProxyState, scope: Scope, receive: Receive, send: Send, key: InfoHash | None
) -> None:
    """Run ``handler``; an unexpected error becomes a 500 if no response has started yet."""
    started = False

    async def tracking_send(message: dict[str, Any]) -> None:
        nonlocal started
        started = True
        await send(message)

    try:
        await handler(state, scope, receive, tracking_send, key)
    except Exception:
        log.exception("proxy fast path failed on %s %s", scope.get("method"), scope.get("path"))
        if not started:
            await send_reply(send, INTERNAL_ERROR)
