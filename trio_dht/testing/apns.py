"""An APNs double: a real loopback HTTP/2-over-TLS server that checks requests as strictly as Apple does.

Usage::

    key = generate_test_key()                             # a .p8 key, key id and team id of a test team
    async with open_apns_double(keys=[key], bundle_ids=["com.example.app"]) as apns:
        gateway = ApnsGateway(key.apns_key(), bundle_id="com.example.app", url=apns.url, ca_file=apns.ca_file)
        apns.fail_token(token, "Unregistered")            # 410 for this device token
        apns.script(503, "ServiceUnavailable", times=2)   # the next two valid requests get this reply
        apns.expire_provider_tokens()                     # tokens used so far: 403 ExpiredProviderToken
        ...
        assert apns.notifications[0].payload["aps"] == {"content-available": 1}

It needs the ``cryptography`` package (imported when used). At start it makes a throwaway CA and a server
certificate for ``127.0.0.1`` and ``localhost`` (``ca_file`` is the CA's PEM, for the client's ``verify``);
it offers only ``h2`` by ALPN (:mod:`trio_dht.testing.h2_server`) and answers any HTTP/1.1 request with
505. Per request, in this order (Apple's replies: status and ``{"reason": ...}``):

- ``POST /3/device/<64 hex digits>``: else 405 ``MethodNotAllowed``, 404 ``BadPath``, 400 ``BadDeviceToken``;
  a repeated header is 400 ``DuplicateHeaders``;
- ``authorization: bearer <JWT>``: missing is 403 ``MissingProviderToken``; header ``alg`` ES256 and a ``kid``
  of a configured key, claims ``iss`` (that key's team) and an integer ``iat``, a valid raw ``r || s``
  signature, else 403 ``InvalidProviderToken`` (a connection's last verified token is not verified again:
  the same bytes verify the same way); ``iat`` over an hour old (by ``clock``) or a token made
  expired is 403 ``ExpiredProviderToken``; a new token on a connection whose token is under 20 minutes old
  (and not expired) is 429 ``TooManyProviderTokenUpdates``;
- ``apns-topic`` present (400 ``MissingTopic``) and one of ``bundle_ids`` (400 ``TopicDisallowed``);
  ``apns-push-type`` known (400 ``InvalidPushType``), ``apns-priority`` 1, 5 or 10 (400 ``BadPriority``),
  ``apns-expiration`` decimal (400 ``BadExpirationDate``), ``apns-id`` a canonical UUID (400
  ``BadMessageId``);
- the payload: not empty (400 ``PayloadEmpty``), at most 4096 bytes (413 ``PayloadTooLarge``), a JSON object
  with an ``aps`` object (else 400 ``BadPayload``, the double's name: Apple documents none); a ``background``
  push has priority 5 (400 ``BadPriority``) and ``"content-available": 1`` without ``alert``, ``sound`` or
  ``badge``, an ``alert`` push has an ``alert`` (else 400 ``InvalidPushType``);
- then a scripted reply if one is queued (it replaces the double's own: a scripted 200 records no
  notification), then a failing token's reply (410 with ``timestamp`` for
  ``Unregistered`` and ``ExpiredToken``), else 200. Every reply carries ``apns-id`` (the request's, or a new
  one).

Every request is recorded (``requests``), every accepted one also as an :class:`ApnsNotification`;
``connections`` counts the TLS connections served.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import ipaddress
import json
import re
import secrets
import string
import tempfile
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Config

from trio_dht.push.apns import ApnsKey
from trio_dht.testing.gorush import (
    Receive,
    RecordedRequest,
    Scope,
    Send,
    answer_lifespan,
    read_request,
)
from trio_dht.testing.h2_server import H2Settings, serve_h2_on_loopback

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

PUSH_TYPES = frozenset(
    {"alert", "background", "voip", "location", "complication", "fileprovider", "mdm", "liveactivity",
     "pushtotalk", "widgets", "controls"}
)  # fmt: skip
TOKEN_LIFETIME = 3600
"""Seconds after its ``iat`` that Apple refuses a provider token."""
TOKEN_UPDATE_INTERVAL = 20 * 60
"""A connection's provider token may change at most this often."""
MAX_PAYLOAD = 4096
_DEVICE_TOKEN = re.compile(r"[0-9a-fA-F]{64}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_STATUS_OF_REASON = {
    "Unregistered": 410,
    "ExpiredToken": 410,
    "TooManyRequests": 429,
    "InternalServerError": 500,
    "ServiceUnavailable": 503,
    "Shutdown": 503,
}


# -- test credentials ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApnsTestKey:
    """A test team's token-signing key, as Apple would issue it: a ``.p8`` PEM, its key id and the team id."""

    pem: bytes
    key_id: str
    team_id: str

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.apns_key().private_key.public_key()

    def apns_key(self) -> ApnsKey:
        return ApnsKey.from_pem(self.pem, key_id=self.key_id, team_id=self.team_id)

    def write(self, directory: str | Path) -> Path:
        """Write the key as ``AuthKey_<key id>.p8`` (Apple's file name) in ``directory``; its path."""
        path = Path(directory) / f"AuthKey_{self.key_id}.p8"
        path.write_bytes(self.pem)
        return path


def _apple_id() -> str:
    return "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(10))


def generate_test_key(*, team_id: str | None = None) -> ApnsTestKey:
    """A new P-256 ``.p8`` key with a random key id, for a random team (or ``team_id``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ApnsTestKey(pem, _apple_id(), team_id or _apple_id())


def _make_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost: (CA PEM, cert PEM, key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trio-dht APNs double CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


# -- the double ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApnsNotification:
    """A notification the double accepted."""

    device_token: str
    headers: dict[str, str]
    payload: dict[str, Any]
    connection: tuple[str, int]
    """The client's address and port: one per connection."""


@dataclass(frozen=True, slots=True)
class ScriptedReply:
    status: int
    reason: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    """Seconds to wait before answering (``math.inf``: never)."""


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class ApnsDouble:
    """State and behaviour of one APNs double (see the module docstring)."""

    def __init__(
        self,
        keys: Iterable[ApnsTestKey],
        bundle_ids: Iterable[str],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = ""
        self.ca_file = ""
        self._keys = {k.key_id: (k.team_id, k.public_key) for k in keys}
        self.bundle_ids = set(bundle_ids)
        self._clock = clock
        self.requests: list[RecordedRequest] = []
        self.notifications: list[ApnsNotification] = []
        self.replies: list[tuple[int, str]] = []
        """Every reply's status and reason, in order."""
        self.connections: set[tuple[str, int]] = set()
        """The connections that sent requests (client address and port)."""
        self.failures: dict[str, str] = {}
        self._script: deque[ScriptedReply] = deque()
        self._expired: set[str] = set()
        self._seen: set[str] = set()
        self._connection_token: dict[tuple[str, int], tuple[str, float]] = {}
        self._verified: dict[tuple[str, int], tuple[str, int]] = {}
        """Per connection, the last provider token whose signature verified, and its ``iat``."""

    def fail_token(self, device_token: str, reason: str) -> None:
        """Pushes to ``device_token`` get this reason (``Unregistered``: 410, ``BadDeviceToken``: 400)."""
        self.failures[device_token] = reason

    def script(
        self,
        status: int,
        reason: str = "",
        *,
        headers: dict[str, str] | None = None,
        times: int = 1,
        delay: float = 0.0,
    ) -> None:
        """The next ``times`` valid requests get this reply (after ``delay`` seconds)."""
        self._script.extend([ScriptedReply(status, reason, headers or {}, delay)] * times)

    def expire_provider_tokens(self) -> None:
        """Every provider token used so far is refused from now on as ``ExpiredProviderToken``."""
        self._expired |= self._seen

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if await answer_lifespan(scope, receive, send) or scope["type"] != "http":
            return
        request = await read_request(scope, receive)
        names = [name.decode("latin-1").lower() for name, _ in scope["headers"]]  # to refuse duplicates
        headers = request.headers
        self.requests.append(request)
        apns_id = headers.get("apns-id") or str(uuid.uuid4())
        reply_headers = {"apns-id": apns_id}
        if scope["http_version"] != "2":
            status, reason = 505, "HTTP2Required"
        else:
            connection = tuple(scope["client"])
            self.connections.add(connection)
            try:
                status, reason, extra, delay = self._handle(request, names, connection)
            except _Refused as refused:
                status, reason, extra, delay = refused.status, refused.reason, {}, 0.0
            reply_headers |= extra
            if delay:
                await trio.sleep(delay)
        self.replies.append((status, reason))
        body = b""
        if reason:
            error: dict[str, Any] = {"reason": reason}
            if status == 410:
                error["timestamp"] = int(self._clock() * 1000)
            body = json.dumps(error).encode()
            reply_headers["content-type"] = "application/json"
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in reply_headers.items()],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _handle(
        self, request: RecordedRequest, names: list[str], connection: tuple[str, int]
    ) -> tuple[int, str, dict[str, str], float]:
        if len(set(names)) != len(names):
            raise _Refused(400, "DuplicateHeaders")
        if request.method != "POST":
            raise _Refused(405, "MethodNotAllowed")
        prefix, _, device_token = request.path.partition("/3/device/")
        if prefix or not device_token:
            raise _Refused(404, "BadPath")
        headers = request.headers
        self._check_provider_token(headers.get("authorization", ""), connection)
        topic = headers.get("apns-topic")
        if not topic:
            raise _Refused(400, "MissingTopic")
        if topic not in self.bundle_ids:
            raise _Refused(400, "TopicDisallowed")
        if not _DEVICE_TOKEN.fullmatch(device_token):
            raise _Refused(400, "BadDeviceToken")
        push_type = headers.get("apns-push-type", "alert")
        if push_type not in PUSH_TYPES:
            raise _Refused(400, "InvalidPushType")
        priority = headers.get("apns-priority", "10")
        if priority not in ("1", "5", "10"):
            raise _Refused(400, "BadPriority")
        expiration = headers.get("apns-expiration", "0")
        if not (expiration.isascii() and expiration.isdecimal()):
            raise _Refused(400, "BadExpirationDate")
        if "apns-id" in headers and not _UUID.fullmatch(headers["apns-id"]):
            raise _Refused(400, "BadMessageId")
        payload = self._check_payload(request.body, push_type, priority)
        if self._script:
            scripted = self._script.popleft()
            return scripted.status, scripted.reason, scripted.headers, scripted.delay
        if device_token in self.failures:
            reason = self.failures[device_token]
            return _STATUS_OF_REASON.get(reason, 400), reason, {}, 0.0
        self.notifications.append(ApnsNotification(device_token, dict(headers), payload, connection))
        return 200, "", {}, 0.0

    def _check_provider_token(self, authorization: str, connection: tuple[str, int]) -> None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise _Refused(403, "MissingProviderToken")
        verified = self._verified.get(connection)
        if verified is not None and verified[0] == token:  # the same bytes verify the same way
            iat = verified[1]
        else:
            iat = self._verify_provider_token(token)
            self._verified[connection] = (token, iat)
        now = self._clock()
        if token in self._expired or now - iat > TOKEN_LIFETIME:
            raise _Refused(403, "ExpiredProviderToken")
        previous = self._connection_token.get(connection)
        if previous is not None and previous[0] != token:
            old, since = previous
            if old not in self._expired and now - since < TOKEN_UPDATE_INTERVAL:
                raise _Refused(429, "TooManyProviderTokenUpdates")
        if previous is None or previous[0] != token:
            self._connection_token[connection] = (token, now)
        self._seen.add(token)

    def _verify_provider_token(self, token: str) -> int:
        """The ``iat`` of a provider token with a valid header, claims and signature; else 403
        ``InvalidProviderToken``."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

        try:
            head_b64, claims_b64, signature_b64 = token.split(".")
            head = json.loads(_b64url_decode(head_b64))
            claims = json.loads(_b64url_decode(claims_b64))
            signature = _b64url_decode(signature_b64)
            team_id, public_key = self._keys[head["kid"]]
            if (
                head.get("alg") != "ES256"
                or claims.get("iss") != team_id
                or type(claims.get("iat")) is not int
            ):
                raise ValueError("bad header or claims")
            if len(signature) != 64:
                raise ValueError("not a raw r || s signature")
            der = encode_dss_signature(int.from_bytes(signature[:32]), int.from_bytes(signature[32:]))
            public_key.verify(der, f"{head_b64}.{claims_b64}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error, InvalidSignature):
            raise _Refused(403, "InvalidProviderToken") from None
        return claims["iat"]

    @staticmethod
    def _check_payload(body: bytes, push_type: str, priority: str) -> dict[str, Any]:
        if not body:
            raise _Refused(400, "PayloadEmpty")
        if len(body) > MAX_PAYLOAD:
            raise _Refused(413, "PayloadTooLarge")
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if not isinstance(payload, dict) or not isinstance(payload.get("aps"), dict):
            raise _Refused(400, "BadPayload")
        aps = payload["aps"]
        if push_type == "background":
            if priority != "5":
                raise _Refused(400, "BadPriority")
            if aps.get("content-available") != 1 or {"alert", "sound", "badge"} & aps.keys():
                raise _Refused(400, "InvalidPushType")
        elif push_type == "alert" and not aps.get("alert"):
            raise _Refused(400, "InvalidPushType")
        return payload


@asynccontextmanager
async def open_apns_double(
    *,
    keys: Iterable[ApnsTestKey],
    bundle_ids: Iterable[str],
    clock: Callable[[], float] = time.time,
    max_requests: int = 0,
) -> AsyncIterator[ApnsDouble]:
    """Run an :class:`ApnsDouble` on 127.0.0.1 (a free port) for the duration of the block: its ``url`` is
    ``https://127.0.0.1:P``, its ``ca_file`` the PEM of the CA that signed its certificate. ``keys`` are the
    teams' keys it accepts, ``bundle_ids`` the topics; ``clock`` (wall time) judges provider tokens' age;
    ``max_requests``: requests per connection before the double sends GOAWAY (0: no limit)."""
    double = ApnsDouble(keys, bundle_ids, clock=clock)
    with tempfile.TemporaryDirectory(prefix="apns-double-") as directory:
        ca_file, certfile, keyfile = _make_tls(Path(directory))
        config = Config()
        config.certfile = str(certfile)
        config.keyfile = str(keyfile)
        config.alpn_protocols = ["h2"]
        config.keep_alive_timeout = 3600
        settings = H2Settings(idle_timeout=3600, max_requests=max_requests)
        ssl_context = config.create_ssl_context()
        async with serve_h2_on_loopback(
            double.app, ssl_context=ssl_context, settings=settings, config=config
        ) as url:
            double.url = url
            double.ca_file = str(ca_file)
            yield double
