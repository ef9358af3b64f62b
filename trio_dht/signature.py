"""Signed values: RSA PKCS#1 v1.5 over SHA-512 of the value's body map, as OpenDHT signs and verifies them.

:func:`verify` uses the ``cryptography`` package where it is importable and :mod:`trio_dht.purecrypto`
otherwise (a bare zipapp run); both accept the same keys and signatures. :func:`sign`, for tests and tools,
needs ``cryptography``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from trio_dht import purecrypto
from trio_dht.value import Value

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import rsa


def _cryptography_rsa_verify() -> Callable[[bytes, bytes, bytes], bool] | None:
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
    except ImportError:
        return None

    def verify_rsa_sha512(spki: bytes, signature: bytes, message: bytes) -> bool:
        try:
            key = serialization.load_der_public_key(spki)
        except ValueError:
            return False
        if not isinstance(key, rsa.RSAPublicKey):
            return False  # OpenDHT verifies RSA only
        try:
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA512())
        except InvalidSignature:
            return False
        return True

    return verify_rsa_sha512


verify_rsa_sha512: Callable[[bytes, bytes, bytes], bool] = (
    _cryptography_rsa_verify() or purecrypto.rsa_verify_pkcs1v15_sha512
)
"""``(owner SPKI, signature, message) -> bool``: cryptography's check when importable, else the pure one."""


def verify(value: Value) -> bool:
    """True if ``value`` carries a valid RSA-SHA512 signature by its ``owner`` key."""
    if value.owner is None or not value.signature:
        return False
    return verify_rsa_sha512(value.owner, value.signature, value.signed_bytes())


def sign(value: Value, private_key: rsa.RSAPrivateKey) -> Value:
    """A copy of ``value`` owned and signed by ``private_key`` (its ``seq`` kept).

    For tests and tools: needs the ``cryptography`` package (the node itself never signs).
    """
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    owner = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    unsigned = replace(value, owner=owner, signature=b"", _packed=None)
    signature = private_key.sign(unsigned.signed_bytes(), padding.PKCS1v15(), hashes.SHA512())
    return replace(unsigned, signature=signature)
