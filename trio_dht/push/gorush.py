"""The gorush gateway: Android (FCM) and iOS (APNs) pushes as ``POST /api/push``.

Bodies are those OpenDHT's proxy sends, with Android's priority and TTL in the FCM HTTP v1 ``android`` block
as OpenDHT's current code does:

- Android: ``{"android": {"priority", "ttl": "86400s"}, "data", "platform": 2, "tokens": [token]}``; never a
  ``topic`` (gorush would make it an FCM topic message).
- iOS: ``{"data", "expiration": now + 24 h, "platform": 1, "priority", "tokens", "topic"?}`` plus either an
  alert (``"push_type": "alert", "alert": {"title": "hello"}, "mutable_content": true``, priority high) for
  high-priority and timeout pushes, so the notification service extension runs, or a background push
  (``"push_type": "background", "content_available": true``).
- A missing or unknown platform is sent as iOS, deliberately, as OpenDHT does: clients that predate the
  ``platform`` field are iOS clients, and gorush reports an unusable token as a failed push, which prunes it.

Notifications are batched, one token each, up to gorush's ``max_notification`` (100) per request, posted
through a :class:`~trio_dht.push.keepalive.KeepAliveClient` to an ``http://`` gorush (through the shared
httpx client to an ``https://`` one). With gorush in sync mode its ``logs`` name failed tokens: dead ones
(APNs ``Unregistered``/``BadDeviceToken``/..., FCM "not found"/"not a valid FCM registration token") are
pruned, throttled ones retried, others dropped. Give gorush ``log.hide_token: false``, or ``notif_ids=True``
here, so that failures map back to pushes. A reply body is read up to ``Limits.push_response_bytes``: past it
the request fails (temporary for a 429 or a 5xx, else permanent: gorush may have sent the pushes already).
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Hashable, Sequence
from typing import Any

import httpx

from trio_dht.limits import DEFAULT as DEFAULT_LIMITS
from trio_dht.limits import Limits
from trio_dht.push import gateway
from trio_dht.push.gateway import (
    TIMED_OUT,
    USER_AGENT,
    Outcome,
    PermanentGatewayError,
    Reply,
    ReplyTooLarge,
    TemporaryGatewayError,
    raise_for_transient,
    reply_too_large,
)
from trio_dht.push.keepalive import KeepAliveClient
from trio_dht.push.payloads import PUSH_TTL, Platform, Push

GORUSH_ANDROID = 2
GORUSH_IOS = 1
IOS_ALERT = {"title": "hello"}

_DEAD_TOKEN_ERRORS = (
    "unregistered",
    "baddevicetoken",
    "devicetokennotfortopic",
    "topicdisallowed",
    "expiredtoken",
    "requested entity was not found",
    "not a valid fcm registration token",
    "registration-token-not-registered",
)
_RETRY_ERRORS = ("toomanyrequests", "serviceunavailable", "internalservererror", "shutdown", "unavailable")
_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
"""The request body's JSON, as httpx's ``json=`` writes it."""


def gorush_notification(push: Push, *, bundle_id: str, now_wall: float) -> dict[str, Any]:
    """The gorush notification object for one push."""
    priority = "high" if push.high_priority else "normal"
    if push.platform is Platform.ANDROID:
        return {
            "android": {"priority": priority, "ttl": f"{PUSH_TTL}s"},
            "data": push.data,
            "platform": GORUSH_ANDROID,
            "tokens": [push.token],
        }
    note: dict[str, Any] = {
        "data": push.data,
        "expiration": int(now_wall) + PUSH_TTL,
        "platform": GORUSH_IOS,
        "tokens": [push.token],
    }
    topic = push.topic or bundle_id
    if topic:
        note["topic"] = topic
    if push.high_priority or "timeout" in push.data:
        note.update(priority="high", push_type="alert", alert=dict(IOS_ALERT), mutable_content=True)
    else:
        note.update(priority=priority, push_type="background", content_available=True)
    return note


def classify_failure(error: str) -> Outcome:
    """What a gorush ``failed-push`` log's ``error`` means for the push (matched loosely: not a stable
    API)."""
    text = error.lower()
    if any(marker in text for marker in _DEAD_TOKEN_ERRORS):
        return Outcome.TOKEN_GONE
    if any(marker in text for marker in _RETRY_ERRORS):
        return Outcome.RETRY
    return Outcome.DROPPED


class GorushGateway:
    """Pushes for Android, iOS and unknown platforms through one gorush server."""

    name = "gorush"

    def __init__(
        self,
        client: httpx.AsyncClient | None,
        url: str,
        *,
        bundle_id: str = "",
        max_batch: int = 100,
        lanes: int = 2,
        notif_ids: bool = False,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        """``url`` is gorush's base URL (``http://host:port``); ``lanes`` requests may be in flight at
        once. ``client`` is used only for an ``https://`` URL; :meth:`close` closes the kept connections."""
        self._client = client
        self._url = url.rstrip("/") + "/api/push"
        self._path = urllib.parse.urlsplit(self._url).path
        self._max_body = limits.push_response_bytes
        self._timeout = limits.push_request_timeout
        self._lean = (
            KeepAliveClient(
                url, timeout=limits.push_request_timeout, user_agent=USER_AGENT, max_body=self._max_body
            )
            if url.lower().startswith("http://")
            else None
        )
        self._bundle_id = bundle_id
        self.max_batch = max_batch
        self._lanes = lanes
        self._notif_ids = notif_ids

    def lane(self, push: Push) -> Hashable:
        return push.sid % self._lanes

    def request_body(self, pushes: Sequence[Push], now_wall: float) -> dict[str, Any]:
        notes = [gorush_notification(p, bundle_id=self._bundle_id, now_wall=now_wall) for p in pushes]
        if self._notif_ids:
            for i, note in enumerate(notes):
                note["notif_id"] = str(i)
        return {"notifications": notes}

    def close(self) -> None:
        if self._lean is not None:
            self._lean.close()

    async def send(self, pushes: Sequence[Push]) -> list[Outcome]:
        now_wall = time.time()
        body = _encode_json(self.request_body(pushes, now_wall)).encode()
        try:
            if self._lean is not None:
                response = await self._lean.post(self._path, body, "application/json")
            else:
                assert self._client is not None, "an https:// gorush needs the httpx client"
                with gateway.deadline(self._timeout, "gorush"):
                    response = await gateway.post(
                        self._client,
                        self._url,
                        content=body,
                        headers={"Content-Type": "application/json"},
                        max_bytes=self._max_body,
                    )
        except httpx.TimeoutException as exc:
            raise TemporaryGatewayError(f"gorush timed out: {exc!r}", reason=TIMED_OUT) from exc
        except httpx.TransportError as exc:
            raise TemporaryGatewayError(f"gorush unreachable: {exc!r}") from exc
        except ReplyTooLarge as exc:
            raise reply_too_large(exc, now_wall) from None
        raise_for_transient(response, now_wall)
        if response.status_code != 200:
            text = response.content[:200].decode("utf-8", "replace")
            raise PermanentGatewayError(f"gorush refused: {response.status_code} {text}")
        return self._outcomes(pushes, response)

    def _outcomes(self, pushes: Sequence[Push], response: Reply) -> list[Outcome]:
        outcomes = [Outcome.DELIVERED] * len(pushes)
        try:
            logs = response.json().get("logs") or []
        except (ValueError, AttributeError):
            return outcomes  # accepted, but the reply is unreadable: nothing to learn from it
        if not isinstance(logs, list):
            return outcomes
        for entry in logs:
            if not isinstance(entry, dict) or entry.get("type") != "failed-push":
                continue
            outcome = classify_failure(str(entry.get("error", "")))
            notif_id = entry.get("notif_id")
            for i, push in enumerate(pushes):
                if (notif_id == str(i)) if self._notif_ids and notif_id else push.token == entry.get("token"):
                    outcomes[i] = outcome
        return outcomes
