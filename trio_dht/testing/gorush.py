"""A gorush double: a real loopback HTTP server that decodes ``POST /api/push`` as strictly as gorush does.

Usage::

    async with open_gorush_double() as gorush:          # sync mode, tokens not masked
        gorush.fail_token("dead", "Unregistered")        # APNs reason / FCM message in the failure log
        gorush.script(503, headers={"Retry-After": "2"}) # the next request gets this reply
        ... point the proxy at gorush.url ...
        assert gorush.notifications[0]["platform"] == 2

What it emulates (gorush v1.22, Go's ``encoding/json`` into gorush's structs):

- any type mismatch (``"platform": "ios"``, ``"mutable_content": 1``, ``"android": {"ttl": 86400}``, a body
  that is not an object) or a missing/null ``notifications`` is ``400 {"code":400,"message":"Missing
  notifications field."}``; ``[]`` is ``Notifications field is empty.``; more than ``max_notification`` is
  ``Number of notifications(N) over limit(M)``. Unknown fields are ignored, ``null`` is accepted anywhere,
  field names match case-insensitively when no exact match exists, integers must be integer literals;
- notifications for disabled or unknown platforms are dropped silently and not counted; ``to`` is appended
  to ``tokens``; a notification without tokens is skipped;
- the reply is ``{"counts": N, "logs": [...], "success": "ok"}``; in sync mode ``logs`` lists
  ``failed-push`` entries for failing tokens (masked unless ``hide_token=False``, with ``notif_id`` echoed);
  in async mode ``logs`` is empty;
- ``GET /healthz``, ``GET /api/stat/app`` (counters).

Scripted replies may misbehave as a hostile server would: ``byte_interval`` sends the body one byte per that
many seconds (a slowloris), ``repeat`` sends the body that many times over (a huge reply, streamed, framed by
``Content-Length``, never held in memory whole).

It also serves the helpers the Web Push double shares: :func:`open_loopback_server` and
:class:`RecordedRequest`.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import hypercorn.trio
import trio
from hypercorn.config import Config

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request a double received, as it came."""

    method: str
    path: str
    """Path and query string."""
    headers: dict[str, str]
    """Lower-case names; repeated headers joined with ``, ``."""
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True, slots=True)
class Reply:
    """A scripted reply."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    repeat: int = 1
    """The body is sent this many times over (a huge reply from a small ``body``)."""
    byte_interval: float = 0.0
    """If set, the body goes one byte at a time, this many seconds apart."""


async def read_request(scope: Scope, receive: Receive) -> RecordedRequest:
    """The whole request of an ASGI ``http`` scope (the doubles record what they received)."""
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    headers: dict[str, str] = {}
    for name, value in scope["headers"]:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    path = scope["path"] + ("?" + scope["query_string"].decode("latin-1") if scope["query_string"] else "")
    return RecordedRequest(scope["method"], path, headers, b"".join(chunks))


async def send_reply(send: Send, reply: Reply) -> None:
    """Send ``reply`` on an ASGI ``http`` scope (slowly, in pieces, when the reply is scripted so)."""
    headers = [(k.lower().encode(), v.encode()) for k, v in reply.headers.items()]
    if not any(k == b"content-type" for k, _ in headers) and reply.body:
        headers.append((b"content-type", b"application/json; charset=utf-8"))
    if reply.repeat != 1 and not any(k == b"content-length" for k, _ in headers):
        headers.append((b"content-length", str(len(reply.body) * reply.repeat).encode()))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    if reply.byte_interval:
        body = reply.body * reply.repeat
        for i in range(len(body)):
            await send({"type": "http.response.body", "body": body[i : i + 1], "more_body": True})
            await trio.sleep(reply.byte_interval)
    else:
        for _ in range(reply.repeat - 1):
            await send({"type": "http.response.body", "body": reply.body, "more_body": True})
    await send({"type": "http.response.body", "body": b"" if reply.byte_interval else reply.body})


Handler = Callable[[RecordedRequest], Awaitable[Reply]]


async def answer_lifespan(scope: Scope, receive: Receive, send: Send) -> bool:
    """Answer an ASGI ``lifespan`` scope (startup, shutdown) and return True; False for any other scope."""
    if scope["type"] != "lifespan":
        return False
    while True:
        message = await receive()
        kind = message["type"].rsplit(".", 1)[-1]
        await send({"type": f"lifespan.{kind}.complete"})
        if kind == "shutdown":
            return True


@asynccontextmanager
async def serve_on_loopback(app: Any, config: Config | None = None) -> AsyncIterator[str]:
    """Serve the ASGI ``app`` with hypercorn on 127.0.0.1 (a free port) for the block; yields the base URL.
    ``config``: hypercorn's, for TLS or HTTP/2 settings (its ``bind`` and logs are set here)."""
    config = config or Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(hypercorn.trio.serve, app, config, shutdown_trigger=trio.sleep_forever)
        )
        try:
            yield binds[0]
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_loopback_server(handler: Handler) -> AsyncIterator[str]:
    """Serve ``handler`` over HTTP/1.1 on 127.0.0.1 (a free port); yields the base URL ``http://127.0.0.1:P``."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if await answer_lifespan(scope, receive, send) or scope["type"] != "http":
            return
        request = await read_request(scope, receive)
        await send_reply(send, await handler(request))

    async with serve_on_loopback(app) as url:
        yield url


# -- gorush's request schema (Go types) ----------------------------------------------------------------------

_STR, _INT, _BOOL, _FLOAT, _STRLIST, _OBJECT, _ANY = (
    "string",
    "int",
    "bool",
    "float",
    "[]string",
    "object",
    "any",
)


def _ttl(value: Any) -> bool:
    """firebase.google.com/go's AndroidConfig TTL: a string of seconds, an optional ``s`` and fraction."""
    if not isinstance(value, str):
        return False
    text = value[:-1] if value.endswith("s") else value
    parts = text.split(".")
    return len(parts) <= 2 and all(_go_parse_int(p) for p in parts)


def _go_parse_int(text: str) -> bool:
    body = text[1:] if text[:1] in "+-" else text
    return body.isascii() and body.isdigit()


_ALERT = {
    "action": _STR, "action-loc-key": _STR, "body": _STR, "launch-image": _STR, "loc-args": _STRLIST,
    "loc-key": _STR, "title": _STR, "subtitle": _STR, "title-loc-args": _STRLIST, "title-loc-key": _STR,
    "summary-arg": _STR, "summary-arg-count": _INT,
}  # fmt: skip
_FCM_NOTIFICATION = {"title": _STR, "body": _STR, "image": _STR}
_ANDROID = {
    "collapse_key": _STR, "priority": _STR, "ttl": _ttl, "restricted_package_name": _STR,
    "data": {"*": _STR}, "notification": _OBJECT, "fcm_options": _OBJECT, "direct_boot_ok": _BOOL,
}  # fmt: skip
_NOTIFICATION = {
    "notif_id": _STR, "to": _STR, "topic": _STR, "tokens": _STRLIST, "platform": _INT, "message": _STR,
    "title": _STR, "image": _STR, "priority": _STR, "content_available": _BOOL, "mutable_content": _BOOL,
    "sound": _ANY, "data": _OBJECT, "retry": _INT,
    "notification": _FCM_NOTIFICATION, "android": _ANDROID, "webpush": _OBJECT, "apns": _OBJECT,
    "fcm_options": _OBJECT, "condition": _STR,
    "app_id": _STR, "app_secret": _STR, "huawei_notification": _OBJECT, "huawei_data": _STR,
    "huawei_collapse_key": _INT, "huawei_ttl": _STR, "bi_tag": _STR, "fast_app_target": _INT,
    "expiration": _INT, "apns_id": _STR, "collapse_id": _STR, "push_type": _STR, "badge": _INT,
    "category": _STR, "thread-id": _STR, "url-args": _STRLIST, "alert": _ALERT, "production": _BOOL,
    "development": _BOOL, "name": _STR, "volume": _FLOAT, "interruption_level": _STR,
}  # fmt: skip


def _conforms(value: Any, kind: Any) -> bool:
    """Whether Go's ``encoding/json`` would decode ``value`` into a field of this kind."""
    if value is None or kind == _ANY:
        return True
    if callable(kind):
        return kind(value)
    if kind == _STR:
        return isinstance(value, str)
    if kind == _INT:
        return type(value) is int and -(2**63) <= value < 2**63
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _FLOAT:
        return type(value) in (int, float) and math.isfinite(value)
    if kind == _STRLIST:
        return isinstance(value, list) and all(v is None or isinstance(v, str) for v in value)
    if kind == _OBJECT:
        return isinstance(value, dict)
    if not isinstance(value, dict):
        return False
    if "*" in kind:
        return all(_conforms(v, kind["*"]) for v in value.values())
    folded = {name.lower(): name for name in kind}
    for name, item in value.items():
        field_name = name if name in kind else folded.get(name.lower())
        if field_name is not None and not _conforms(item, kind[field_name]):
            return False
    return True


def _field(obj: dict[str, Any], name: str) -> Any:
    """A field as Go finds it: the exact name, else a case-insensitive match."""
    if name in obj:
        return obj[name]
    return next((v for k, v in obj.items() if k.lower() == name), None)


PLATFORM_NAMES = {1: "ios", 2: "android", 3: "huawei"}


class GorushDouble:
    """State and behaviour of one gorush double (see the module docstring)."""

    def __init__(
        self,
        *,
        sync: bool = True,
        hide_token: bool = False,
        max_notification: int = 100,
        platforms: frozenset[int] = frozenset({1, 2}),
    ) -> None:
        self.url = ""
        self.sync = sync
        self.hide_token = hide_token
        self.max_notification = max_notification
        self.platforms = platforms
        self.requests: list[RecordedRequest] = []
        """Every request received, in order."""
        self.notifications: list[dict[str, Any]] = []
        """Every notification accepted for an enabled platform, as decoded JSON."""
        self.failures: dict[str, str] = {}
        self._script: deque[Reply] = deque()
        self.stats = {"success": 0, "error": 0}

    def fail_token(self, token: str, error: str) -> None:
        """Pushes to ``token`` fail with this provider ``error`` (e.g. ``Unregistered``)."""
        self.failures[token] = error

    def script(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        times: int = 1,
        *,
        repeat: int = 1,
        byte_interval: float = 0.0,
    ) -> None:
        """The next ``times`` requests get this reply instead of being processed (``repeat``,
        ``byte_interval``: see :class:`Reply`)."""
        self._script.extend([Reply(status, body, headers or {}, repeat, byte_interval)] * times)

    async def handle(self, request: RecordedRequest) -> Reply:
        self.requests.append(request)
        if request.method in ("GET", "HEAD") and request.path == "/healthz":
            return Reply(200)
        if request.method == "GET" and request.path == "/api/stat/app":
            return _json_reply(
                200, {"total_count": self.stats["success"] + self.stats["error"], **self.stats}
            )
        if request.path != "/api/push" or request.method != "POST":
            return _json_reply(404, {"code": 404, "message": "404 page not found"})
        if self._script:
            return self._script.popleft()
        return self._push(request.body)

    def _push(self, body: bytes) -> Reply:
        try:
            form = json.loads(body)
        except ValueError:
            form = None
        notes = _field(form, "notifications") if isinstance(form, dict) else None
        if (
            not isinstance(notes, list)
            or not all(n is None or isinstance(n, dict) for n in notes)
            or not all(_conforms(n, _NOTIFICATION) for n in notes)
        ):
            return _error(400, "Missing notifications field.")
        if not notes:
            return _error(400, "Notifications field is empty.")
        if len(notes) > self.max_notification:
            return _error(400, f"Number of notifications({len(notes)}) over limit({self.max_notification})")
        counts, logs = 0, []
        for note in notes:
            note = note or {}
            platform = _field(note, "platform") or 0
            tokens = [t or "" for t in (_field(note, "tokens") or [])]
            if _field(note, "to"):
                tokens.append(_field(note, "to"))
            if platform not in self.platforms or not tokens:
                continue
            self.notifications.append(note)
            counts += len(tokens)
            for token in tokens:
                error = self.failures.get(token)
                if error is None:
                    self.stats["success"] += 1
                    continue
                self.stats["error"] += 1
                entry = {
                    "type": "failed-push",
                    "platform": PLATFORM_NAMES[platform],
                    "token": _mask(token) if self.hide_token else token,
                    "message": _field(note, "message") or "",
                    "error": error,
                }
                if _field(note, "notif_id"):
                    entry["notif_id"] = _field(note, "notif_id")
                logs.append(entry)
        return _json_reply(200, {"counts": counts, "logs": logs if self.sync else [], "success": "ok"})


def _mask(token: str) -> str:
    return "*" * 10 + token[10:] if len(token) > 10 else "*" * len(token)


def _json_reply(status: int, obj: Any) -> Reply:
    return Reply(status, json.dumps(obj, separators=(",", ":")).encode())


def _error(status: int, message: str) -> Reply:
    return _json_reply(status, {"code": status, "message": message})


@asynccontextmanager
async def open_gorush_double(
    *,
    sync: bool = True,
    hide_token: bool = False,
    max_notification: int = 100,
    platforms: frozenset[int] = frozenset({1, 2}),
) -> AsyncIterator[GorushDouble]:
    """Run a :class:`GorushDouble` on loopback for the duration of the block; its ``url`` is the base URL."""
    double = GorushDouble(
        sync=sync, hide_token=hide_token, max_notification=max_notification, platforms=platforms
    )
    async with open_loopback_server(double.handle) as url:
        double.url = url
        yield double
