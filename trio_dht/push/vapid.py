"""VAPID (RFC 8292): the application server's identity on Web Push and UnifiedPush requests.

Each request carries ``Authorization: vapid t=<JWT>, k=<public key>``. The JWT is signed with ES256 (ECDSA
on P-256 with SHA-256, the signature as the 64 bytes ``r || s``) and claims ``aud``, the endpoint's origin
(``scheme://host[:port]``, the port only when not the scheme's default), ``exp``, at most 24 hours ahead,
and ``sub``, a ``mailto:`` or ``https:`` URL where the push service can reach the operator. ``k`` is the
public key as an uncompressed point in URL-safe base64 without padding: the form push services and
UnifiedPush distributors take as the application server key.

A header is signed once per origin and reused until :data:`RENEW_BEFORE` seconds before its ``exp``; the
cache holds at most :data:`MAX_CACHED_ORIGINS` origins (subscribers choose the endpoints), oldest dropped
first. Needs the ``cryptography`` package (without it, the module imports and every key is refused with
:data:`MISSING`).

``trio-dht vapid-keygen PATH`` (:func:`keygen_main`) writes a new key as PKCS#8 PEM (mode 0600) and prints
its public key.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path

try:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
except ImportError as exc:  # the zipapp without its native packages: no key loads, so nothing signs
    MISSING: str | None = f"VAPID needs the cryptography package ({exc})"
else:
    MISSING = None

LIFETIME = 12 * 3600
"""Seconds from signing to a JWT's ``exp`` (RFC 8292 allows at most 24 hours)."""
RENEW_BEFORE = 3600
"""A cached header is signed again once its ``exp`` is this near."""
MAX_CACHED_ORIGINS = 4096
_DEFAULT_PORTS = {"http": 80, "https": 443}
_JWT_HEADER = {"typ": "JWT", "alg": "ES256"}


class VapidKeyError(ValueError):
    """A key that is not a P-256 private key in PEM."""


def b64url(data: bytes) -> str:
    """URL-safe base64 without padding, as JWTs and Web Push carry bytes."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def load_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    """A P-256 private key from PEM (PKCS#8 or SEC 1, unencrypted); raises :class:`VapidKeyError`."""
    if MISSING is not None:
        raise VapidKeyError(MISSING)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise VapidKeyError(f"not an unencrypted PEM private key ({exc})") from None
    except Exception as exc:  # cryptography raises UnsupportedAlgorithm for unknown key types
        raise VapidKeyError(f"not a usable private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise VapidKeyError("not an EC P-256 private key")
    return key


def public_key_b64(key: ec.EllipticCurvePrivateKey) -> str:
    """The public key as an uncompressed point, URL-safe base64 without padding."""
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return b64url(point)


def origin(endpoint: str) -> str:
    """The ``aud`` of a request to ``endpoint``: ``scheme://host[:port]``, lowercase, no default port."""
    parts = urllib.parse.urlsplit(endpoint)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if not host or scheme not in _DEFAULT_PORTS:
        raise ValueError(f"not an http(s) URL: {endpoint!r}")
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    return f"{scheme}://{host}" if port in (None, _DEFAULT_PORTS[scheme]) else f"{scheme}://{host}:{port}"


class Vapid:
    """Signs VAPID ``Authorization`` headers with one key and subject, cached per origin."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        subject: str,
        *,
        lifetime: float = LIFETIME,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < lifetime <= 24 * 3600:
            raise ValueError("a VAPID JWT lives at most 24 hours")
        self._key = key
        self.subject = subject
        self.public_key = public_key_b64(key)
        self._lifetime = lifetime
        self._clock = clock
        self._cache: dict[str, tuple[float, str]] = {}
        """origin -> (exp, header value)."""

    @classmethod
    def from_file(cls, path: Path, subject: str) -> Vapid:
        return cls(load_private_key(path.read_bytes()), subject)

    def header(self, endpoint: str) -> str:
        """The ``Authorization`` value for a request to ``endpoint`` (ValueError if not an http(s) URL)."""
        aud = origin(endpoint)
        now = self._clock()
        cached = self._cache.get(aud)
        if cached is not None and now < cached[0] - RENEW_BEFORE:
            return cached[1]
        exp = int(now + self._lifetime)
        value = f"vapid t={self.token(aud, exp)}, k={self.public_key}"
        self._cache.pop(aud, None)
        if len(self._cache) >= MAX_CACHED_ORIGINS:
            del self._cache[next(iter(self._cache))]
        self._cache[aud] = (exp, value)
        return value

    def token(self, aud: str, exp: int) -> str:
        """A signed JWT claiming ``aud``, ``exp`` and this subject."""
        claims = {"aud": aud, "exp": exp, "sub": self.subject}
        signing_input = f"{_b64json(_JWT_HEADER)}.{_b64json(claims)}".encode("ascii")
        r, s = decode_dss_signature(self._key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"{signing_input.decode('ascii')}.{b64url(signature)}"


def _b64json(obj: dict[str, object]) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode("utf-8"))


def generate_pem() -> bytes:
    """A new P-256 private key as unencrypted PKCS#8 PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def keygen_main(argv: Sequence[str]) -> int:
    """``trio-dht vapid-keygen PATH``: write a new key to PATH (mode 0600, never over a file) and print its
    public key."""
    parser = argparse.ArgumentParser(
        prog="trio-dht vapid-keygen",
        description="Write a new VAPID key (P-256, PKCS#8 PEM, mode 0600) to PATH and print its public key "
        "(URL-safe base64), the application server key that push services and UnifiedPush distributors take.",
    )
    parser.add_argument("path", type=Path, metavar="PATH")
    args = parser.parse_args(argv)
    if MISSING is not None:
        print(f"trio-dht: error: {MISSING}", file=sys.stderr)
        return 1
    pem = generate_pem()
    try:
        fd = os.open(args.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        print(f"trio-dht: error: cannot create {args.path}: {exc.strerror}", file=sys.stderr)
        return 1
    with os.fdopen(fd, "wb") as file:
        file.write(pem)
    print(public_key_b64(load_private_key(pem)))
    return 0
