"""The proxy's route logic, independent of the HTTP layer.

Each route is one function here; :mod:`trio_dht.proxy.routes` and :mod:`trio_dht.proxy.subscribe` (Quart),
:mod:`trio_dht.proxy.fastpath` (raw ASGI) and :mod:`trio_dht.proxy.frontend` (plain HTTP/1.1) only move
requests in and :class:`Reply`, stream or push-reply bodies out.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from trio_dht.infohash import InfoHash
from trio_dht.persist import UNAVAILABLE, PersistError
from trio_dht.proxy import streams
from trio_dht.proxy.permanent import TooManyPuts
from trio_dht.proxy.state import ProxyState, PushHooks
from trio_dht.proxy.streams import GetStream, ListenFeed, ListenStream
from trio_dht.rest.value_json import (
    PushTarget,
    ValueJsonError,
    dumps,
    put_request_from_json,
    value_line,
)
from trio_dht.sources import client_key
from trio_dht.value import random_value_id

if TYPE_CHECKING:
    from trio_dht.push.service import PushReply

log = logging.getLogger(__name__)

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


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete (non-streamed) response; :data:`BASE_HEADERS` are added by the HTTP layer."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


class BadRequest(Exception):
    """A request the proxy refuses; carries the reply to send."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.body.decode("utf-8", "replace"))
        self.reply = reply


def error(status: int, message: str) -> Reply:
    return Reply(status, dumps({"err": message}) + b"\n")


INCORRECT_JSON = error(400, "Incorrect JSON")
MISSING_PARAMETERS = error(400, "Missing parameters")
NO_TOKEN = error(400, "No token")
PUT_FAILED = error(502, "Put failed")
NOT_READY = error(503, "Incorrect DhtRunner")


def parse_json(body: bytes) -> Any:
    """The JSON of a request body; :class:`BadRequest` (400 Incorrect JSON) if it is not JSON."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(INCORRECT_JSON) from None


# -- routes --------------------------------------------------------------------------------------------------


def node_info(state: ProxyState, client_host: str | None) -> Reply:
    """``GET /``, ``GET /node/info``: node info plus the client's address as seen here (not counted)."""
    return node_info_reply(node_info_document(state), client_host)


NodeInfoDocument = tuple[float, bytes, bytes]
"""The node-info JSON (newline included) split around the value of ``public_ip``, and when it expires."""


def node_info_document(state: ProxyState) -> NodeInfoDocument | None:
    """The node-info document, rebuilt at most every ``config.node_info_cache`` seconds (OpenDHT: every
    2 minutes; the same object until then); None while the node has no info.
    """
    now = trio.current_time()
    cached = state.node_info_bytes
    if cached is None or now >= cached[0]:
        doc = state.node_info()
        if doc is None:
            return None
        doc["public_ip"] = _PUBLIC_IP_MARK
        head, tail = dumps(doc).split(_PUBLIC_IP_JSON)
        cached = state.node_info_bytes = (now + state.config.node_info_cache, head, tail + b"\n")
    return cached


def node_info_reply(document: NodeInfoDocument | None, client_host: str | None) -> Reply:
    """The reply to a node-info request from ``client_host`` (503 without a document)."""
    if document is None:
        return NOT_READY
    return Reply(200, document[1] + dumps(client_host or "") + document[2])


_PUBLIC_IP_MARK = "\x00public_ip\x00"
_PUBLIC_IP_JSON = dumps(_PUBLIC_IP_MARK)


def node_stats(state: ProxyState) -> Reply:
    """``GET /node/stats``."""
    state.count_request()
    return Reply(200, dumps(state.stats(trio.current_time())) + b"\n")


def options(state: ProxyState) -> Reply:
    """``OPTIONS /{hash}``, ``OPTIONS /key/{hash}/listen``, ``GET /key/{hash}/options``: the CORS
    preflight.
    """
    state.count_request()
    return Reply(200, b"", OPTIONS_HEADERS)


def get(state: ProxyState, key: InfoHash) -> GetStream:
    """``GET /key/{hash}``, ``GET /{hash}``: always 200, NDJSON as values arrive."""
    state.count_request()
    return GetStream(state.dht, key)


async def get_lines(state: ProxyState, key: InfoHash, on_lines: Callable[[bytes], None]) -> None:
    """``GET /key/{hash}``, ``GET /{hash}`` for an HTTP layer that writes from a callback: ``on_lines`` gets
    the NDJSON of each batch of new values as they arrive; returns when the get ends (the body's end).
    """
    state.count_request()
    await streams.get_lines(state.dht, key, on_lines)


TOO_MANY_LISTENS = error(429, "Too many listen streams from this address")


def listen(state: ProxyState, key: InfoHash, client: str | None = None) -> ListenStream | Reply:
    """``GET /key/{hash}/listen`` (and the old ``LISTEN /{hash}``): an endless NDJSON stream; 429 when
    ``client`` holds ``Limits.http_listens_per_ip`` streams already."""
    state.count_request()
    if not state.listens.reserve(client):
        return TOO_MANY_LISTENS
    return ListenStream(state.dht, key, state.listens, client)


def listen_feed(
    state: ProxyState, key: InfoHash, on_ready: Callable[[], None], client: str | None = None
) -> ListenFeed | Reply:
    """:func:`listen` for an HTTP layer that writes from a callback: the stream's :class:`ListenFeed`."""
    state.count_request()
    if not state.listens.reserve(client):
        return TOO_MANY_LISTENS
    return ListenFeed(state.dht, key, state.listens, on_ready, client)


STATE_UNAVAILABLE = error(503, UNAVAILABLE)


def client_source(client: str | None) -> str:
    """The bucket a client's subscriptions and permanent puts are counted in
    (:func:`~trio_dht.sources.client_key`); ``""`` when unknown (not counted)."""
    key = client_key(client) if client else None
    return "" if key is None else key[0]


async def put(state: ProxyState, key: InfoHash, body: bytes, client: str | None = None) -> Reply:
    """``POST /key/{hash}``, ``POST /{hash}``: store a value; 200 with its JSON (id assigned) or 502.

    A new permanent put from a ``client`` that holds ``Limits.permanent_puts_per_source`` is refused (429),
    so is one past ``Limits.permanent_puts_bytes`` (503), and one the state file cannot take (503), before
    anything is held or put.
    """
    if not body.strip():
        return MISSING_PARAMETERS
    try:
        request = put_request_from_json(parse_json(body))
    except BadRequest as exc:
        return exc.reply
    except ValueJsonError as exc:
        return error(400, f"Invalid value: {exc}")
    state.count_request()
    value = request.value
    if request.permanent:
        now = trio.current_time()
        try:
            held = None if value.id else state.permanent.find_same(key, value, request.push)
            if held is not None:
                state.permanent.renew(held, request.push, now)
                return Reply(200, value_line(held.value))
            state.permanent.record(key, value, request.push, now, client_source(client))
        except TooManyPuts as exc:
            return error(exc.status, exc.message)
        except PersistError:
            return STATE_UNAVAILABLE
        state.permanent_changed()
    elif not value.id:
        value.id = random_value_id()
    try:
        ok = await state.dht.put(key, value, permanent=request.permanent)
    except Exception:
        log.exception("proxy put on %s failed", key)
        ok = False
    return Reply(200, value_line(value)) if ok else PUT_FAILED


async def ping_push(state: ProxyState, body: bytes) -> Reply:
    """``POST /node/pingPush``: ask the push side to send a pong; replies ``{}`` (OpenDHT never replies)."""
    try:
        doc = parse_json(body)
    except BadRequest as exc:
        return exc.reply
    if not isinstance(doc, dict):
        return INCORRECT_JSON
    state.count_request()
    token = doc.get("key")
    if not isinstance(token, str | int) or isinstance(token, bool) or not str(token):
        return NO_TOKEN
    fields = {k: doc.get(k) for k in ("client_id", "platform", "topic")}
    if not all(isinstance(v, str | None) for v in fields.values()):
        return error(400, "client_id, platform and topic must be strings")
    target = PushTarget(
        str(token),
        client_id=fields["client_id"] or "",
        platform=fields["platform"] or "",
        topic=fields["topic"] or "",
    )
    if state.push is not None:
        try:
            await state.push.ping(target)
        except Exception:
            log.exception("ping push failed")
    return Reply(200, b"{}\n")


def _push_hooks(state: ProxyState) -> PushHooks:
    if state.push is None:  # only a blueprint registered without push hooks gets here
        raise RuntimeError("SUBSCRIBE/UNSUBSCRIBE routes need the proxy's push hooks (create_app(push=...))")
    return state.push


async def subscribe(state: ProxyState, key: InfoHash, body: bytes, client: str | None = None) -> PushReply:
    """``SUBSCRIBE /key/{hash}``, ``SUBSCRIBE /{hash}`` from ``client``: the push hooks' reply, written as
    :func:`push_reply_chunks` says when it is chunked.
    """
    return await push_reply_values(state, key, subscribe_now(state, key, body, client))


def subscribe_now(state: ProxyState, key: InfoHash, body: bytes, client: str | None = None) -> PushReply:
    """``SUBSCRIBE``, without waiting: a reply with ``fetch_values`` still needs :func:`push_reply_values`."""
    state.count_request()
    return _push_hooks(state).subscribe(key, body, client_source(client))


async def push_reply_values(state: ProxyState, key: InfoHash, reply: PushReply) -> PushReply:
    """``reply`` with the values now under ``key`` when it asks for them (a DHT get)."""
    if not reply.fetch_values:
        return reply
    return reply.with_values(await state.dht.get(key))


def unsubscribe(state: ProxyState, key: InfoHash, body: bytes) -> PushReply:
    """``UNSUBSCRIBE /key/{hash}``, ``UNSUBSCRIBE /{hash}``: the push hooks' reply."""
    state.count_request()
    return _push_hooks(state).unsubscribe(key, body)


def push_reply_chunks(reply: PushReply) -> Iterator[bytes]:
    """The body of a chunked push reply: ``reply.body`` (if any), then one value JSON line per value."""
    if reply.body:
        yield reply.body
    for value in reply.values or ():
        yield value_line(value)
