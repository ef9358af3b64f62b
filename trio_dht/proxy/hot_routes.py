"""Which requests the proxy's own HTTP/1.1 code serves, and on which key (sans-IO).

The front end (:mod:`~trio_dht.proxy.frontend`) serves these routes itself and leaves any other request to
hypercorn and Quart; an HTTP worker (:mod:`~trio_dht.proxy.http_worker`) relays SUBSCRIBE and UNSUBSCRIBE and
hands the rest over. Both read a request's route here, so that they agree. Kept free of the server's imports:
a worker process loads only this, :mod:`~trio_dht.proxy.http1` and :mod:`~trio_dht.proxy.relay`.
"""

from __future__ import annotations

import enum
import re

from trio_dht.infohash import InfoHash
from trio_dht.proxy.http1 import Head
from trio_dht.rest.keys import hash_from_segment
from trio_dht.rest.paths import canonical_path


class Route(enum.Enum):
    NODE_INFO = "GET / and /node/info"
    GET = "GET /key/{hash}, /{hash}"
    PUT = "POST /key/{hash}, /{hash}"
    LISTEN = "GET /key/{hash}/listen, LISTEN /{hash}"
    SUBSCRIBE = "SUBSCRIBE /key/{hash}, /{hash}"
    UNSUBSCRIBE = "UNSUBSCRIBE /key/{hash}, /{hash}"


HotRoute = tuple[Route, InfoHash | None]
"""A route, and the request's key (None for node info)."""

_PLAIN_KEY_TARGET = re.compile(rb"/(key/)?([0-9a-f]{40})(/listen)?")
"""``/key/{hash}``, ``/{hash}`` or ``/key/{hash}/listen`` with the hash as 40 lowercase hex digits, already in
canonical form.
"""
_PLAIN_NODE_INFO_TARGETS = frozenset((b"/", b"/node/info"))
_NODE_INFO_ROUTE: HotRoute = (Route.NODE_INFO, None)
_VALUE_ROUTES = {"GET": Route.GET, "POST": Route.PUT}
_PUSH_ROUTES = {**_VALUE_ROUTES, "SUBSCRIBE": Route.SUBSCRIBE, "UNSUBSCRIBE": Route.UNSUBSCRIBE}
_HOT_METHODS = frozenset((*_PUSH_ROUTES, "LISTEN"))


def hot_route(head: Head, *, push: bool = False) -> HotRoute | None:
    """The route of a request, with its key; None for what hypercorn serves.

    SUBSCRIBE and UNSUBSCRIBE are hot only with ``push`` (the app has push hooks); without, they go to
    Quart, where a blueprint of the caller's may serve them.
    """
    method = head.method
    if method not in _HOT_METHODS:
        return None
    if head.target in _PLAIN_NODE_INFO_TARGETS:  # the usual spellings, read without canonical_path's rules
        return _NODE_INFO_ROUTE if method == "GET" else None
    plain = _PLAIN_KEY_TARGET.fullmatch(head.target)
    if plain is not None:
        if plain[1] is None and plain[3] is not None:  # "/<hex>/listen": not a route
            return None
        shape = _LISTEN if plain[3] is not None else _KEY if plain[1] is not None else _BARE
        return _key_route(method, shape, hash_from_segment(plain[2]), push)
    match = canonical_path(head.target)
    if match is None:
        return None
    path, key = match
    if path in ("/", "/node/info"):
        return _NODE_INFO_ROUTE if method == "GET" else None
    if key is None:
        return None
    if len(path) == 41:  # "/<hex>"
        return _key_route(method, _BARE, key, push)
    if len(path) == 45 and path.startswith("/key/"):  # "/key/<hex>"
        return _key_route(method, _KEY, key, push)
    if len(path) == 52 and path.endswith("/listen"):  # "/key/<hex>/listen"
        return _key_route(method, _LISTEN, key, push)
    return None


_BARE, _KEY, _LISTEN = "/{hash}", "/key/{hash}", "/key/{hash}/listen"
"""The shapes of a key's routes."""


def _key_route(method: str, shape: str, key: InfoHash, push: bool) -> HotRoute | None:
    """``GET /key/{hash}/listen`` and ``LISTEN /{hash}`` are listens; the other methods on ``/{hash}`` and
    ``/key/{hash}`` the value routes; anything else is hypercorn's (Quart's 405, or a blueprint's route).
    """
    if shape is _LISTEN:
        return (Route.LISTEN, key) if method == "GET" else None
    if method == "LISTEN":
        return (Route.LISTEN, key) if shape is _BARE else None
    route = (_PUSH_ROUTES if push else _VALUE_ROUTES).get(method)
    return (route, key) if route is not None else None
