"""What a push says: the ``data`` dictionaries of both dialects, and :class:`Push`, one wake-up for one
subscription.

Pushes never carry values (FCM and APNs cap a notification at a few KB, values reach 64 KB): the device GETs
them.

Current OpenDHT dialect (field names as OpenDHT's proxy, keys sorted as its jsoncpp writer sorts them):

- values: ``{"key": <hash hex>, "s": <session>, "t": <ms since epoch>, "to": <client_id>}``, plus
  ``"exp": "<value id>"`` when the wake-up is for exactly one expired value;
- timeout (the subscription is about to end): ``{"s": <session>, "timeout": <hash hex>, "to": <client_id>}``.

Seed dialect (the "Push notifications support" document): ``{"callback_id": y, "token": x}`` and
``{"callback_id": y, "timeout": <hash hex>, "token": x}``, where ``x`` is the subscription's token.

Priority as OpenDHT: high for new (not expired) values whose lowest ``prio`` is 0, normal otherwise and for
timeout pushes (gateways may still upgrade a timeout push, as iOS alerts do).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, replace
from typing import Any

PUSH_TTL = 24 * 3600
"""How long FCM, APNs and Web Push services keep an undelivered push (OpenDHT: 24 h)."""
MAX_GATEWAY_DATA = 2048
"""Largest ``data`` JSON sent through gorush: FCM and APNs cap whole notifications at 4 KB."""
MAX_WEBPUSH_DATA = 4096 - 86 - 16 - 1
"""Largest cleartext in one 4096-byte ``aes128gcm`` Web Push message (UnifiedPush AND_3: 3993 bytes)."""


class _Enum(enum.Enum):
    """An enum hashed by identity, in C: ``enum.Enum`` hashes a member's name with a Python call, and these
    are dict keys (with the subscription id, in tuples, which do not cache hashes) at every step of a push."""

    __hash__ = object.__hash__


class Platform(_Enum):
    """Where a subscription's pushes go. ``NONE`` is a missing or unknown ``platform``."""

    NONE = ""
    ANDROID = "android"
    IOS = "ios"
    UNIFIEDPUSH = "unifiedpush"

    @classmethod
    def parse(cls, text: str) -> Platform:
        return _PLATFORMS.get(text, cls.NONE)


_PLATFORMS = {p.value: p for p in Platform}


class Dialect(_Enum):
    """Which SUBSCRIBE body a subscription came with, hence its replies and push payloads."""

    CURRENT = "current"
    """Current OpenDHT clients: ``client_id``, ``session_id``, reply ``{}``."""
    SEED = "seed"
    """Subscriptions named by ``callback_id``; SUBSCRIBE replies ``{"token": x}`` and pushes carry that
    token."""


class PushKind(_Enum):
    VALUES = "values"
    """New or expired values: the device should GET the key."""
    TIMEOUT = "timeout"
    """The subscription ends soon: the device should SUBSCRIBE again."""


@dataclass(frozen=True, slots=True)
class Push:
    """One wake-up for one subscription, as the dispatcher queues it and a gateway renders it."""

    sid: int
    """The subscription it is for; with ``kind``, the coalescing slot."""
    kind: PushKind
    token: str
    """The device token, or the endpoint URL for UnifiedPush."""
    platform: Platform
    topic: str
    data: dict[str, Any]
    high_priority: bool

    @property
    def slot(self) -> tuple[int, PushKind]:
        """At most one push per slot waits in the dispatcher."""
        return (self.sid, self.kind)

    def merged_with(self, newer: Push) -> Push:
        """One push that tells the device everything this one and ``newer`` (same slot) told it.

        ``exp`` survives only if both name the same value; otherwise the device does a full GET, which covers
        every change. Priority is the higher of the two; other fields are the newer ones.
        """
        data = dict(newer.data)
        if "exp" in data and self.data.get("exp") != data["exp"]:
            del data["exp"]
        return replace(newer, data=data, high_priority=self.high_priority or newer.high_priority)


def values_data(
    dialect: Dialect,
    *,
    key_hex: str,
    client_id: str,
    session_id: str,
    sub_token: int,
    t_ms: int,
    expired_id: int | None = None,
) -> dict[str, Any]:
    """The ``data`` of a "values changed" push; ``expired_id`` when the change is one value expiring."""
    if dialect is Dialect.SEED:
        return {"callback_id": client_id, "token": sub_token}
    data: dict[str, Any] = {"key": key_hex, "s": session_id, "t": t_ms, "to": client_id}
    if expired_id is not None:
        data["exp"] = str(expired_id)
    return data


def timeout_data(
    dialect: Dialect, *, key_hex: str, client_id: str, session_id: str, sub_token: int
) -> dict[str, Any]:
    """The ``data`` of a "subscription ends soon, subscribe again" push."""
    if dialect is Dialect.SEED:
        return {"callback_id": client_id, "timeout": key_hex, "token": sub_token}
    return {"s": session_id, "timeout": key_hex, "to": client_id}


def encode_data(data: dict[str, Any]) -> bytes:
    """Compact JSON with sorted keys, as OpenDHT writes it."""
    return json.dumps(data, separators=(",", ":"), sort_keys=True, ensure_ascii=True).encode()


def data_limit(platform: Platform) -> int:
    """Largest encoded ``data`` a push to this platform may carry."""
    return MAX_WEBPUSH_DATA if platform is Platform.UNIFIEDPUSH else MAX_GATEWAY_DATA
