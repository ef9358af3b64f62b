"""The one interface every push gateway implements, its failure types, and the shared HTTP client.

A gateway turns :class:`~trio_dht.push.payloads.Push` objects into its provider's requests. It sends a batch
of at most :attr:`Gateway.max_batch` pushes that share a lane (:meth:`Gateway.lane`: what backs off together,
e.g. one gorush, or one Web Push host) and reports per push an :class:`Outcome`; a failure of the whole
request is an exception: :class:`TemporaryGatewayError` (connection errors, 5xx, 429: retry later, perhaps
after ``retry_after`` seconds) or :class:`PermanentGatewayError` (the request itself is wrong: do not retry).
Dead tokens are an outcome, not an exception (as Sygnal: rejection is a return value). An error may name its
``reason`` (:data:`TIMED_OUT`, :data:`OVERSIZED`), which the dispatcher counts.

Replies are read whole but bounded: :func:`post` streams the body and stops past ``max_bytes``
(:class:`ReplyTooLarge`; the connection is closed, not reused). Bodies are never decoded
(``Accept-Encoding: identity``), so a small compressed reply cannot grow in memory.
"""

from __future__ import annotations

import email.utils
import enum
import json
import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import trio

from trio_dht.limits import DEFAULT as DEFAULT_LIMITS
from trio_dht.limits import Limits
from trio_dht.push.payloads import Push

USER_AGENT = "trio-dht push"
USER_AGENT_BYTES = USER_AGENT.encode()
TIMED_OUT = "timeout"
"""The ``reason`` of a request that outlasted its deadline."""
OVERSIZED = "oversized"
"""The ``reason`` of a request whose reply body was over the cap."""
LOOKUP_STUCK = "lookup-stuck"
"""The ``reason`` of a request not made because its host's previous lookup (abandoned) still runs."""
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
    """A failure of a whole gateway request; ``reason`` (:data:`TIMED_OUT`, :data:`OVERSIZED`) is counted."""

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class TemporaryGatewayError(GatewayError):
    """Retry the whole batch later; ``retry_after`` is the gateway's ``Retry-After`` in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None, *, reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
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

        Raises :class:`TemporaryGatewayError` or :class:`PermanentGatewayError` for the whole batch. Returns
        or raises within the gateway's request deadline (``Limits.push_request_timeout``): a request without
        its whole reply by then is a :class:`TemporaryGatewayError` with reason :data:`TIMED_OUT`.
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


@dataclass(frozen=True, slots=True)
class Reply:
    """A gateway's reply, its body read whole (at most the cap) and not decoded."""

    status_code: int
    headers: Mapping[str, str]
    """Lower-case names (an httpx ``Headers`` is one too: it finds any case)."""
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)


class ReplyTooLarge(Exception):
    """The reply's body is over the cap: reading stopped there and the connection was closed."""

    def __init__(self, status_code: int, headers: Mapping[str, str], limit: int) -> None:
        super().__init__(f"reply body over {limit} bytes (status {status_code})")
        self.status_code = status_code
        self.headers = headers


def raise_for_transient(response: Reply | ReplyTooLarge, now_wall: float, reason: str | None = None) -> None:
    """Raise :class:`TemporaryGatewayError` for a 429 or a 5xx reply."""
    if response.status_code == 429 or response.status_code >= 500:
        raise TemporaryGatewayError(
            f"gateway answered {response.status_code}",
            parse_retry_after(response.headers.get("retry-after"), now_wall),
            reason=reason,
        )


def reply_too_large(exc: ReplyTooLarge, now_wall: float) -> GatewayError:
    """The error for an oversized reply: temporary for a 429 or a 5xx, else permanent (the same request would
    get the same reply)."""
    try:
        raise_for_transient(exc, now_wall, OVERSIZED)
    except TemporaryGatewayError as temporary:
        return temporary
    return PermanentGatewayError(str(exc), reason=OVERSIZED)


@contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Bound a request as a whole (resolving, connecting, sending, the whole reply): past ``seconds`` it is
    cancelled and raises :class:`TemporaryGatewayError` with reason :data:`TIMED_OUT`."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise TemporaryGatewayError(f"{what}: no whole reply in {seconds:g} s", reason=TIMED_OUT) from None


async def post(
    client: httpx.AsyncClient,
    url: str,
    *,
    content: bytes,
    headers: Mapping[str, str],
    max_bytes: int,
    extensions: dict[str, Any] | None = None,
) -> Reply:
    """POST through ``client``; the reply with its body read up to ``max_bytes``.

    Raises :class:`ReplyTooLarge` past the cap (the unread rest makes httpx close the connection) and
    :class:`httpx.TransportError` as httpx does.
    """
    request = client.build_request("POST", url, content=content, headers=headers, extensions=extensions)
    response = await client.send(request, stream=True)
    try:
        length = response.headers.get("content-length", "")
        if length.isdecimal() and int(length) > max_bytes:
            raise ReplyTooLarge(response.status_code, response.headers, max_bytes)
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > max_bytes:
                raise ReplyTooLarge(response.status_code, response.headers, max_bytes)
        return Reply(response.status_code, response.headers, bytes(body))
    finally:
        await response.aclose()


def new_http_client(limits: Limits = DEFAULT_LIMITS) -> httpx.AsyncClient:
    """The one HTTP client all gateways share: keep-alive, bounded, never following redirects.

    ``trust_env`` is off so that environment proxies cannot reroute pushes around the SSRF guard. Its
    timeouts bound each step; the dispatcher bounds each request as a whole.
    """
    connections = 2 * limits.push_concurrency  # every kind's requests at once, whatever kind shares it
    return httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(limits.push_request_timeout),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
    )
