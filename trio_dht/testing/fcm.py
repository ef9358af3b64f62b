"""An FCM HTTP v1 double: a real loopback server with Google's OAuth2 token endpoint and ``messages:send``.

Usage::

    async with open_fcm_double() as fcm:
        account = fcm.service_account()                  # a fresh key the double trusts (the JSON dict)
        ... FcmGateway(new_fcm_client(fcm_url=fcm.url), parse_service_account(account), fcm_url=fcm.url) ...
        fcm.unregister("dead-token")                     # its pushes answer 404 UNREGISTERED
        fcm.script(503, headers={"Retry-After": "2"})    # the next messages:send gets this reply
        fcm.expire_tokens()                              # every access token issued so far answers 401
        assert fcm.messages[0]["data"] == {...}

It serves HTTP/2 (h2c, with prior knowledge) and HTTP/1.1 on 127.0.0.1 (:mod:`trio_dht.testing.h2_server`),
and counts the connections and HTTP versions it saw. What it checks, as Google does:

- ``POST /token``: a form with ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`` and an
  ``assertion``: a compact JWT, header ``alg`` RS256 (``kid``, if any, the account's ``private_key_id``),
  signed by a trusted account's key (``iss``), ``scope`` holding FCM's or cloud-platform's, ``aud`` this
  token URI, integer ``iat``/``exp`` with ``exp`` after now and at most an hour after ``iat``, ``iat`` no more
  than 5 minutes ahead. Refusals are ``400 {"error": "invalid_grant"|..., "error_description"}``. A token
  lives ``token_lifetime`` seconds of Trio time.
- ``POST /v1/projects/<project_id>/messages:send``: ``Authorization: Bearer`` a live token (else 401
  ``UNAUTHENTICATED``), this project (else 403 ``PERMISSION_DENIED``), then a body ``{"message": {...}}``
  with exactly one ``token`` (a non-empty string), only known fields, ``data`` of strings only with no
  reserved key (``from``, ``message_type``, ``google.*``, ``gcm.*``) and at most 4096 bytes,
  ``android.priority`` ``normal``/``high``, ``android.ttl`` ``"<seconds>[.<frac>]s"`` of at most 28 days.
  Refusals are 400 ``INVALID_ARGUMENT`` with ``BadRequest`` field violations; accepted messages are recorded
  (:attr:`FcmDouble.messages`) and answered ``{"name": "projects/<p>/messages/<n>"}``.

Scripted behaviour: :meth:`FcmDouble.script` (the next replies of ``messages:send`` or of the token
endpoint), :meth:`FcmDouble.unregister` / :meth:`FcmDouble.invalidate` (a token's pushes answer
``UNREGISTERED`` / ``INVALID_ARGUMENT``), :meth:`FcmDouble.expire_tokens`. :func:`new_service_account`
makes a service-account JSON with a fresh RSA key for one's own tests. Keys and signatures need the
``cryptography`` package (imported when first used).
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import secrets
import time
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from trio_dht.testing.gorush import (
    Receive,
    RecordedRequest,
    Reply,
    Scope,
    Send,
    answer_lifespan,
    read_request,
    send_reply,
)
from trio_dht.testing.h2_server import H2Settings, serve_h2_on_loopback

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import rsa

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
SCOPES = frozenset(
    {"https://www.googleapis.com/auth/firebase.messaging", "https://www.googleapis.com/auth/cloud-platform"}
)
MAX_TTL = 28 * 24 * 3600
MAX_DATA = 4096
_TTL = re.compile(r"\d+(\.\d{1,9})?s")
_MESSAGE_FIELDS = {"name", "data", "notification", "android", "webpush", "apns", "fcm_options", "token",
                   "topic", "condition"}  # fmt: skip
_ANDROID_FIELDS = {"collapse_key", "priority", "ttl", "restricted_package_name", "data", "notification",
                   "fcm_options", "direct_boot_ok"}  # fmt: skip
_FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"


def new_service_account(
    project_id: str = "trio-dht-test",
    *,
    token_uri: str = "https://oauth2.googleapis.com/token",
    client_email: str | None = None,
    key_bits: int = 2048,
) -> dict[str, str]:
    """A service-account key as Google's JSON file has it, with a fresh RSA key (``json.dump`` it to a
    file)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=key_bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    email = client_email or f"push-{secrets.token_hex(4)}@{project_id}.iam.gserviceaccount.com"
    return {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": secrets.token_hex(20),
        "private_key": pem,
        "client_email": email,
        "client_id": str(secrets.randbelow(10**21)),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": f"https://www.googleapis.com/robot/v1/metadata/x509/{email}",
        "universe_domain": "googleapis.com",
    }


def _json_reply(status: int, obj: Any, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(obj, separators=(",", ":")).encode(), headers or {})


def status_reply(
    code: int,
    status: str,
    message: str,
    *,
    error_code: str | None = None,
    fields: dict[str, str] | None = None,
) -> Reply:
    """A ``google.rpc.Status`` error reply as FCM writes it (an ``FcmError`` detail, field violations)."""
    details: list[dict[str, Any]] = []
    if error_code:
        details.append({"@type": _FCM_ERROR, "errorCode": error_code})
    if fields:
        violations = [{"field": f, "description": d} for f, d in fields.items()]
        details.append({"@type": _BAD_REQUEST, "fieldViolations": violations})
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return _json_reply(code, {"error": error})


def _invalid(field: str, description: str) -> Reply:
    return status_reply(
        400, "INVALID_ARGUMENT", description, error_code="INVALID_ARGUMENT", fields={field: description}
    )


def _b64url_decode(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FcmDouble:
    """State and behaviour of one FCM double (see the module docstring)."""

    def __init__(self, *, project_id: str = "trio-dht-test", token_lifetime: int = 3600) -> None:
        self.url = ""
        """The base URL (``fcm_url``); set once serving."""
        self.project_id = project_id
        self.token_lifetime = token_lifetime
        self.requests: list[RecordedRequest] = []
        """Every request received, in order."""
        self.messages: list[dict[str, Any]] = []
        """Every accepted ``message`` object, in order."""
        self.assertions: list[dict[str, Any]] = []
        """The claims of every accepted JWT assertion."""
        self.connections: set[tuple[str, int]] = set()
        """Client addresses seen: one per connection."""
        self.http_versions: set[str] = set()
        self.in_flight = 0
        self.max_in_flight = 0
        """The most requests under way at once."""
        self._accounts: dict[str, tuple[rsa.RSAPublicKey, str]] = {}
        self._tokens: dict[str, float] = {}
        self._unregistered: set[str] = set()
        self._invalid: set[str] = set()
        self._script: dict[str, deque[Reply]] = {"send": deque(), "token": deque()}
        self._names = itertools.count(1)

    @property
    def token_uri(self) -> str:
        return self.url + "/token"

    @property
    def token_requests(self) -> int:
        """Requests the token endpoint received."""
        return sum(1 for r in self.requests if r.path == "/token")

    def service_account(self, **kwargs: Any) -> dict[str, str]:
        """A new service account of this project, trusted by the double, its ``token_uri`` this double's."""
        kwargs.setdefault("token_uri", self.token_uri)
        account = new_service_account(self.project_id, **kwargs)
        self.trust(account)
        return account

    def trust(self, account: dict[str, str]) -> None:
        """Accept assertions signed by this service account's key."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = serialization.load_pem_private_key(account["private_key"].encode(), None)
        assert isinstance(key, rsa.RSAPrivateKey)
        self._accounts[account["client_email"]] = (key.public_key(), account.get("private_key_id", ""))

    def unregister(self, token: str) -> None:
        """Pushes to ``token`` answer 404 ``UNREGISTERED``."""
        self._unregistered.add(token)

    def invalidate(self, token: str) -> None:
        """Pushes to ``token`` answer 400 ``INVALID_ARGUMENT`` "not a valid FCM registration token"."""
        self._invalid.add(token)

    def expire_tokens(self) -> None:
        """Every access token issued so far is refused from now on (401)."""
        self._tokens.clear()

    def script(
        self,
        status: int,
        body: bytes | dict[str, Any] = b"",
        headers: dict[str, str] | None = None,
        times: int = 1,
        *,
        endpoint: str = "send",
        repeat: int = 1,
        byte_interval: float = 0.0,
    ) -> None:
        """The next ``times`` requests to ``endpoint`` (``"send"``: those that pass the bearer check, or
        ``"token"``) get this reply instead of being processed; a dict ``body`` is sent as JSON. ``repeat``
        and ``byte_interval`` make a huge or a trickling reply (see the gorush double's ``Reply``)."""
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        self._script[endpoint].extend([Reply(status, body, headers or {}, repeat, byte_interval)] * times)

    # -- serving -------------------------------------------------------------------------------------------

    async def handle(self, request: RecordedRequest) -> Reply:
        self.requests.append(request)
        if request.method == "POST" and request.path == "/token":
            if self._script["token"]:
                return self._script["token"].popleft()
            return self._token(request)
        match = re.fullmatch(r"/v1/projects/([^/]+)/messages:send", request.path)
        if request.method != "POST" or match is None:
            return status_reply(404, "NOT_FOUND", "Not Found")
        auth = request.headers.get("authorization", "")
        bearer = auth[7:] if auth[:7].lower() == "bearer " else ""
        if self._tokens.get(bearer, -1.0) <= trio.current_time():
            return status_reply(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie"
                " or other valid authentication credential.",
            )
        if match[1] != self.project_id:
            return status_reply(
                403, "PERMISSION_DENIED", f"Permission denied on resource project {match[1]}."
            )
        if self._script["send"]:
            return self._script["send"].popleft()
        return self._send(request)

    def _token(self, request: RecordedRequest) -> Reply:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        def refuse(error: str, description: str) -> Reply:
            return _json_reply(400, {"error": error, "error_description": description})

        if (
            request.headers.get("content-type", "").split(";")[0].strip()
            != "application/x-www-form-urlencoded"
        ):
            return refuse("invalid_request", "Content-Type must be application/x-www-form-urlencoded")
        form = urllib.parse.parse_qs(request.body.decode("latin-1"))
        if form.get("grant_type") != [GRANT_TYPE]:
            return refuse("unsupported_grant_type", "Invalid grant_type")
        assertion = form.get("assertion", [""])
        parts = assertion[0].split(".") if len(assertion) == 1 else []
        try:
            header, claims = (json.loads(_b64url_decode(p)) for p in parts[:2])
            signature = _b64url_decode(parts[2])
        except (ValueError, IndexError, UnicodeError):
            return refuse("invalid_grant", "Invalid JWT: not a compact JWS")
        if len(parts) != 3 or not isinstance(header, dict) or not isinstance(claims, dict):
            return refuse("invalid_grant", "Invalid JWT: not a compact JWS")
        if header.get("alg") != "RS256":
            return refuse("invalid_grant", "Invalid JWT: alg must be RS256")
        issuer = claims.get("iss")
        known = self._accounts.get(issuer) if isinstance(issuer, str) else None
        if known is None:
            return refuse("invalid_grant", "Invalid grant: account not found")
        public_key, key_id = known
        if "kid" in header and header["kid"] != key_id:
            return refuse("invalid_grant", "Invalid JWT Signature.")
        try:
            public_key.verify(
                signature, f"{parts[0]}.{parts[1]}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except InvalidSignature:
            return refuse("invalid_grant", "Invalid JWT Signature.")
        if not SCOPES & set(str(claims.get("scope", "")).split()):
            return refuse("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        if claims.get("aud") != self.token_uri:
            return refuse("invalid_grant", "Invalid JWT: Failed audience check.")
        iat, exp, now = claims.get("iat"), claims.get("exp"), time.time()
        if (
            type(iat) is not int
            or type(exp) is not int
            or not iat < exp <= iat + 3600
            or exp <= now
            or iat > now + 300
        ):
            return refuse(
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
                "Check your iat and exp values in the JWT claim.",
            )
        self.assertions.append(claims)
        token = "ya29.double-" + secrets.token_urlsafe(24)
        self._tokens[token] = trio.current_time() + self.token_lifetime
        return _json_reply(
            200, {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"}
        )

    def _send(self, request: RecordedRequest) -> Reply:
        try:
            body = json.loads(request.body)
        except ValueError:
            return status_reply(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        if not isinstance(body, dict) or not set(body) <= {"message", "validate_only"}:
            return status_reply(400, "INVALID_ARGUMENT", "Invalid JSON payload received. Unknown name.")
        message = body.get("message")
        if not isinstance(message, dict):
            return _invalid("message", "Message is required")
        unknown = set(message) - _MESSAGE_FIELDS
        if unknown:
            return _invalid(f"message.{min(unknown)}", "Unknown name: cannot find field.")
        targets = [t for t in ("token", "topic", "condition") if t in message]
        if targets != ["token"] or not isinstance(message["token"], str) or not message["token"]:
            return _invalid("message", "Exactly one of token, topic or condition must be set (here: token)")
        refused = (
            self._check_data(message.get("data", {}), "message.data")
            or self._check_android(message.get("android", {}))
            or self._check_apns(message.get("apns", {}))
        )
        if refused is not None:
            return refused
        token = message["token"]
        if token in self._unregistered:
            return status_reply(
                404, "NOT_FOUND", "Requested entity was not found.", error_code="UNREGISTERED"
            )
        if token in self._invalid:
            return status_reply(
                400,
                "INVALID_ARGUMENT",
                "The registration token is not a valid FCM registration token",
                error_code="INVALID_ARGUMENT",
            )
        if not body.get("validate_only"):
            self.messages.append(message)
        return _json_reply(200, {"name": f"projects/{self.project_id}/messages/0:{next(self._names)}"})

    @staticmethod
    def _check_data(data: Any, where: str) -> Reply | None:
        if not isinstance(data, dict):
            return _invalid(where, "data must be a map of strings")
        for key, value in data.items():
            if not isinstance(value, str):
                return _invalid(f"{where}[{key}].value", "Invalid value: data values must be strings")
            if key in ("from", "message_type") or key.startswith(("google.", "gcm.")):
                return _invalid(f"{where}[{key}].key", f"Invalid data payload key: {key}")
        if sum(len(k.encode()) + len(v.encode()) for k, v in data.items()) > MAX_DATA:
            return _invalid(where, "Message is too big: data over 4096 bytes")
        return None

    def _check_android(self, android: Any) -> Reply | None:
        if not isinstance(android, dict):
            return _invalid("message.android", "android must be an object")
        unknown = set(android) - _ANDROID_FIELDS
        if unknown:
            return _invalid(f"message.android.{min(unknown)}", "Unknown name: cannot find field.")
        if "priority" in android and android["priority"] not in ("normal", "high", "NORMAL", "HIGH"):
            return _invalid("message.android.priority", f"Invalid value: {android['priority']!r}")
        ttl = android.get("ttl", "0s")
        if not isinstance(ttl, str) or not _TTL.fullmatch(ttl) or float(ttl[:-1]) > MAX_TTL:
            return _invalid("message.android.ttl", f"Invalid value: ttl {ttl!r} (0s to {MAX_TTL}s)")
        return self._check_data(android.get("data", {}), "message.android.data")

    @staticmethod
    def _check_apns(apns: Any) -> Reply | None:
        if not isinstance(apns, dict) or not set(apns) <= {
            "headers",
            "payload",
            "fcm_options",
            "live_activity_token",
        }:
            return _invalid("message.apns", "apns must be an object of headers and payload")
        headers = apns.get("headers", {})
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            return _invalid("message.apns.headers", "headers are a map of strings")
        if headers.get("apns-priority", "10") not in ("5", "10"):
            return _invalid("message.apns.headers", "apns-priority must be 5 or 10")
        payload = apns.get("payload", {})
        if not isinstance(payload, dict) or not isinstance(payload.get("aps", {}), dict):
            return _invalid("message.apns.payload", "the payload is an object with an aps object")
        return None


@asynccontextmanager
async def open_fcm_double(
    *, project_id: str = "trio-dht-test", token_lifetime: int = 3600, max_requests: int = 0
) -> AsyncIterator[FcmDouble]:
    """Run an :class:`FcmDouble` on loopback for the duration of the block; its ``url`` is the FCM base URL,
    its ``token_uri`` the token endpoint. ``max_requests``: requests per HTTP/2 connection before the double
    sends GOAWAY (0: no limit)."""
    double = FcmDouble(project_id=project_id, token_lifetime=token_lifetime)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if await answer_lifespan(scope, receive, send) or scope["type"] != "http":
            return
        double.connections.add(tuple(scope["client"]))
        double.http_versions.add(scope["http_version"])
        double.in_flight += 1
        double.max_in_flight = max(double.max_in_flight, double.in_flight)
        try:
            request = await read_request(scope, receive)
            await trio.sleep(0)  # let the other streams of the connection arrive
            await send_reply(send, await double.handle(request))
        finally:
            double.in_flight -= 1

    async with serve_h2_on_loopback(app, settings=H2Settings(max_requests=max_requests)) as url:
        double.url = url
        yield double
