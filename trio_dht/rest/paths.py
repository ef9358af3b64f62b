"""Path matching with RESTinio's rules, mapping a request path to one canonical form that Quart can route.

The proxy's routes are matched on the raw path: literal segments case-insensitively, an optional trailing
slash, the query string ignored, and ``{hash}`` per :mod:`trio_dht.rest.keys`. :func:`canonical_path` turns
any path that has one of the proxy's shapes into its canonical spelling, with the key as 40 lowercase hex
digits, so that ``/KEY/hello/`` and ``/key/aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d`` both become the latter.
The method is not looked at: a shape is routed the same way whatever the method, and Quart answers 405 for a
wrong one.
"""

from __future__ import annotations

from trio_dht.infohash import InfoHash
from trio_dht.rest.keys import decode_unreserved, hash_from_segment

NODE_ROUTES = {b"info": "/node/info", b"stats": "/node/stats", b"pingpush": "/node/pingPush"}
KEY_SUFFIXES = {b"listen": "listen", b"options": "options"}


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
