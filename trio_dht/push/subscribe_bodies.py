"""SUBSCRIBE and UNSUBSCRIBE bodies, in both dialects, parsed into typed requests (sans-IO).

Current OpenDHT clients send ``{"client_id", "key", "platform", "session_id", "topic"[, "refresh"]}``;
clients of the seed dialect (:attr:`~trio_dht.push.payloads.Dialect.SEED`) send
``{"key", "callback_id", "platform"}`` and unsubscribe with ``{"key", "token": x, "callback_id"}``. A body
with ``callback_id`` (or, to UNSUBSCRIBE, ``token``) and no ``client_id`` is the seed dialect.

Lenient where OpenDHT is (a number as ``key``, trailing bytes after the JSON object), strict where it would
throw (a body that is not an object, fields of the wrong type): every bad body is a :class:`BadRequest` with a
JSON error, never an exception escaping. Deliberate deviations from OpenDHT: UNSUBSCRIBE without a key is a
400 (not 501), and a body that is not an object is a 400 (not 500).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from trio_dht.push.payloads import Dialect, Platform
from trio_dht.rest.errors import BadRequest

MAX_TOKEN_LEN = 1000
"""Longest push token or endpoint URL accepted (FCM tokens are ~160 bytes, UnifiedPush endpoints ≤ 1000)."""
MAX_ID_LEN = 256
"""Longest ``client_id``, ``callback_id``, ``session_id`` or ``topic``: they travel in every push."""


@dataclass(frozen=True, slots=True)
class SubscribeRequest:
    dialect: Dialect
    token: str
    """The device token, or for UnifiedPush the endpoint URL."""
    platform: Platform
    topic: str
    client_id: str
    """``client_id`` (current dialect) or ``callback_id`` (seed dialect); ``""`` if absent."""
    session_id: str | None
    """None when the body has no ``session_id`` (a refresh then keeps the stored one)."""
    refresh: bool


@dataclass(frozen=True, slots=True)
class UnsubscribeRequest:
    dialect: Dialect
    token: str
    client_id: str
    sub_token: int | None
    """The seed dialect's ``token`` (the value SUBSCRIBE replied), if given."""


_DECODER = json.JSONDecoder()
"""Stateless: one for every body (``raw_decode``, so that trailing bytes are ignored, as OpenDHT does)."""


def _object(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8").lstrip()
        obj, _ = _DECODER.raw_decode(text)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("Incorrect JSON") from None
    if not isinstance(obj, dict):
        raise BadRequest("Incorrect JSON")
    return obj


def _text(obj: dict[str, Any], name: str, limit: int = MAX_ID_LEN, *, numbers: bool = False) -> str:
    value = obj.get(name)
    if value is None:
        return ""
    if numbers and type(value) is int:
        value = str(value)
    if not isinstance(value, str):
        raise BadRequest(f"Bad field {name}")
    if len(value) * 4 > limit and len(value.encode("utf-8", "surrogatepass")) > limit:
        raise BadRequest(f"Field {name} too long")
    return value


def _token(obj: dict[str, Any]) -> str:
    token = _text(obj, "key", MAX_TOKEN_LEN, numbers=True)
    if not token:
        raise BadRequest("No token")
    return token


def _is_seed(obj: dict[str, Any], *markers: str) -> bool:
    return "client_id" not in obj and any(m in obj for m in markers)


def parse_subscribe(body: bytes) -> SubscribeRequest:
    """Parse a SUBSCRIBE body; raises :class:`BadRequest`."""
    obj = _object(body)
    token = _token(obj)
    seed = _is_seed(obj, "callback_id")
    refresh = obj.get("refresh", False)
    if not isinstance(refresh, bool):
        raise BadRequest("Bad field refresh")
    session = obj.get("session_id")
    return SubscribeRequest(
        dialect=Dialect.SEED if seed else Dialect.CURRENT,
        token=token,
        platform=Platform.parse(_text(obj, "platform")),
        topic=_text(obj, "topic"),
        client_id=_text(obj, "callback_id" if seed else "client_id", numbers=True),
        session_id=None if session is None or seed else _text(obj, "session_id"),
        refresh=refresh,
    )


def parse_unsubscribe(body: bytes) -> UnsubscribeRequest:
    """Parse an UNSUBSCRIBE body; raises :class:`BadRequest`."""
    obj = _object(body)
    token = _token(obj)
    seed = _is_seed(obj, "callback_id", "token")
    sub_token = None
    if seed and obj.get("token") is not None:
        raw = obj["token"]
        if type(raw) is int or (isinstance(raw, str) and raw.isdecimal() and len(raw) <= 20):
            sub_token = int(raw)
        else:
            raise BadRequest("Bad field token")
    return UnsubscribeRequest(
        dialect=Dialect.SEED if seed else Dialect.CURRENT,
        token=token,
        client_id=_text(obj, "callback_id" if seed else "client_id", numbers=True),
        sub_token=sub_token,
    )
