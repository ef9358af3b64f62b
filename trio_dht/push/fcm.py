"""The FCM gateway: Android pushes straight to Firebase Cloud Messaging's HTTP v1 API, without gorush.

- **Credentials.** The service-account JSON file Google gives (``project_id``, ``client_email``,
  ``private_key``, ``private_key_id``, ``token_uri``), checked whole when loaded
  (:func:`load_service_account`: :class:`FcmCredentialsError` names the file and the field).
- **Access token.** OAuth2's JWT-bearer grant: an RS256-signed assertion (``iss`` = ``client_email``,
  ``scope`` = FCM's, ``aud`` = ``token_uri``, ``iat`` now, ``exp`` an hour later) posted form-encoded to
  ``token_uri``, answered ``{"access_token", "expires_in"}``. The token is kept until 5 minutes before it
  expires; one refresh is in flight at a time. A 401 from FCM renews it once (unless another push already
  did) and sends that push once more.
- **Messages.** One ``POST {fcm_url}/v1/projects/{project_id}/messages:send`` per push; a batch's requests go
  at once, as streams of one write on one HTTP/2 connection (:mod:`trio_dht.push.http2`). The message
  carries what OpenDHT's Android push carries through gorush: ``{"message": {"android": {"priority":
  "high"|"normal", "ttl": "86400s"}, "data": {...}, "token": token}}``, with non-string ``data`` values
  written as JSON text, as gorush does (FCM takes only strings).
- **Replies.** 2xx delivered; ``UNREGISTERED``, or ``INVALID_ARGUMENT`` about the registration token alone,
  prunes the token; 429 and 5xx are temporary (``Retry-After`` honoured); any other reply drops the push.
  A batch whose every request failed temporarily (or timed out, or whose token could not be had) raises
  :class:`~trio_dht.push.gateway.TemporaryGatewayError` with the longest ``Retry-After``, so the lane backs
  off; when some pushes got through, the others are :attr:`~trio_dht.push.gateway.Outcome.RETRY` alone.
- **Bounds.** The whole :meth:`FcmGateway.send` (token, requests, a renewal) ends within
  ``Limits.push_request_timeout``; every reply body (FCM's and the token endpoint's) is read up to
  ``Limits.push_response_bytes``.

Signing needs the ``cryptography`` package (imported when a service account is loaded: elsewhere, as in a
zipapp on another Python, loading one fails with a clear :class:`FcmCredentialsError`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import ssl
import time
import urllib.parse
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import trio

from trio_dht.limits import DEFAULT as DEFAULT_LIMITS
from trio_dht.limits import Limits
from trio_dht.logs import LogLimit
from trio_dht.push import gateway
from trio_dht.push.gateway import (
    TIMED_OUT,
    USER_AGENT,
    USER_AGENT_BYTES,
    GatewayError,
    Outcome,
    PermanentGatewayError,
    Reply,
    ReplyTooLarge,
    TemporaryGatewayError,
    raise_for_transient,
    reply_too_large,
)
from trio_dht.push.http2 import Http2Origin, Request, StreamError, TimedOut, open_http2_origin
from trio_dht.push.payloads import PUSH_TTL, Platform, Push
from trio_dht.small_files import FileTooLarge, read_small_file

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import rsa

log = logging.getLogger(__name__)

FCM_URL = "https://fcm.googleapis.com"
TOKEN_URI = "https://oauth2.googleapis.com/token"
SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME = 3600
"""Seconds an assertion is valid (Google takes at most an hour)."""
TOKEN_MARGIN = 300.0
"""An access token is renewed this long before it expires (at most half its life before)."""
MAX_TOKEN_LIFE = 24 * 3600.0
"""A longer ``expires_in`` (Google's are an hour) is taken as this."""
MAX_CREDENTIALS_BYTES = 64 * 1024
"""The largest service-account file read (Google's are about 2.3 KB)."""
_PROJECT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,99}")
"""A Google Cloud project id (``my-app-1234``, or domain-scoped ``example.com:my-app``), safe in a URL."""
_REQUIRED = ("project_id", "client_email", "private_key", "token_uri")
_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


class FcmCredentialsError(ValueError):
    """A service-account file this module refuses; the message says which and why."""


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    """The parts of a Google service-account key that FCM needs."""

    project_id: str
    client_email: str
    private_key: rsa.RSAPrivateKey
    private_key_id: str
    token_uri: str


def parse_service_account(info: Mapping[str, Any], what: str = "service account") -> ServiceAccount:
    """A :class:`ServiceAccount` from the file's decoded JSON; :class:`FcmCredentialsError` if unusable."""
    if not isinstance(info, Mapping):
        raise FcmCredentialsError(f"{what}: not a JSON object")
    kind = info.get("type", "service_account")
    if kind != "service_account":
        raise FcmCredentialsError(f"{what}: a {kind!r} key, not a service account's ('service_account')")
    for name in (*_REQUIRED, "private_key_id"):
        value = info.get(name, "")
        if not isinstance(value, str) or (name in _REQUIRED and not value.strip()):
            raise FcmCredentialsError(f"{what}: {name!r} is missing or not a non-empty string")
    token_uri = info["token_uri"]
    if urllib.parse.urlsplit(token_uri).scheme not in ("https", "http") or "://" not in token_uri:
        raise FcmCredentialsError(f"{what}: token_uri {token_uri!r} is not an http(s) URL")
    if not _PROJECT_ID.fullmatch(info["project_id"]):
        raise FcmCredentialsError(f"{what}: project_id {info['project_id']!r} is not a project id")
    if "@" not in info["client_email"]:
        raise FcmCredentialsError(f"{what}: client_email {info['client_email']!r} is not an e-mail address")
    try:
        from trio_dht import crypto
    except ImportError:
        raise FcmCredentialsError(f"{what}: FCM needs the cryptography package (RS256 signing)") from None
    try:
        key = crypto.load_private_key(info["private_key"].encode())
    except (crypto.CryptoError, UnicodeError) as exc:
        raise FcmCredentialsError(f"{what}: private_key: {exc}") from None
    return ServiceAccount(
        project_id=info["project_id"],
        client_email=info["client_email"],
        private_key=key,
        private_key_id=info.get("private_key_id", ""),
        token_uri=token_uri,
    )


def load_service_account(path: str | os.PathLike[str]) -> ServiceAccount:
    """The service account in the JSON file at ``path``; :class:`FcmCredentialsError` if unusable."""
    what = f"FCM service-account file {os.fspath(path)!r}"
    try:
        data = read_small_file(path, MAX_CREDENTIALS_BYTES)
    except OSError as exc:
        raise FcmCredentialsError(f"{what}: cannot read it ({exc.strerror or exc})") from None
    except FileTooLarge:
        raise FcmCredentialsError(
            f"{what}: over {MAX_CREDENTIALS_BYTES} bytes, not a service-account key"
        ) from None
    try:
        info = json.loads(data)
    except ValueError as exc:
        raise FcmCredentialsError(f"{what}: not JSON ({exc})") from None
    return parse_service_account(info, what)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwt_assertion(account: ServiceAccount, now_wall: float, *, audience: str | None = None) -> str:
    """The signed JWT (RS256, compact form) that asks ``audience`` (the token URI) for an FCM access token."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    header = {"alg": "RS256", "typ": "JWT"}
    if account.private_key_id:
        header["kid"] = account.private_key_id
    iat = int(now_wall)
    claims = {
        "aud": audience or account.token_uri,
        "exp": iat + ASSERTION_LIFETIME,
        "iat": iat,
        "iss": account.client_email,
        "scope": SCOPE,
    }
    signing_input = (
        _b64url(_encode_json(dict(sorted(header.items()))).encode())
        + "."
        + _b64url(_encode_json(claims).encode())
    )
    signature = account.private_key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + _b64url(signature)


def fcm_message(push: Push) -> dict[str, Any]:
    """The ``messages:send`` body for one push. A push for an iOS subscription (or one without a platform,
    which OpenDHT sends as iOS) also carries an ``apns`` block shown as OpenDHT's iOS push (an alert, or a
    background push), since FCM would send a data-only message to iOS at low priority."""
    data = {k: v if isinstance(v, str) else _encode_json(v) for k, v in sorted(push.data.items())}
    message: dict[str, Any] = {
        "android": {"priority": "high" if push.high_priority else "normal", "ttl": f"{PUSH_TTL}s"},
        "data": data,
        "token": push.token,
    }
    if push.platform in (Platform.IOS, Platform.NONE):
        from trio_dht.push.apns import ios_style

        aps, headers = ios_style(push)
        message["apns"] = {"headers": headers, "payload": {"aps": aps}}
    return {"message": message}


def _error_of(reply: Reply) -> dict[str, Any]:
    """The ``error`` object of a ``google.rpc.Status`` reply, or ``{}``."""
    try:
        error = reply.json().get("error")
    except (ValueError, AttributeError):
        return {}
    return error if isinstance(error, dict) else {}


def error_code(error: Mapping[str, Any]) -> str:
    """The ``FcmError`` detail's ``errorCode``, else the status (``NOT_FOUND``, ...), else ``""``."""
    for detail in error.get("details") or ():
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith(".FcmError"):
            return str(detail.get("errorCode", ""))
    return str(error.get("status", ""))


def _token_refused(error: Mapping[str, Any]) -> bool:
    """Whether an ``INVALID_ARGUMENT`` is about the registration token alone (not our message)."""
    fields = [
        str(violation.get("field", ""))
        for detail in error.get("details") or ()
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith(".BadRequest")
        for violation in detail.get("fieldViolations") or ()
        if isinstance(violation, dict)
    ]
    if fields:
        return all(field == "message.token" for field in fields)
    return "registration token" in str(error.get("message", "")).lower()


def classify_reply(reply: Reply) -> Outcome:
    """What a final (not 401-renewed, not temporary) ``messages:send`` reply means for its push."""
    if 200 <= reply.status_code < 300:
        return Outcome.DELIVERED
    error = _error_of(reply)
    code = error_code(error)
    if code == "UNREGISTERED" or (code == "INVALID_ARGUMENT" and _token_refused(error)):
        return Outcome.TOKEN_GONE
    return Outcome.DROPPED


def new_fcm_client(limits: Limits = DEFAULT_LIMITS, fcm_url: str = FCM_URL) -> httpx.AsyncClient:
    """The client :class:`FcmGateway` asks the token endpoint with (its messages go on its own connection).

    With an ``http://`` ``fcm_url`` (a double on loopback) it speaks HTTP/2 with prior knowledge (h2c), as the
    messages do, since a double may serve both on one port. Like
    :func:`~trio_dht.push.gateway.new_http_client`: no redirects, no environment proxies, bodies never
    decoded.
    """
    return httpx.AsyncClient(
        http1=not fcm_url.lower().startswith("http://"),
        http2=True,
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(limits.push_request_timeout),
        limits=httpx.Limits(
            max_connections=4, max_keepalive_connections=0
        ),  # a token an hour: none kept open
        headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
    )


def _alone(result: Outcome | GatewayError) -> Outcome:
    """A push's outcome when others of its batch got through: a failed request is retried or dropped alone."""
    if isinstance(result, Outcome):
        return result
    return Outcome.RETRY if isinstance(result, TemporaryGatewayError) else Outcome.DROPPED


def _checked(what: str, reply: Reply | ReplyTooLarge | StreamError, now_wall: float) -> Reply | GatewayError:
    """A reply to keep, or the error it is: temporary for a 429, a 5xx or a stream without a reply."""
    if isinstance(reply, StreamError):
        return TemporaryGatewayError(
            f"{what}: {reply}", reason=TIMED_OUT if isinstance(reply, TimedOut) else None
        )
    if isinstance(reply, ReplyTooLarge):
        return reply_too_large(reply, now_wall)
    try:
        raise_for_transient(reply, now_wall)
    except TemporaryGatewayError as exc:
        return exc
    return reply


class FcmGateway:
    """Android pushes through FCM's HTTP v1 API for one Firebase project (see the module docstring). Use it as
    ``async with FcmGateway(...) as fcm:``: it owns its HTTP/2 connection to ``fcm_url``."""

    name = "fcm"

    def __init__(
        self,
        client: httpx.AsyncClient,
        account: ServiceAccount,
        *,
        fcm_url: str = FCM_URL,
        token_uri: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_batch: int = 64,
        lanes: int = 2,
        limits: Limits = DEFAULT_LIMITS,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        """``client`` asks the token endpoint (:func:`new_fcm_client`); ``token_uri`` replaces the account's;
        ``ssl_context`` (for an ``https`` ``fcm_url``) replaces httpx's default (certifi's CAs). ``lanes``
        batches of at most ``max_batch`` may be in flight at once. ``clock`` times the access token's life."""
        self._client = client
        self._account = account
        self._fcm_url = fcm_url.rstrip("/")
        self._ssl_context = ssl_context
        self._send_path = f"/v1/projects/{account.project_id}/messages:send".encode()
        self._token_uri = token_uri or account.token_uri
        self.max_batch = max_batch
        self._lanes = lanes
        self._timeout = limits.push_request_timeout
        self._max_body = limits.push_response_bytes
        self._clock = clock
        self._token: str | None = None
        self._renew_at = -float("inf")
        self._token_lock = trio.Lock()
        self.token_requests = 0
        """Access tokens asked for so far."""
        self._drop_log = LogLimit()
        self._exit_stack = contextlib.AsyncExitStack()
        self._origin: Http2Origin | None = None

    async def __aenter__(self) -> FcmGateway:
        context = self._ssl_context
        if context is None and self._fcm_url.lower().startswith("https://"):
            context = httpx.create_ssl_context()
        self._origin = await self._exit_stack.enter_async_context(
            open_http2_origin(self._fcm_url, ssl_context=context, max_body=self._max_body)
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._exit_stack.aclose()

    def lane(self, push: Push) -> Hashable:
        return push.sid % self._lanes

    async def send(self, pushes: Sequence[Push]) -> list[Outcome]:
        deadline = trio.current_time() + self._timeout
        timed_out = TemporaryGatewayError(f"FCM: no whole reply in {self._timeout:g} s", reason=TIMED_OUT)
        done: list[Outcome | GatewayError] = [timed_out] * len(pushes)
        bearer: str | None = None
        with trio.move_on_at(deadline):
            bearer = await self._bearer()
        if bearer is not None:
            bodies = [_encode_json(fcm_message(push)).encode() for push in pushes]
            replies = await self._post_messages(bodies, bearer, deadline)
            refused = [
                i
                for i, reply in enumerate(replies)
                if isinstance(reply, Reply)
                and reply.status_code == 401
                and error_code(_error_of(reply)) != "THIRD_PARTY_AUTH_ERROR"
            ]
            if refused:
                again: list[Reply | GatewayError] = [timed_out] * len(refused)
                with trio.move_on_at(deadline):
                    try:
                        renewed = await self._renew(bearer)
                    except GatewayError as exc:
                        again = [exc] * len(refused)
                    else:
                        again = await self._post_messages([bodies[i] for i in refused], renewed, deadline)
                for i, reply in zip(refused, again, strict=True):
                    replies[i] = reply
            done = [self._outcome(reply) for reply in replies]
        errors = [r for r in done if isinstance(r, GatewayError)]
        if errors and len(errors) == len(done):
            temporary = [e for e in errors if isinstance(e, TemporaryGatewayError)]
            if not temporary:
                raise errors[0]
            waits = [e.retry_after for e in temporary if e.retry_after is not None]
            raise TemporaryGatewayError(
                str(temporary[0]), max(waits) if waits else None, reason=temporary[0].reason
            )
        return [_alone(r) for r in done]

    def _outcome(self, reply: Reply | GatewayError) -> Outcome | GatewayError:
        """A push's outcome from its final reply, or the error of its request as a whole."""
        if isinstance(reply, GatewayError):
            return reply
        outcome = classify_reply(reply)
        if outcome is Outcome.DROPPED:
            text = f"FCM refused a push: {reply.status_code} {reply.content[:300].decode('utf-8', 'replace')}"
            if (line := self._drop_log.line(text, self._clock())) is not None:
                log.warning("%s", line)
        return outcome

    async def _post_messages(
        self, bodies: Sequence[bytes], bearer: str, deadline: float
    ) -> list[Reply | GatewayError]:
        """One ``messages:send`` per body, all at once on the HTTP/2 connection: each one's reply, or its
        :class:`TemporaryGatewayError` (a 429, a 5xx, no reply by ``deadline``) or oversized reply's
        error."""
        assert self._origin is not None, "use FcmGateway as an async context manager"
        headers = (
            (b"authorization", b"Bearer " + bearer.encode("ascii")),
            (b"content-type", b"application/json"),
            (b"user-agent", USER_AGENT_BYTES),
        )
        requests = [Request(self._send_path, headers, body) for body in bodies]
        now_wall = time.time()
        replies = await self._origin.request_many(requests, deadline=deadline)
        return [_checked("FCM", reply, now_wall) for reply in replies]

    async def _post(
        self, what: str, url: str, body: bytes, headers: dict[str, str], now_wall: float
    ) -> Reply:
        try:
            return await gateway.post(
                self._client, url, content=body, headers=headers, max_bytes=self._max_body
            )
        except httpx.TimeoutException as exc:
            raise TemporaryGatewayError(f"{what} timed out: {exc!r}", reason=TIMED_OUT) from exc
        except httpx.TransportError as exc:
            raise TemporaryGatewayError(f"{what} unreachable: {exc!r}") from exc
        except ReplyTooLarge as exc:
            raise reply_too_large(exc, now_wall) from None

    # -- the access token ----------------------------------------------------------------------------------

    async def _bearer(self) -> str:
        """The access token, asked for if there is none or it is about to expire."""
        if self._token is None or self._clock() >= self._renew_at:
            async with self._token_lock:
                if self._token is None or self._clock() >= self._renew_at:
                    await self._fetch_token()
        assert self._token is not None
        return self._token

    async def _renew(self, refused: str) -> str:
        """A new access token after FCM refused ``refused`` (asked for once, however many pushes saw it)."""
        async with self._token_lock:
            if self._token == refused:
                self._token = None
                await self._fetch_token()
        return await self._bearer()

    async def _fetch_token(self) -> None:
        now_wall = time.time()
        assertion = jwt_assertion(self._account, now_wall, audience=self._token_uri)
        body = urllib.parse.urlencode({"grant_type": GRANT_TYPE, "assertion": assertion}).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        self.token_requests += 1
        reply = await self._post("FCM token endpoint", self._token_uri, body, headers, now_wall)
        raise_for_transient(reply, now_wall)
        if reply.status_code != 200:
            text = reply.content[:300].decode("utf-8", "replace")
            raise PermanentGatewayError(
                f"FCM token endpoint refused the service account: {reply.status_code} {text}"
            )
        try:
            answer = reply.json()
            token, expires_in = answer["access_token"], answer.get("expires_in", ASSERTION_LIFETIME)
        except (ValueError, TypeError, KeyError, AttributeError):
            token, expires_in = None, None
        if (
            not isinstance(token, str)
            or not token
            or not token.isascii()
            or not token.isprintable()
            or type(expires_in) not in (int, float)
            or not expires_in > 0
        ):
            raise PermanentGatewayError("FCM token endpoint: no usable access_token/expires_in in its reply")
        life = min(expires_in, MAX_TOKEN_LIFE)
        self._token = token
        self._renew_at = self._clock() + life - min(TOKEN_MARGIN, life / 2)
