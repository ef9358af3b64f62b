"""The one interface every push gateway implements, its failure types, and the shared HTTP client.

A gateway turns :class:`~trio_dht.push.payloads.Push` objects into its provider's requests. It sends a batch
of at most :attr:`Gateway.max_batch` pushes that share a lane (:meth:`Gateway.lane`: what backs off together,
e.g. one gorush, or one Web Push host) and reports per push an :class:`Outcome`; a failure of the whole
request is an exception: :class:`TemporaryGatewayError` (connection errors, 5xx, 429: retry later, perhaps
after ``retry_after`` seconds) or :class:`PermanentGatewayError` (the request itself is wrong: do not retry).
Dead tokens are an outcome, not an exception (as Sygnal: rejection is a return value).
"""

from __future__ import annotations

import email.utils
import enum
import math
from collections.abc import Hashable, Sequence
from typing import Protocol

import httpx

from trio_dht.push.payloads import Push

USER_AGENT = "trio-dht push"
TIMEOUT = 15.0
"""Seconds a gateway request may take."""
MAX_RETRY_AFTER = 3600.0
"""A longer ``Retry-After`` is clamped: a gateway may not park pushes for longer than an hour at a time."""


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    """The gateway accepted it (which never proves the device got it)."""
    TOKEN_GONE = "token-gone"
    """The token or endpoint is dead: every subscription of that token is pruned."""
    RETRY = "retry"
    """A temporary failure of this push alone (e.g. APNs ``TooManyRequests`` for one device)."""
    DROPPED = "dropped"
    """A permanent failure of this push alone (our bug or a misconfiguration): logged and counted."""


class GatewayError(Exception):
    """A failure of a whole gateway request."""


class TemporaryGatewayError(GatewayError):
    """Retry the whole batch later; ``retry_after`` is the gateway's ``Retry-After`` in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentGatewayError(GatewayError):
    """The request was refused for what it is; retrying it cannot help."""


class Gateway(Protocol):
    """A push gateway (gorush, UnifiedPush, later FCM or APNs directly). One that keeps connections of its own
    also has a ``close()`` method, which :class:`~trio_dht.push.dispatcher.Dispatcher` calls as it ends."""

    name: str
    max_batch: int
    """Most pushes :meth:`send` takes at once."""

    def lane(self, push: Push) -> Hashable:
        """Pushes in one lane are batched together and back off together."""
        ...

    async def send(self, pushes: Sequence[Push]) -> list[Outcome]:
        """Deliver ``pushes`` (one lane, at most :attr:`max_batch`); one outcome per push, in order.

        Raises :class:`TemporaryGatewayError` or :class:`PermanentGatewayError` for the whole batch.
        """
        ...


def parse_retry_after(value: str | None, now_wall: float) -> float | None:
    """Seconds from a ``Retry-After`` header (delta seconds or an HTTP date), clamped to an hour; None if
    bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdecimal():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None or when.tzinfo is None:
            return None
        seconds = when.timestamp() - now_wall
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def raise_for_transient(response: httpx.Response, now_wall: float) -> None:
    """Raise :class:`TemporaryGatewayError` for a 429 or a 5xx reply."""
    if response.status_code == 429 or response.status_code >= 500:
        raise TemporaryGatewayError(
            f"gateway answered {response.status_code}",
            parse_retry_after(response.headers.get("retry-after"), now_wall),
        )


def new_http_client(*, timeout: float = TIMEOUT, max_connections: int = 32) -> httpx.AsyncClient:
    """The one HTTP client all gateways share: keep-alive, bounded, never following redirects.

    ``trust_env`` is off so that environment proxies cannot reroute pushes around the SSRF guard.
    """
    return httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(timeout),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        headers={"User-Agent": USER_AGENT},
    )
