"""Values as the REST proxy writes and reads them: OpenDHT's ``Value::toJson`` and ``Value(Json)``.

Written JSON is compact with keys in alphabetical order (as jsoncpp writes it): the id is a decimal *string*,
payloads are standard padded base64, the owner is a PEM public key and the recipient 40 hex digits. An
encrypted value carries only ``cypher`` (plus ``id``, ``prio`` and ``pt``). Reading is as lenient as OpenDHT
where OpenDHT is lenient (an id may be a string or a number; a missing or bad one means "unset") and strict
where OpenDHT would throw (bad base64, a non-integer type): :class:`ValueJsonError` then, which the routes
answer with a 400.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from trio_dht.infohash import HASH_LEN
from trio_dht.value import Value

_PEM_BODY = re.compile(r"-----BEGIN PUBLIC KEY-----(.*?)-----END PUBLIC KEY-----", re.S)
_UINT64_MAX = (1 << 64) - 1


class ValueJsonError(ValueError):
    """A request body that is not a value OpenDHT would accept."""


@dataclass(frozen=True, slots=True)
class PushTarget:
    """The push details of a permanent put (``"permanent": {"key": ..., ...}``): whom to warn before it
    lapses.
    """

    token: str
    client_id: str = ""
    platform: str = ""
    session_id: str = ""
    topic: str = ""


PERMANENT_PUT_LIFETIME = 24 * 3600.0
"""How long the proxy keeps a permanent put that is not refreshed (OpenDHT's ``OP_TIMEOUT``)."""
PERMANENT_PUT_REFRESH_MARGIN = 2 * 3600.0
"""How long before that lifetime ends the proxy asks for a refresh (OpenDHT's ``OP_MARGIN``)."""


@dataclass(frozen=True, slots=True)
class PutRequest:
    """A parsed ``POST /key/{hash}`` body."""

    value: Value
    permanent: bool = False
    push: PushTarget | None = None


# -- writing -------------------------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def owner_pem(der: bytes) -> str:
    """A DER SubjectPublicKeyInfo as the PEM text OpenDHT writes (64-character lines, trailing newline)."""
    text = b64(der)
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return "-----BEGIN PUBLIC KEY-----\n" + "\n".join(lines) + "\n-----END PUBLIC KEY-----\n"


def value_to_json(value: Value, *, expired: bool = False) -> dict[str, Any]:
    """The JSON object for ``value`` (``"expired": true`` added for listen expirations)."""
    obj: dict[str, Any] = {"id": str(value.id)}
    if value.cypher:
        obj["cypher"] = b64(value.cypher)
    else:
        obj["type"] = value.type
        obj["data"] = b64(value.data)
        if value.owner is not None:
            obj["owner"] = owner_pem(value.owner)
            obj["seq"] = value.seq
            if value.signature:
                obj["sig"] = b64(value.signature)
            if value.recipient is not None:
                obj["to"] = value.recipient.hex()
        if value.utype:
            obj["utype"] = value.utype
    if value.prio:
        obj["prio"] = value.prio
    if value.push_type:
        obj["pt"] = value.push_type
    if expired:
        obj["expired"] = True
    return obj


_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True)
"""Built once: ``json.dumps`` with these options builds a new encoder on every call."""


def dumps(obj: Any) -> bytes:
    """Compact, key-sorted, ASCII JSON, as jsoncpp's writer (no trailing newline)."""
    return _ENCODER.encode(obj).encode("ascii")


def value_line(value: Value, *, expired: bool = False) -> bytes:
    """One NDJSON line for ``value``, newline included.

    Cached on the value (values are not mutated once stored; see :meth:`Value.packed`), so one event sent to
    many listen streams, or a value in many GET replies, is encoded once. A value without an id yet is not
    cached: its id is about to be assigned.
    """
    line = value._json_expired if expired else value._json
    if line is None:
        line = dumps(value_to_json(value, expired=expired)) + b"\n"
        if value.id:
            if expired:
                value._json_expired = line
            else:
                value._json = line
    return line


# -- reading -------------------------------------------------------------------------------------------------


def _b64decode(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise ValueJsonError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueJsonError(f"{what} is not valid base64") from None


def _int(obj: Any, what: str, bits: int) -> int:
    if type(obj) is not int or not 0 <= obj < (1 << bits):
        raise ValueJsonError(f"{what} must be an integer in [0, 2^{bits})")
    return obj


def _text(obj: Any, what: str) -> str:
    if isinstance(obj, str):
        return obj
    if type(obj) in (int, float):
        return json.dumps(obj)
    if obj is None:
        return ""
    raise ValueJsonError(f"{what} must be a string")


def _value_id(obj: Any) -> int:
    """A string or number id; anything else (missing, negative, ``"abc"``) is 0, "unset", as OpenDHT."""
    if type(obj) is int:
        return obj if 0 <= obj <= _UINT64_MAX else 0
    if isinstance(obj, str) and obj.isascii() and obj.isdigit():
        vid = int(obj)
        return vid if vid <= _UINT64_MAX else 0
    return 0


def _owner_der(obj: Any) -> bytes:
    if not isinstance(obj, str):
        raise ValueJsonError("owner must be a PEM public key")
    m = _PEM_BODY.search(obj)
    if m is None:
        raise ValueJsonError("owner must be a PEM public key")
    der = _b64decode("".join(m.group(1).split()), "owner")
    if not der:
        raise ValueJsonError("owner must be a PEM public key")
    return der


def value_from_json(obj: Any) -> Value:
    """The value a JSON object describes; raises :class:`ValueJsonError` for what OpenDHT would refuse."""
    if not isinstance(obj, dict):
        raise ValueJsonError("a value is a JSON object")
    value = Value(id=_value_id(obj.get("id")))
    if "cypher" in obj:
        value.cypher = _b64decode(obj["cypher"], "cypher")
    else:
        value.data = _b64decode(obj.get("data", ""), "data")
        value.type = _int(obj.get("type", 0), "type", 16)
        if "owner" in obj:
            value.owner = _owner_der(obj["owner"])
            value.seq = _int(obj.get("seq", 0), "seq", 16)
            if "sig" in obj:
                value.signature = _b64decode(obj["sig"], "sig")
            if "to" in obj:
                to = obj["to"]
                try:
                    recipient = bytes.fromhex(to) if isinstance(to, str) else b""
                except ValueError:
                    recipient = b""
                if len(recipient) != HASH_LEN:
                    raise ValueJsonError("to must be 40 hex digits")
                value.recipient = recipient
        if "utype" in obj:
            value.utype = _text(obj["utype"], "utype")
    if "prio" in obj:
        value.prio = _int(obj["prio"], "prio", 32)
    if "pt" in obj:
        value.push_type = _text(obj["pt"], "pt")
    return value


def put_request_from_json(obj: Any) -> PutRequest:
    """A POST body: the value plus its optional ``permanent`` member.

    ``"permanent": true`` (or any value but ``false``/``null``) asks for a permanent put; an object also names
    a push target, kept only when its ``key`` (the push token) is non-empty. ``false`` means "not permanent"
    (OpenDHT's proxy makes a put permanent whenever the member is there, even as ``false``).
    """
    value = value_from_json(obj)
    permanent = obj.get("permanent")
    if permanent is None or permanent is False:
        return PutRequest(value)
    push = None
    if isinstance(permanent, dict):
        token = _text(permanent.get("key"), "permanent.key")
        if token:
            push = PushTarget(
                token=token,
                client_id=_text(permanent.get("client_id"), "permanent.client_id"),
                platform=_text(permanent.get("platform"), "permanent.platform"),
                session_id=_text(permanent.get("session_id"), "permanent.session_id"),
                topic=_text(permanent.get("topic"), "permanent.topic"),
            )
    return PutRequest(value, permanent=True, push=push)
