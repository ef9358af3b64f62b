"""The proxy's replies: :class:`Reply` (what a route answers, whatever HTTP layer sends it), the headers on
every response, and the replies more than one layer sends (errors, refusals).
"""

from __future__ import annotations

from typing import NamedTuple

from trio_dht.persist import UNAVAILABLE
from trio_dht.rest.errors import error_body

SERVER = "trio-dht"
BASE_HEADERS: tuple[tuple[str, str], ...] = (
    ("Server", SERVER),
    ("Content-Type", "application/json"),
    ("Access-Control-Allow-Origin", "*"),
)
"""On every response the proxy builds (OpenDHT sends ``Server: RESTinio``; no client reads it)."""
OPTIONS_HEADERS: tuple[tuple[str, str], ...] = (
    ("Access-Control-Allow-Methods", "OPTIONS, GET, POST, LISTEN"),
    ("Access-Control-Allow-Headers", "content-type"),
    ("Access-Control-Max-Age", "86400"),
)
IDENTITY_OPTIONS_HEADERS = (
    ("Access-Control-Allow-Methods", "OPTIONS, GET, POST, LISTEN, SIGN, ENCRYPT"),
    *OPTIONS_HEADERS[1:],
)
"""The CORS preflight's headers when the DHT has an identity (the sign and encrypt routes are served)."""


class Reply(NamedTuple):
    """A response whose whole body is known; :data:`BASE_HEADERS` are added by the HTTP layer (a
    ``Content-Type`` first of ``headers`` replaces theirs).

    ``chunks``: send the body chunked (``Transfer-Encoding: chunked``), one chunk each, instead of ``body``
    with a ``Content-Length`` (OpenDHT streams a SUBSCRIBE's values so). ``close``: the proxy's own HTTP/1.1
    server closes the connection after it (a refusal).
    """

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    chunks: tuple[bytes, ...] | None = None
    close: bool = False


def error(status: int, message: str, *, close: bool = False) -> Reply:
    """``{"err": message}`` with ``status``, as OpenDHT's proxy answers errors."""
    return Reply(status, error_body(message), close=close)


INCORRECT_JSON = error(400, "Incorrect JSON")
NO_TOKEN = error(400, "No token")
NO_DESTINATION = error(400, "No destination found")
BAD_CONTENT_LENGTH = error(400, "Bad Content-Length")
REQUEST_TIMEOUT = error(408, "Request Timeout")
TOO_LARGE = error(413, "Request Entity Too Large")
TOO_MANY_REQUESTS = error(429, "Too many requests")
TOO_MANY_LISTENS = error(429, "Too many listen streams from this address", close=True)
INTERNAL_ERROR = error(500, "Internal server error")
PUT_FAILED = error(502, "Put failed")
NOT_READY = error(503, "Incorrect DhtRunner")
STATE_UNAVAILABLE = error(503, UNAVAILABLE)
