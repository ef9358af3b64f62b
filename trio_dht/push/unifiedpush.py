"""The UnifiedPush gateway: Web Push (RFC 8030) straight to the endpoint URL the subscriber gave as its token.

``POST <endpoint>`` (scheme, host, **port**, path and query as given; OpenDHT 2.4.12 dropped the port) with
``TTL: 86400`` and ``Urgency: high|normal``. When the subscription's topic is ``"<p256dh>|<auth>"`` the body
is RFC 8291 ``aes128gcm``-encrypted (``Content-Encoding: aes128gcm``); otherwise it is the plain JSON, as
OpenDHT sends it. With a :class:`~trio_dht.push.vapid.Vapid`, each request carries a VAPID ``Authorization``
header (RFC 8292). One push per request. Replies: any 2xx is success; 404/410 prune the endpoint; 429 and 5xx
back the host off (honouring ``Retry-After``); 3xx (never followed), 400, 401/403, 413 drop the push. A reply
body is read up to ``Limits.push_response_bytes``; past it the request fails (temporary for a 429 or a 5xx,
else the push is dropped) and the connection is closed.

Unless private endpoints are allowed, every request goes through :mod:`~trio_dht.push.ssrf`: the host is
resolved, every address must be public, and the request is pinned to the checked address (``Host`` and TLS
server name stay the endpoint's), so a DNS answer cannot be swapped in between check and connect.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

import httpx

from trio_dht.limits import DEFAULT as DEFAULT_LIMITS
from trio_dht.limits import Limits
from trio_dht.push import gateway, ssrf, webpush_crypto
from trio_dht.push.gateway import (
    LOOKUP_STUCK,
    TIMED_OUT,
    Outcome,
    ReplyTooLarge,
    TemporaryGatewayError,
    raise_for_transient,
    reply_too_large,
)
from trio_dht.push.payloads import MAX_WEBPUSH_DATA, PUSH_TTL, Push, encode_data

if TYPE_CHECKING:
    from trio_dht.push.vapid import Vapid

MAX_MESSAGE = 4096
"""Largest Web Push body on the wire (RFC 8030 servers must accept at least this)."""


def webpush_request(push: Push) -> tuple[dict[str, str], bytes]:
    """Headers and body for one push; raises ValueError if it cannot fit a Web Push message."""
    plaintext = encode_data(push.data)
    if len(plaintext) > MAX_WEBPUSH_DATA:
        raise ValueError("push data too large for Web Push")
    headers = {"TTL": str(PUSH_TTL), "Urgency": "high" if push.high_priority else "normal"}
    keys = webpush_crypto.parse_topic_keys(push.topic)
    if keys is None:
        headers["Content-Type"] = "application/json"
        return headers, plaintext
    headers["Content-Type"] = "application/octet-stream"
    headers["Content-Encoding"] = "aes128gcm"
    return headers, webpush_crypto.encrypt(plaintext, *keys)


class UnifiedPushGateway:
    """Pushes for ``unifiedpush`` subscriptions, one request each, lanes per endpoint host."""

    name = "unifiedpush"
    max_batch = 1

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        allow_private: bool = False,
        limits: Limits = DEFAULT_LIMITS,
        vapid: Vapid | None = None,
    ) -> None:
        self._client = client
        self._vapid = vapid
        """Signs each request's ``Authorization: vapid ...`` header; None: requests carry none."""
        self._allow_private = allow_private
        self._max_body = limits.push_response_bytes
        self._timeout = limits.push_request_timeout
        self._lookups = ssrf.Lookups(2 * limits.push_concurrency)
        """Lookup threads: one per request in flight, as many again for lookups abandoned by their deadline
        (slow hosts, one each)."""

    def lane(self, push: Push) -> Hashable:
        try:
            endpoint = ssrf.parse_endpoint(push.token, allow_private=True)
        except ssrf.ForbiddenEndpoint:
            return ""
        return (endpoint.host, endpoint.port)

    async def send(self, pushes: Sequence[Push]) -> list[Outcome]:
        return [await self._send_one(push) for push in pushes]

    async def _send_one(self, push: Push) -> Outcome:
        with gateway.deadline(self._timeout, "UnifiedPush endpoint"):
            return await self._request(push)

    async def _request(self, push: Push) -> Outcome:
        now_wall = time.time()
        try:
            endpoint = ssrf.parse_endpoint(push.token, allow_private=self._allow_private)
            headers, body = webpush_request(push)
            if self._vapid is not None:
                headers["Authorization"] = self._vapid.header(endpoint.url)
            url, extensions = await self._target(endpoint, headers)
        except ssrf.ForbiddenEndpoint:
            return Outcome.TOKEN_GONE
        except (ValueError, webpush_crypto.WebPushCryptoError):
            return Outcome.DROPPED
        except OSError as exc:
            reason = LOOKUP_STUCK if isinstance(exc, ssrf.LookupStuck) else None
            raise TemporaryGatewayError(f"cannot resolve {endpoint.host}: {exc!r}", reason=reason) from exc
        try:
            response = await gateway.post(
                self._client,
                url,
                content=body,
                headers=headers,
                max_bytes=self._max_body,
                extensions=extensions,
            )
        except httpx.TimeoutException as exc:
            raise TemporaryGatewayError(f"{endpoint.host} timed out: {exc!r}", reason=TIMED_OUT) from exc
        except httpx.TransportError as exc:
            raise TemporaryGatewayError(f"{endpoint.host} unreachable: {exc!r}") from exc
        except ReplyTooLarge as exc:
            raise reply_too_large(exc, now_wall) from None
        raise_for_transient(response, now_wall)
        if 200 <= response.status_code < 300:
            return Outcome.DELIVERED
        if response.status_code in (404, 410):
            return Outcome.TOKEN_GONE
        return Outcome.DROPPED

    async def _target(self, endpoint: ssrf.Endpoint, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
        """The URL to request and the httpx extensions: pinned to a checked address unless private is
        allowed."""
        if self._allow_private:
            return endpoint.url, {}
        address = await ssrf.resolve_endpoint(endpoint, self._lookups)
        host = f"[{address}]" if isinstance(address, ipaddress.IPv6Address) else str(address)
        default_port = 443 if endpoint.scheme == "https" else 80
        netloc = endpoint.host if endpoint.port == default_port else f"{endpoint.host}:{endpoint.port}"
        if ":" in endpoint.host:
            netloc = f"[{endpoint.host}]" + ("" if endpoint.port == default_port else f":{endpoint.port}")
        headers["Host"] = netloc
        extensions = {"sni_hostname": endpoint.host} if endpoint.scheme == "https" else {}
        return f"{endpoint.scheme}://{host}:{endpoint.port}{endpoint.target}", extensions
