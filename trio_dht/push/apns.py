"""The APNs gateway: iOS pushes straight to Apple's provider API (HTTP/2 over TLS, token authentication).

One ``POST /3/device/<hex token>`` per push, on ``api.push.apple.com`` (or ``api.sandbox.push.apple.com``),
port 443. A batch's requests go out at once as streams of one HTTP/2 connection, kept open across batches
(Apple treats rapid connect/disconnect as an attack). Headers:

- ``authorization: bearer <JWT>``: the provider token, ES256-signed with the team's ``.p8`` key (header
  ``{"alg": "ES256", "kid": key id}``, claims ``{"iss": team id, "iat": Unix seconds}``, the signature as raw
  ``r || s``). Apple refuses a token older than an hour (403 ``ExpiredProviderToken``) and one changed more
  often than every 20 minutes (429 ``TooManyProviderTokenUpdates``): one token serves every request and is
  signed again after 50 minutes, or once when Apple calls it expired (the refused push is then sent again);
- ``apns-topic``: the subscription's topic, else the configured bundle id (a push with neither is dropped);
- ``apns-push-type``/``apns-priority``: as OpenDHT's proxy asks of gorush, an ``alert`` at priority 10 for
  high-priority and timeout pushes (``{"aps": {"alert": {"title": "hello"}, "mutable-content": 1}}``, so the
  app's notification service extension runs and can rewrite it), else a ``background`` push at priority 5
  (``{"aps": {"content-available": 1}}``);
- ``apns-expiration``: now + 24 h; ``apns-id``: a new UUID per push, kept when the push is sent again here.

The push's ``data`` keys go next to ``aps`` in the JSON payload (at most 4096 bytes, else it is dropped).
Replies: 200 is delivered; 410 (``Unregistered``, ``ExpiredToken``) and 400 ``BadDeviceToken`` or
``DeviceTokenNotForTopic`` prune the token (as does a token that is not hex: it cannot name a device); 429,
5xx, connection failures and a stream without its whole reply by ``Limits.push_request_timeout`` are retried
(that push alone, or the whole batch, with its ``Retry-After``, when every push of it failed so); other
replies (400 ``TopicDisallowed``, other 403s, 413, ...) drop the push and are logged (once per 10 s: they
mean our credentials, topic or clock are wrong). A reply body is read up to ``Limits.push_response_bytes``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import ssl
import time
import uuid
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from trio_dht.limits import DEFAULT as DEFAULT_LIMITS
from trio_dht.limits import Limits
from trio_dht.logs import LogLimit
from trio_dht.push import gateway
from trio_dht.push.gateway import (
    TIMED_OUT,
    USER_AGENT,
    Outcome,
    Reply,
    ReplyTooLarge,
    TemporaryGatewayError,
    parse_retry_after,
)
from trio_dht.push.gorush import IOS_ALERT
from trio_dht.push.http2 import Http2Origin, Request, StreamError, TimedOut, open_http2_origin
from trio_dht.push.payloads import PUSH_TTL, Push, PushKind
from trio_dht.small_files import FileTooLarge, read_small_file

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

PRODUCTION_URL = "https://api.push.apple.com"
SANDBOX_URL = "https://api.sandbox.push.apple.com"
MAX_KEY_FILE_BYTES = 65536
"""The largest ``.p8`` file read (Apple's are about 250 bytes)."""
TOKEN_REFRESH = 50 * 60
"""Seconds a provider token is used before it is signed again (Apple: between 20 and 60 minutes)."""
MAX_PAYLOAD = 4096
"""Largest JSON payload of a (non-VoIP) notification."""
IDLE_CONNECTION = 600.0
"""Seconds an idle connection is kept (one the server closed meanwhile is replaced when next needed)."""
MAX_DEVICE_TOKEN = 200
"""Longest hex device token accepted (Apple's are 64 digits today and may grow)."""
log = logging.getLogger(__name__)
_TOKEN_GONE_400 = frozenset({"BadDeviceToken", "DeviceTokenNotForTopic"})
_HEX = frozenset("0123456789abcdefABCDEF")


class ApnsKeyError(ValueError):
    """The ``.p8`` key, key id or team id cannot be used (the message says why)."""


@dataclass(frozen=True, slots=True)
class ApnsKey:
    """A team's token-signing key: the ``.p8`` P-256 private key, its 10-character key id and the team id."""

    private_key: ec.EllipticCurvePrivateKey
    key_id: str
    team_id: str

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, key_id: str, team_id: str) -> ApnsKey:
        """Read a ``.p8`` file (PEM, unencrypted PKCS#8, as Apple issues them)."""
        try:
            pem = read_small_file(path, MAX_KEY_FILE_BYTES)
        except OSError as exc:
            raise ApnsKeyError(f"cannot read the APNs key file {os.fspath(path)!r}: {exc.strerror}") from None
        except FileTooLarge as exc:  # a .p8 key is about 250 bytes
            raise ApnsKeyError(f"the APNs key file {os.fspath(path)!r} holds {exc}") from None
        return cls.from_pem(pem, key_id=key_id, team_id=team_id, source=repr(os.fspath(path)))

    @classmethod
    def from_pem(cls, pem: bytes, *, key_id: str, team_id: str, source: str = "the APNs key") -> ApnsKey:
        """Parse a ``.p8`` key's PEM text; ``source`` names it in errors."""
        for name, value in (("key id", key_id), ("team id", team_id)):
            if len(value) != 10 or not value.isascii() or not value.isalnum():
                raise ApnsKeyError(f"the APNs {name} must be 10 letters or digits, not {value!r}")
        return cls(load_p8_key(pem, source), key_id, team_id)


def load_p8_key(pem: bytes, source: str = "the APNs key") -> ec.EllipticCurvePrivateKey:
    """The P-256 private key of a ``.p8`` file's PEM text (unencrypted PKCS#8, as Apple issues them);
    :class:`ApnsKeyError` naming ``source`` otherwise."""
    try:  # imported here: the zipapp runs without cryptography on another Python, and needs it only here
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError:
        raise ApnsKeyError("APNs provider tokens need the cryptography package, which is missing") from None
    if b"-----BEGIN PRIVATE KEY-----" not in pem:
        hint = " (it is encrypted)" if b"ENCRYPTED PRIVATE KEY" in pem else ""
        raise ApnsKeyError(f"{source} is not a PEM PKCS#8 private key (a .p8 file){hint}")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ApnsKeyError(f"{source} is not a usable private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ApnsKeyError(f"{source} is not an elliptic-curve key (APNs keys are P-256)")
    if not isinstance(key.curve, ec.SECP256R1):
        raise ApnsKeyError(f"{source} is a {key.curve.name} key; APNs keys are P-256 (secp256r1)")
    return key


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode()


def provider_token(key: ApnsKey, iat: int) -> str:
    """A provider token (ES256 JWT) issued at ``iat`` (Unix seconds)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    head = _b64url(_compact({"alg": "ES256", "kid": key.key_id}))
    claims = _b64url(_compact({"iss": key.team_id, "iat": iat}))
    signing_input = f"{head}.{claims}".encode("ascii")
    r, s = decode_dss_signature(key.private_key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    return f"{head}.{claims}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


class ProviderTokens:
    """The provider token in use: signed once, reused, signed again after ``refresh_after`` seconds of
    ``clock`` (the wall clock: ``iat`` is Unix time), or when Apple calls the one in use expired."""

    def __init__(
        self, key: ApnsKey, *, clock: Callable[[], float] = time.time, refresh_after: float = TOKEN_REFRESH
    ) -> None:
        self._key = key
        self._clock = clock
        self._refresh_after = refresh_after
        self._token = ""
        self._issued = 0.0
        self.signed = 0
        """Tokens signed so far."""

    def current(self) -> str:
        now = self._clock()
        if not self._token or now - self._issued >= self._refresh_after:
            self._sign(now)
        return self._token

    def expired(self, token: str) -> None:
        """Apple refused ``token`` as expired: sign a new one, unless done since ``token`` was handed out."""
        if token == self._token:
            self._sign(self._clock())

    def _sign(self, now: float) -> None:
        self._token = provider_token(self._key, int(now))
        self._issued = now
        self.signed += 1


def is_device_token(token: str) -> bool:
    """Whether ``token`` can be an APNs device token (hex digits), hence be put in a request's path."""
    return 0 < len(token) <= MAX_DEVICE_TOKEN and all(c in _HEX for c in token)


def ios_style(push: Push) -> tuple[dict[str, Any], dict[str, str]]:
    """How OpenDHT's iOS push shows: its ``aps`` and its ``apns-push-type`` and ``apns-priority`` headers (an
    alert at priority 10 for a high-priority or timeout push, else a background push at 5). APNs and FCM's
    ``apns`` block both use it."""
    if push.high_priority or push.kind is PushKind.TIMEOUT:
        return {"alert": dict(IOS_ALERT), "mutable-content": 1}, {
            "apns-push-type": "alert",
            "apns-priority": "10",
        }
    return {"content-available": 1}, {"apns-push-type": "background", "apns-priority": "5"}


def apns_payload(push: Push) -> dict[str, Any]:
    """The notification's JSON: ``aps`` and the push's data keys beside it."""
    aps, _ = ios_style(push)
    return {"aps": aps, **{k: v for k, v in push.data.items() if k != "aps"}}


def apns_headers(push: Push, *, topic: str, now_wall: float) -> dict[str, str]:
    """The ``apns-*`` headers of a push (without ``authorization`` and ``apns-id``)."""
    _, style = ios_style(push)
    return {
        "apns-topic": topic,
        **style,
        "apns-expiration": str(int(now_wall) + PUSH_TTL),
        "content-type": "application/json",
    }


def new_apns_ssl_context(ca_file: str | None = None) -> ssl.SSLContext:
    """TLS for APNs: verified against the system's CAs or ``ca_file``, TLS 1.2 at least (ALPN is set by the
    connection)."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@dataclass(frozen=True, slots=True)
class _Result:
    outcome: Outcome
    why: str = ""
    """What went wrong: for a retry, why; for a push dropped by Apple, its status and reason."""
    retry_after: float | None = None
    reason: str | None = None
    """The error reason the dispatcher counts (:data:`TIMED_OUT`, :data:`OVERSIZED`)."""


class ApnsGateway:
    """Pushes for ``ios`` subscriptions straight to APNs, ``max_batch`` streams at once per lane (``lanes``
    lanes by subscription). Use it as ``async with ApnsGateway(...) as apns:``: it owns its HTTP/2
    connection."""

    name = "apns"

    def __init__(
        self,
        key: ApnsKey,
        *,
        bundle_id: str = "",
        sandbox: bool = False,
        url: str | None = None,
        ca_file: str | None = None,
        lanes: int = 4,
        max_batch: int = 100,
        limits: Limits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``url`` (``https://host[:port]``) replaces Apple's production or (``sandbox``) development host;
        ``ca_file`` (PEM) replaces the system's CAs; ``clock`` is the wall clock (tokens, expirations)."""
        self.url = (url or (SANDBOX_URL if sandbox else PRODUCTION_URL)).rstrip("/")
        """The base URL requests go to."""
        self._bundle_id = bundle_id
        self._lanes = lanes
        self.max_batch = max_batch
        self._timeout = limits.push_request_timeout
        self._max_body = limits.push_response_bytes
        self._clock = clock
        self.tokens = ProviderTokens(key, clock=clock)
        self._ssl_context = new_apns_ssl_context(ca_file)
        self._exit_stack = contextlib.AsyncExitStack()
        self._origin: Http2Origin | None = None
        self._refusals = LogLimit()

    async def __aenter__(self) -> ApnsGateway:
        self._origin = await self._exit_stack.enter_async_context(
            open_http2_origin(
                self.url, ssl_context=self._ssl_context, max_body=self._max_body, idle=IDLE_CONNECTION
            )
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._exit_stack.aclose()

    def lane(self, push: Push) -> Hashable:
        return push.sid % self._lanes

    async def send(self, pushes: Sequence[Push]) -> list[Outcome]:
        now_wall = self._clock()
        timed_out = _Result(Outcome.RETRY, f"no whole reply in {self._timeout:g} s", reason=TIMED_OUT)
        results: list[_Result] = [timed_out] * len(pushes)
        requests: dict[int, Request] = {}
        for i, push in enumerate(pushes):
            request = self._request_of(push, now_wall)
            if isinstance(request, _Result):
                results[i] = request
            else:
                requests[i] = request
        deadline = trio.current_time() + self._timeout
        for attempt in range(2):
            bearer = self.tokens.current()
            authorization = (b"authorization", b"bearer " + bearer.encode("ascii"))
            todo = list(requests)
            answers = await self._request_many(
                [
                    Request(requests[i].path, (authorization, *requests[i].headers), requests[i].body)
                    for i in todo
                ],
                deadline,
            )
            expired = []
            for i, (result, reason) in zip(todo, answers, strict=True):
                results[i] = result
                if reason == "ExpiredProviderToken":
                    expired.append(i)
            if not expired or attempt:
                break
            self.tokens.expired(bearer)
            requests = {i: requests[i] for i in expired}
        for result in results:
            if result.outcome is Outcome.DROPPED and result.why:
                self._say_refused(result.why)
        if results and all(r.outcome is Outcome.RETRY for r in results):
            after = [r.retry_after for r in results if r.retry_after is not None]
            reasons = {r.reason for r in results}
            reason = reasons.pop() if len(reasons) == 1 else None
            raise TemporaryGatewayError(f"APNs: {results[0].why}", max(after, default=None), reason=reason)
        return [r.outcome for r in results]

    def _request_of(self, push: Push, now_wall: float) -> Request | _Result:
        """The request of a push (without ``authorization``), or its result if it cannot be sent."""
        if not is_device_token(push.token):
            return _Result(Outcome.TOKEN_GONE)
        topic = push.topic or self._bundle_id
        body = _compact(apns_payload(push))
        if not topic or len(body) > MAX_PAYLOAD:
            return _Result(Outcome.DROPPED)
        headers = apns_headers(push, topic=topic, now_wall=now_wall)
        headers["apns-id"] = str(uuid.uuid4())
        headers["user-agent"] = USER_AGENT
        return Request(
            f"/3/device/{push.token}".encode("ascii"),
            tuple((name.encode(), value.encode()) for name, value in headers.items()),
            body,
        )

    def _say_refused(self, why: str) -> None:
        """Log a push Apple refused (our request, credentials or clock are wrong), at most once per 10 s."""
        if (line := self._refusals.line(f"APNs refused a push: {why}", trio.current_time())) is not None:
            log.warning("%s", line)

    async def _request_many(self, requests: Sequence[Request], deadline: float) -> list[tuple[_Result, str]]:
        """Send the requests at once: each one's result (by ``deadline`` at the latest) and Apple's
        ``reason``."""
        assert self._origin is not None, "use ApnsGateway as an async context manager"
        replies = await self._origin.request_many(requests, deadline=deadline)
        return [self._result_of(reply) for reply in replies]

    def _result_of(self, reply: Reply | ReplyTooLarge | StreamError) -> tuple[_Result, str]:
        if isinstance(reply, TimedOut):
            return _Result(Outcome.RETRY, str(reply), reason=TIMED_OUT), ""
        if isinstance(reply, StreamError):
            return _Result(Outcome.RETRY, f"no reply: {reply}"), ""
        if isinstance(reply, ReplyTooLarge):
            if reply.status_code == 429 or reply.status_code >= 500:
                return _Result(Outcome.RETRY, f"answered {reply.status_code}", reason=gateway.OVERSIZED), ""
            return _Result(Outcome.DROPPED, f"{reply.status_code} (a reply over {self._max_body} bytes)"), ""
        reason = _reason(reply)
        status = reply.status_code
        if status == 200:
            return _Result(Outcome.DELIVERED), reason
        if status == 410 or (status == 400 and reason in _TOKEN_GONE_400):
            return _Result(Outcome.TOKEN_GONE), reason
        if status == 429 or status >= 500:
            retry_after = parse_retry_after(reply.headers.get("retry-after"), time.time())
            return _Result(Outcome.RETRY, f"answered {status} {reason}", retry_after), reason
        return _Result(Outcome.DROPPED, f"{status} {reason or '(no reason)'}"), reason


def _reason(reply: Reply) -> str:
    """Apple's ``reason`` in an error reply's JSON (empty if none)."""
    if not reply.content:
        return ""
    try:
        reason = reply.json().get("reason", "")
    except (ValueError, AttributeError):
        return ""
    return reason if isinstance(reason, str) else ""
