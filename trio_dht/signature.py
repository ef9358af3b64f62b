"""Signed values: RSA PKCS#1 v1.5 over SHA-512 of the value's body map, as OpenDHT signs and verifies them.

Needs the ``cryptography`` package; where it is missing (a bare zipapp run), :func:`verify` refuses every
signed value rather than storing values it cannot check.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from trio_dht.value import Value

log = logging.getLogger("trio_dht.signature")

try:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
except ImportError:  # pragma: no cover - exercised only without the package
    rsa = None  # type: ignore[assignment]


def available() -> bool:
    return rsa is not None


def verify(value: Value) -> bool:
    """True if ``value`` carries a valid RSA-SHA512 signature by its ``owner`` key."""
    if rsa is None or value.owner is None or not value.signature:
        return False
    try:
        key = serialization.load_der_public_key(value.owner)
    except ValueError:
        return False
    if not isinstance(key, rsa.RSAPublicKey):
        return False  # OpenDHT verifies RSA only
    try:
        key.verify(value.signature, value.signed_bytes(), padding.PKCS1v15(), hashes.SHA512())
    except InvalidSignature:
        return False
    return True


def sign(value: Value, private_key: rsa.RSAPrivateKey) -> Value:
    """A copy of ``value`` owned and signed by ``private_key`` (its ``seq`` kept)."""
    owner = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    unsigned = replace(value, owner=owner, signature=b"", _packed=None)
    signature = private_key.sign(unsigned.signed_bytes(), padding.PKCS1v15(), hashes.SHA512())
    return replace(unsigned, signature=signature)
