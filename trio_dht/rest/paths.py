"""The proxy's routes: each one a method on a path shape, and the one matcher from a request to its route.

Paths are matched with RESTinio's rules: literal segments case-insensitively, an optional trailing slash, the
query string ignored, and ``{hash}`` per :mod:`trio_dht.rest.keys`. :func:`canonical_path` turns any path
that has one of the proxy's shapes into its canonical spelling, with the key as 40 lowercase hex digits, so
that ``/KEY/hello/`` and ``/key/aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d`` both become the latter.

:data:`TABLE` lists every route of OpenDHT's proxy API as ``(method, shape, route)``. Some are served only
by some proxies: SUBSCRIBE and UNSUBSCRIBE with push hooks, the sign and encrypt routes when the DHT has an
identity; :func:`served_routes` gives a proxy's part of the table, in which :func:`match` finds a request's
route and key. The server derives everything it serves from this table (the plain-HTTP front end, the
raw-ASGI path, the Quart app, the HTTP worker's choice of what to relay). Sans-IO and free of the server's
imports: an HTTP worker process loads it.
"""

from __future__ import annotations

import enum
import re

from trio_dht.infohash import InfoHash
from trio_dht.rest.keys import decode_unreserved, hash_from_segment

NODE_ROUTES = {b"info": "/node/info", b"stats": "/node/stats", b"pingpush": "/node/pingPush"}
TOP_ROUTES = {b"metrics": "/metrics", b"healthz": "/healthz", b"status": "/status"}
"""The one-segment paths that name a route of the proxy rather than the key ``/{hash}`` they hash to (``/key/
{hash}`` still reaches those keys)."""
KEY_SUFFIXES = {b"listen": "listen", b"options": "options", b"sign": "sign", b"encrypt": "encrypt"}


def canonical_path(raw_path: bytes) -> tuple[str, InfoHash | None] | None:
    """``(canonical path, key)`` for a proxy route shape, or None when the path has none of them.

    ``raw_path`` is the request target's path as sent (a query string, if any, is cut off here).
    """
    path = decode_unreserved(raw_path.split(b"?", 1)[0])
    if not path.startswith(b"/"):
        return None
    if len(path) > 1 and path.endswith(b"/"):
        path = path[:-1]
    if path == b"/":
        return "/", None
    segments = path[1:].split(b"/")
    if not all(segments):
        return None
    first = segments[0].lower()
    if len(segments) == 1:
        route = TOP_ROUTES.get(first)
        if route is not None:
            return route, None
        key = hash_from_segment(segments[0])
        return f"/{key.hex()}", key
    if first == b"node" and len(segments) == 2:
        route = NODE_ROUTES.get(segments[1].lower())
        return (route, None) if route else None
    if first == b"key" and len(segments) in (2, 3):
        key = hash_from_segment(segments[1])
        if len(segments) == 2:
            return f"/key/{key.hex()}", key
        suffix = KEY_SUFFIXES.get(segments[2].lower())
        return (f"/key/{key.hex()}/{suffix}", key) if suffix else None
    return None


class Route(enum.Enum):
    """A route of the proxy: what a request asks for, whatever spelling of method and path it uses."""

    NODE_INFO = "node info"
    NODE_STATS = "node stats"
    OPTIONS = "CORS preflight"
    GET = "get a key's values"
    PUT = "put a value"
    LISTEN = "listen to a key"
    PING_PUSH = "ping a push target"
    SUBSCRIBE = "subscribe a push target to a key"
    UNSUBSCRIBE = "unsubscribe a push target"
    SIGN = "sign a value and put it"
    ENCRYPT = "encrypt a value for a recipient and put it"
    METRICS = "the Prometheus metrics"
    HEALTHZ = "the health check"
    STATUS = "the status page"

    __hash__ = object.__hash__
    """By identity, as members compare (``Enum``'s own hashes the name in Python: a lookup per request)."""

    @property
    def needs_push(self) -> bool:
        """Served only by a proxy with push hooks (without, a blueprint of the caller's may serve it)."""
        return self in _PUSH_ROUTES

    @property
    def needs_identity(self) -> bool:
        """Served only by a proxy whose DHT has an identity (without, the route does not exist)."""
        return self in _IDENTITY_ROUTES


_PUSH_ROUTES = frozenset((Route.SUBSCRIBE, Route.UNSUBSCRIBE))
_IDENTITY_ROUTES = frozenset((Route.SIGN, Route.ENCRYPT))

BARE, KEY, LISTEN, OPTIONS = "/{hash}", "/key/{hash}", "/key/{hash}/listen", "/key/{hash}/options"
SIGN, ENCRYPT = "/key/{hash}/sign", "/key/{hash}/encrypt"
"""The shapes of a key's routes (``{hash}``: the key's segment)."""

TABLE: tuple[tuple[str, str, Route], ...] = (
    ("GET", "/", Route.NODE_INFO),
    ("GET", "/node/info", Route.NODE_INFO),
    ("GET", "/node/stats", Route.NODE_STATS),
    ("GET", "/metrics", Route.METRICS),
    ("GET", "/healthz", Route.HEALTHZ),
    ("GET", "/status", Route.STATUS),
    ("OPTIONS", BARE, Route.OPTIONS),
    ("OPTIONS", LISTEN, Route.OPTIONS),
    ("GET", OPTIONS, Route.OPTIONS),
    ("GET", BARE, Route.GET),
    ("GET", KEY, Route.GET),
    ("POST", BARE, Route.PUT),
    ("POST", KEY, Route.PUT),
    ("GET", LISTEN, Route.LISTEN),
    ("LISTEN", BARE, Route.LISTEN),
    ("POST", "/node/pingPush", Route.PING_PUSH),
    ("SUBSCRIBE", BARE, Route.SUBSCRIBE),
    ("SUBSCRIBE", KEY, Route.SUBSCRIBE),
    ("UNSUBSCRIBE", BARE, Route.UNSUBSCRIBE),
    ("UNSUBSCRIBE", KEY, Route.UNSUBSCRIBE),
    ("POST", SIGN, Route.SIGN),
    ("POST", ENCRYPT, Route.ENCRYPT),
    ("SIGN", BARE, Route.SIGN),
    ("ENCRYPT", BARE, Route.ENCRYPT),
)
"""Every route of the proxy: ``(method, path shape, route)``."""

RouteTable = dict[tuple[str, str], Route]
"""``(method, path shape)`` to route: the routes one proxy serves (see :func:`served_routes`)."""

_SERVED: dict[tuple[bool, bool], RouteTable] = {
    (push, identity): {
        (method, shape): route
        for method, shape, route in TABLE
        if (push or not route.needs_push) and (identity or not route.needs_identity)
    }
    for push in (False, True)
    for identity in (False, True)
}


def served_routes(*, push: bool = True, identity: bool = True) -> RouteTable:
    """The routes of :data:`TABLE` a proxy serves, for :func:`match`: the push routes only with push hooks
    (``push``), the sign and encrypt routes only when its DHT has an identity (``identity``)."""
    return _SERVED[push, identity]


ALL_ROUTES = served_routes()
"""Every route of :data:`TABLE`."""
_METHODS = frozenset(method for method, _, _ in TABLE)
_SHAPE_OF_SUFFIX = {"": KEY, "/listen": LISTEN, "/options": OPTIONS, "/sign": SIGN, "/encrypt": ENCRYPT}

RouteMatch = tuple[Route, InfoHash | None]
"""A request's route, and its key (None on the routes without one)."""

_PLAIN_KEY_TARGET = re.compile(rb"/(key/)?([0-9a-f]{40})(/listen)?")
"""``/key/{hash}``, ``/{hash}`` or ``/key/{hash}/listen`` with the hash as 40 lowercase hex digits: the usual
spellings, matched without :func:`canonical_path`'s rules (which give them the same shape)."""
_NODE_INFO: RouteMatch = (Route.NODE_INFO, None)


def shape_of(path: str, key: InfoHash | None) -> str:
    """The shape of a canonical path (see :func:`canonical_path`)."""
    if key is None:
        return path
    if path.startswith("/key/"):
        return _SHAPE_OF_SUFFIX[path[45:]]
    return BARE


def match(method: str, target: bytes, served: RouteTable = ALL_ROUTES) -> RouteMatch | None:
    """The route of a request (its method and raw target), with its key; None when no route of ``served``
    (see :func:`served_routes`) has this method on this path.
    """
    if method not in _METHODS:
        return None
    if target == b"/node/info" or target == b"/":
        return _NODE_INFO if method == "GET" else None
    plain = _PLAIN_KEY_TARGET.fullmatch(target)
    if plain is not None:
        if plain[1] is None:
            if plain[3] is not None:  # "/<hex>/listen": not a route
                return None
            shape = BARE
        else:
            shape = KEY if plain[3] is None else LISTEN
        key = hash_from_segment(plain[2])
    else:
        canonical = canonical_path(target)
        if canonical is None:
            return None
        path, key = canonical
        shape = shape_of(path, key)
    route = served.get((method, shape))
    return None if route is None else (route, key)
