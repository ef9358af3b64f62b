"""What each of the proxy's routes does, written once for every HTTP layer: :data:`ROUTES`.

A handler takes the proxy's state and a parsed :class:`Request` (key, body, client address) and returns what
to answer, knowing nothing of the transport:

* a :class:`~trio_dht.proxy.replies.Reply` (a complete response, maybe chunked),
* a :class:`Later`: a reply that needs waiting for (a DHT put, a push, a SUBSCRIBE's values),
* a :class:`~trio_dht.proxy.streams.GetStream` (values as the DHT finds them) or a
  :class:`~trio_dht.proxy.streams.ListenStream` (never ends).

The routes are those of :data:`trio_dht.rest.paths.TABLE`; every HTTP layer serves them from here: the
plain-HTTP front end (:mod:`~trio_dht.proxy.frontend`), the raw-ASGI path for TLS and handed-over
connections and the Quart app (both :mod:`~trio_dht.proxy.asgi`).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import trio

from trio_dht.api import RecipientNotFound
from trio_dht.infohash import InfoHash
from trio_dht.persist import PersistError
from trio_dht.proxy import status_page
from trio_dht.proxy.permanent import TooManyPuts
from trio_dht.proxy.replies import (
    IDENTITY_OPTIONS_HEADERS,
    INCORRECT_JSON,
    NO_DESTINATION,
    NO_TOKEN,
    NOT_READY,
    OPTIONS_HEADERS,
    PUT_FAILED,
    STATE_UNAVAILABLE,
    TOO_MANY_LISTENS,
    Reply,
    error,
)
from trio_dht.proxy.state import ProxyState, PushHooks
from trio_dht.proxy.streams import GetStream, ListenStream
from trio_dht.rest.errors import BadRequest
from trio_dht.rest.paths import Route
from trio_dht.rest.value_json import (
    PushTarget,
    PutRequest,
    ValueJsonError,
    dumps,
    put_request_from_json,
    value_line,
)
from trio_dht.sources import client_key
from trio_dht.value import Value, random_value_id

if TYPE_CHECKING:
    from trio_dht.push.service import PushReply

log = logging.getLogger(__name__)


class Request(NamedTuple):
    """A request as a route sees it."""

    key: InfoHash | None = None
    """The ``{hash}`` of the path (None on the routes without one)."""
    body: bytes = b""
    """The whole body (empty when none was sent)."""
    client: str | None = None
    """The client's address, when known."""


class Later(NamedTuple):
    """A reply the HTTP layer waits for: ``await later.reply()``."""

    reply: Callable[[], Awaitable[Reply]]


Answer = Reply | Later | GetStream | ListenStream
"""What a route answers."""


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """A route's handler, and whether the HTTP layer reads the request's body for it."""

    handler: Callable[[ProxyState, Request], Answer]
    reads_body: bool = False


def parse_json(body: bytes) -> Any:
    """The JSON of a request body; :class:`BadRequest` (400 Incorrect JSON) if it is not JSON."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest("Incorrect JSON") from None


def put_json(body: bytes) -> Any:
    """The JSON of a put's body; :class:`BadRequest` (400) if it is empty (Missing parameters) or not JSON."""
    if not body.strip():
        raise BadRequest("Missing parameters")
    return parse_json(body)


def put_request(doc: Any) -> PutRequest:
    """The put a body's JSON asks for (a value, maybe ``permanent``); :class:`BadRequest` (400 Invalid value)
    if it is not a value."""
    try:
        return put_request_from_json(doc)
    except ValueJsonError as exc:
        raise BadRequest(f"Invalid value: {exc}") from None


def client_source(client: str | None) -> str:
    """The bucket a client's subscriptions and permanent puts are counted in
    (:func:`~trio_dht.sources.client_key`); ``""`` when unknown (not counted)."""
    key = client_key(client) if client else None
    return "" if key is None else key[0]


# -- the routes ----------------------------------------------------------------------------------------------


def node_info(state: ProxyState, request: Request) -> Reply:
    """``GET /``, ``GET /node/info``: node info plus the client's address as seen here (not counted).

    The document is rebuilt at most every ``config.node_info_cache`` seconds (OpenDHT: every 2 minutes), and
    while it stays the same each client address gets the same :class:`Reply` object (an HTTP layer may keep
    the response it made from it).
    """
    now = trio.current_time()
    cached = state.node_info_replies
    if cached is None or now >= cached[0]:
        doc = state.node_info()
        if doc is None:
            return NOT_READY
        doc["public_ip"] = _PUBLIC_IP_MARK
        head, tail = dumps(doc).split(_PUBLIC_IP_JSON)
        cached = state.node_info_replies = (now + state.config.node_info_cache, head, tail + b"\n", {})
    replies = cached[3]
    client = request.client or ""
    reply = replies.get(client)
    if reply is None:
        if len(replies) >= _NODE_INFO_CLIENTS:
            replies.clear()
        reply = replies[client] = Reply(200, cached[1] + dumps(client) + cached[2])
    return reply


_PUBLIC_IP_MARK = "\x00public_ip\x00"
_PUBLIC_IP_JSON = dumps(_PUBLIC_IP_MARK)
_NODE_INFO_CLIENTS = 1024
"""Client addresses whose node-info reply is kept while the document stays the same."""


def node_stats(state: ProxyState, request: Request) -> Reply:
    """``GET /node/stats``."""
    state.count_request()
    return Reply(200, dumps(state.stats(trio.current_time())) + b"\n")


def metrics(state: ProxyState, request: Request) -> Reply:
    """``GET /metrics``: the Prometheus text format (:mod:`~trio_dht.proxy.metrics`)."""
    from trio_dht.proxy import metrics  # prometheus_client: loaded on the first scrape

    state.count_request()
    return Reply(200, metrics.exposition(state), (("Content-Type", metrics.CONTENT_TYPE),))


def healthz(state: ProxyState, request: Request) -> Reply:
    """``GET /healthz``: 200 ``{"status": "ok", ...}``, or 503 ``{"status": "unhealthy", "reasons": [...],
    ...}`` (:mod:`~trio_dht.proxy.health`)."""
    state.count_request()
    status, doc = state.healthz(trio.current_time())
    return Reply(status, dumps(doc) + b"\n")


def status(state: ProxyState, request: Request) -> Reply:
    """``GET /status``: the live status page, an HTML page that reads ``/node/info``, ``/node/stats`` and
    ``/healthz`` (:mod:`~trio_dht.proxy.status_page`)."""
    state.count_request()
    return status_page.reply()


def options(state: ProxyState, request: Request) -> Reply:
    """``OPTIONS /{hash}``, ``OPTIONS /key/{hash}/listen``, ``GET /key/{hash}/options``: the CORS
    preflight."""
    state.count_request()
    return _IDENTITY_OPTIONS if state.identity else _OPTIONS


_OPTIONS = Reply(200, b"", OPTIONS_HEADERS)
_IDENTITY_OPTIONS = Reply(200, b"", IDENTITY_OPTIONS_HEADERS)


def get(state: ProxyState, request: Request) -> GetStream:
    """``GET /key/{hash}``, ``GET /{hash}``: always 200, NDJSON as values arrive."""
    assert request.key is not None
    state.count_request()
    return GetStream(state.dht, request.key)


def listen(state: ProxyState, request: Request) -> ListenStream | Reply:
    """``GET /key/{hash}/listen`` (and the old ``LISTEN /{hash}``): an endless NDJSON stream; 429 when the
    client holds ``Limits.http_listens_per_ip`` streams already."""
    assert request.key is not None
    state.count_request()
    if not state.listens.reserve(request.client):
        return TOO_MANY_LISTENS
    return ListenStream(state.dht, request.key, state.listens, request.client)


def put(state: ProxyState, request: Request) -> Reply | Later:
    """``POST /key/{hash}``, ``POST /{hash}``: store a value; 200 with its JSON (id assigned) or 502.

    A new permanent put from a client that holds ``Limits.permanent_puts_per_source`` is refused (429), so is
    one past ``Limits.permanent_puts_bytes`` (503), and one the state file cannot take (503), before anything
    is held or put.
    """
    key = request.key
    assert key is not None
    try:
        parsed = put_request(put_json(request.body))
    except BadRequest as exc:
        return Reply(exc.status, exc.body)
    state.count_request()
    value = parsed.value
    if parsed.permanent:
        now = trio.current_time()
        try:
            held = None if value.id else state.permanent.find_same(key, value, parsed.push)
            if held is not None:
                state.permanent.renew(held, parsed.push, now)
                return Reply(200, value_line(held.value))
            state.permanent.record(key, value, parsed.push, now, client_source(request.client))
        except TooManyPuts as exc:
            return error(exc.status, exc.message)
        except PersistError:
            return STATE_UNAVAILABLE
        state.permanent_changed()
    elif not value.id:
        value.id = random_value_id()
    return Later(functools.partial(_put_value, state.dht.put, key, value, permanent=parsed.permanent))


def sign(state: ProxyState, request: Request) -> Reply | Later:
    """``POST /key/{hash}/sign`` (and the old ``SIGN /{hash}``), served when the DHT has an identity: a put
    whose value the DHT signs (``dht.put_signed``); 200 with the value's JSON as sent (id assigned) or 502.
    """
    put = _identity_put(request)
    if isinstance(put, Reply):
        return put
    state.count_request()
    return Later(functools.partial(_put_value, state.dht.put_signed, request.key, put[0]))


def encrypt(state: ProxyState, request: Request) -> Reply | Later:
    """``POST /key/{hash}/encrypt`` (and the old ``ENCRYPT /{hash}``), served when the DHT has an identity: a
    put whose value the DHT signs and encrypts for ``"to"`` (``dht.put_encrypted``): 40 hex digits (a key
    id, as OpenDHT's proxy reads it) or 64 (a long id); 400 No destination found for anything else, 502 when
    the recipient's certificate is not found. Replies as :func:`sign`.
    """
    put = _identity_put(request)
    if isinstance(put, Reply):
        return put
    state.count_request()
    value, doc = put
    to = recipient_id(doc.get("to"))
    if to is None:
        return NO_DESTINATION
    return Later(functools.partial(_put_value, state.dht.put_encrypted, request.key, value, to))


def recipient_id(to: Any) -> bytes | None:
    """The key id (40 hex digits) or long id (64) an encrypted put is for; None if ``to`` is neither."""
    if not isinstance(to, str) or len(to) not in (40, 64) or not to.isascii() or not to.isalnum():
        return None
    try:
        recipient = bytes.fromhex(to)
    except ValueError:
        return None
    return recipient if any(recipient) else None


def _identity_put(request: Request) -> tuple[Value, dict[str, Any]] | Reply:
    """The value a sign or encrypt request puts (its id assigned) and the body's JSON, or the 400 refusing
    it. A ``"permanent"`` is ignored, as OpenDHT's sign and encrypt handlers ignore it: the value is put once
    (the proxy's held puts are plain values, re-announced as such after a restart from the state file).
    """
    assert request.key is not None
    try:
        doc = put_json(request.body)
        # The owner, signature, seq and recipient are the node's to set (the recipient is "to", read by the
        # encrypt route): a client's own are not put, nor shown in the reply as if they had been.
        mine = {k: v for k, v in doc.items() if k not in _SET_BY_THE_NODE} if isinstance(doc, dict) else doc
        parsed = put_request(mine)
    except BadRequest as exc:
        return Reply(exc.status, exc.body)
    value = parsed.value
    if value.cypher:
        return _ALREADY_ENCRYPTED
    if not value.id:
        value.id = random_value_id()
    return value, doc


_ALREADY_ENCRYPTED = error(400, "Invalid value: it is encrypted already")
_SET_BY_THE_NODE = frozenset({"owner", "sig", "seq", "to"})
PUT_DEADLINE = 60.0
"""Seconds a proxy put may take (its searches, a signed put's get of the earlier versions, an encrypted
put's certificate lookup), whatever the peers answer; then 502 Put failed."""


async def _put_value(
    put: Callable[..., Awaitable[bool]], key: InfoHash, value: Value, *args: Any, **kwargs: Any
) -> Reply:
    """Await ``put(key, value, *args, **kwargs)`` for at most :data:`PUT_DEADLINE`; 200 with the value's
    JSON, 400 for a value the DHT refuses to put (a signed value's seq past 65535), or 502 Put failed."""
    ok = False
    with trio.move_on_after(PUT_DEADLINE) as scope:
        try:
            ok = await put(key, value, *args, **kwargs)
        except RecipientNotFound as exc:
            log.info("proxy put on %s failed: %s", key, exc)
        except ValueError as exc:
            return error(400, f"Invalid value: {exc}")
        except Exception:
            log.exception("proxy put on %s failed", key)
    if scope.cancelled_caught:
        log.info("proxy put on %s took over %.0f s: given up", key, PUT_DEADLINE)
    return Reply(200, value_line(value)) if ok else PUT_FAILED


_PONG = Reply(200, b"{}\n")


def ping_push(state: ProxyState, request: Request) -> Reply | Later:
    """``POST /node/pingPush``: ask the push side to send a pong; replies ``{}`` (OpenDHT never replies)."""
    try:
        doc = parse_json(request.body)
    except BadRequest as exc:
        return Reply(exc.status, exc.body)
    if not isinstance(doc, dict):
        return INCORRECT_JSON
    state.count_request()
    token = doc.get("key")
    if not isinstance(token, str | int) or isinstance(token, bool) or not str(token):
        return NO_TOKEN
    fields = {k: doc.get(k) for k in ("client_id", "platform", "topic")}
    if not all(isinstance(v, str | None) for v in fields.values()):
        return error(400, "client_id, platform and topic must be strings")
    if state.push is None:
        return _PONG
    target = PushTarget(
        str(token),
        client_id=fields["client_id"] or "",
        platform=fields["platform"] or "",
        topic=fields["topic"] or "",
    )
    return Later(functools.partial(_ping, state.push, target))


async def _ping(push: PushHooks, target: PushTarget) -> Reply:
    try:
        await push.ping(target)
    except Exception:
        log.exception("ping push failed")
    return _PONG


def subscribe(state: ProxyState, request: Request) -> Reply | Later:
    """``SUBSCRIBE /key/{hash}``, ``SUBSCRIBE /{hash}``: the push hooks' reply; a repeated subscription is
    answered with the values now under the key (a DHT get)."""
    assert state.push is not None and request.key is not None
    state.count_request()
    reply = state.push.subscribe(request.key, request.body, client_source(request.client))
    if not reply.fetch_values:
        return push_reply(reply)
    return Later(functools.partial(_with_values, state, request.key, reply))


async def _with_values(state: ProxyState, key: InfoHash, reply: PushReply) -> Reply:
    return push_reply(reply.with_values(await state.dht.get(key)))


def unsubscribe(state: ProxyState, request: Request) -> Reply:
    """``UNSUBSCRIBE /key/{hash}``, ``UNSUBSCRIBE /{hash}``: the push hooks' reply."""
    assert state.push is not None and request.key is not None
    state.count_request()
    return push_reply(state.push.unsubscribe(request.key, request.body))


def push_reply(reply: PushReply) -> Reply:
    """The :class:`Reply` of a push hooks' reply: chunked, its body (if any) then one value JSON line per
    value, when it says so."""
    if not reply.chunked:
        return Reply(reply.status, reply.body)
    chunks = (reply.body,) if reply.body else ()
    if reply.values:
        chunks += tuple(value_line(value) for value in reply.values)
    return Reply(reply.status, chunks=chunks)


ROUTES: dict[Route, RouteSpec] = {
    Route.NODE_INFO: RouteSpec(node_info),
    Route.NODE_STATS: RouteSpec(node_stats),
    Route.METRICS: RouteSpec(metrics),
    Route.HEALTHZ: RouteSpec(healthz),
    Route.STATUS: RouteSpec(status),
    Route.OPTIONS: RouteSpec(options),
    Route.GET: RouteSpec(get),
    Route.PUT: RouteSpec(put, reads_body=True),
    Route.LISTEN: RouteSpec(listen),
    Route.PING_PUSH: RouteSpec(ping_push, reads_body=True),
    Route.SUBSCRIBE: RouteSpec(subscribe, reads_body=True),
    Route.UNSUBSCRIBE: RouteSpec(unsubscribe, reads_body=True),
    Route.SIGN: RouteSpec(sign, reads_body=True),
    Route.ENCRYPT: RouteSpec(encrypt, reads_body=True),
}
"""Each route's handler (the routes: :data:`trio_dht.rest.paths.TABLE`)."""
