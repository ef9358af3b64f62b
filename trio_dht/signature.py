"""Signed values: RSA PKCS#1 v1.5 over SHA-512 of the value's body map, as OpenDHT signs and verifies them.

:func:`verify` uses the ``cryptography`` package where it is importable and :mod:`trio_dht.purecrypto`
otherwise (a bare zipapp run); both accept the same keys and signatures: RSA keys of at most
``Limits.rsa_max_bits`` with the public exponent 65537 (what OpenDHT generates), any other refused before any
modular arithmetic. A node checks through a :class:`Verifier`, which remembers results per (key, value) in a
bounded LRU, so a value sent again (by every storing node, at every refresh) is verified once. Signing is
:mod:`trio_dht.crypto`'s (it needs ``cryptography``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

from trio_dht import purecrypto
from trio_dht.limits import DEFAULT, Limits
from trio_dht.value import Value

RsaVerify = Callable[[bytes, bytes, bytes, int], bool]
"""``(owner SPKI, signature, message, max_bits) -> bool``."""


def _cryptography_rsa_verify() -> RsaVerify | None:
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
    except ImportError:
        return None

    def verify_rsa_sha512(
        spki: bytes, signature: bytes, message: bytes, max_bits: int = purecrypto.RSA_MAX_MODULUS_BITS
    ) -> bool:
        try:
            key = serialization.load_der_public_key(spki)
        except ValueError:
            return False
        if not isinstance(key, rsa.RSAPublicKey):
            return False  # OpenDHT verifies RSA only
        if key.key_size > max_bits or key.public_numbers().e != purecrypto.RSA_PUBLIC_EXPONENT:
            return False
        try:
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA512())
        except InvalidSignature:
            return False
        return True

    return verify_rsa_sha512


verify_rsa_sha512: RsaVerify = _cryptography_rsa_verify() or purecrypto.rsa_verify_pkcs1v15_sha512
"""``(owner SPKI, signature, message, max_bits) -> bool``: cryptography's check when importable, else the
pure one."""


def acceptable_key(owner: bytes, max_bits: int = purecrypto.RSA_MAX_MODULUS_BITS) -> bool:
    """Whether ``owner`` (DER SubjectPublicKeyInfo) is an RSA key we verify with: a parse, no arithmetic."""
    try:
        purecrypto.rsa_public_key_from_spki(owner, max_bits)
    except ValueError:
        return False
    return True


def verify(value: Value, max_bits: int = purecrypto.RSA_MAX_MODULUS_BITS) -> bool:
    """True if ``value`` carries a valid RSA-SHA512 signature by its ``owner`` key (not cached)."""
    if value.owner is None or not value.signature or not acceptable_key(value.owner, max_bits):
        return False
    return verify_rsa_sha512(value.owner, value.signature, value.signed_bytes(), max_bits)


class Verifier:
    """:func:`verify` with ``Limits.rsa_max_bits``, its results kept for ``Limits.verify_cache`` (key, value)
    pairs, the least recently used evicted."""

    def __init__(self, limits: Limits = DEFAULT) -> None:
        self.max_bits = limits.rsa_max_bits
        self.capacity = limits.verify_cache
        self._cache: OrderedDict[bytes, bool] = OrderedDict()
        self.refused_keys = 0
        """Values whose owner key is not one we verify with (too large, another exponent, not RSA)."""
        self.cache_hits = 0

    def verify(self, value: Value) -> bool:
        owner, sig = value.owner, value.signature
        if owner is None or not sig:
            return False
        message = value.signed_bytes()
        digest = hashlib.sha256()  # each part's length first: no two (key, signature, body) hash alike
        for part in (owner, sig, message):
            digest.update(len(part).to_bytes(4, "big"))
            digest.update(part)
        entry = digest.digest()
        cache = self._cache
        known = cache.get(entry)
        if known is not None:
            cache.move_to_end(entry)
            self.cache_hits += 1
            return known
        if acceptable_key(owner, self.max_bits):
            valid = verify_rsa_sha512(owner, sig, message, self.max_bits)
        else:
            self.refused_keys += 1
            valid = False
        cache[entry] = valid
        if len(cache) > self.capacity:
            cache.popitem(last=False)
        return valid

