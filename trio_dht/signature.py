"""Signed values: RSA PKCS#1 v1.5 over SHA-512 of the value's body map, as OpenDHT signs and verifies them.

:func:`verify` uses the ``cryptography`` package where it is importable and
:mod:`trio_dht.purecrypto` otherwise (the zipapp without its native packages); both accept the same keys and
signatures: RSA keys of at most ``Limits.rsa_max_bits`` with the public exponent 65537 (what OpenDHT
generates), any other refused before any modular arithmetic. A node checks through a :class:`Verifier`,
which remembers results per (key, value) in a bounded LRU, so a value sent again (by every storing node, at
every refresh) is verified once. Signing is :mod:`trio_dht.crypto`'s (it needs ``cryptography``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

from trio_dht import purecrypto
from trio_dht.limits import DEFAULT, Limits
from trio_dht.value import Value

LoadKey = Callable[[bytes, int], Any]
"""``(owner SPKI, max_bits) -> key``, a backend's loaded key; ValueError for a key it does not verify with."""
VerifyWithKey = Callable[[Any, bytes, bytes], bool]
"""``(key, signature, message) -> bool``."""


class RsaBackend(NamedTuple):
    """How RSA PKCS#1 v1.5 / SHA-512 signatures are checked: a key is loaded once, then verifies many."""

    name: str
    load: LoadKey
    verify: VerifyWithKey


def _load_pure(spki: bytes, max_bits: int) -> tuple[int, int]:
    return purecrypto.rsa_public_key_from_spki(spki, max_bits)


PURE = RsaBackend("purecrypto", _load_pure, purecrypto.rsa_verify_pkcs1v15_sha512_key)


def _cryptography_backend() -> RsaBackend | None:
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
    except ImportError:
        return None
    pkcs1v15, sha512 = padding.PKCS1v15(), hashes.SHA512()

    def load(spki: bytes, max_bits: int) -> rsa.RSAPublicKey:
        purecrypto.rsa_public_key_from_spki(spki, max_bits)  # size and exponent, before OpenSSL parses it
        key = serialization.load_der_public_key(spki)
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError("not an RSA key")  # OpenDHT verifies RSA only
        return key

    def verify(key: rsa.RSAPublicKey, signature: bytes, message: bytes) -> bool:
        try:
            key.verify(signature, message, pkcs1v15, sha512)
        except InvalidSignature:
            return False
        return True

    return RsaBackend("cryptography", load, verify)


backend: RsaBackend = _cryptography_backend() or PURE
"""cryptography's check (OpenSSL) when importable, else the pure-Python one."""


def verify_rsa_sha512(
    spki: bytes, signature: bytes, message: bytes, max_bits: int = purecrypto.RSA_MAX_MODULUS_BITS
) -> bool:
    """True if ``signature`` is ``spki``'s RSA PKCS#1 v1.5 signature of ``message`` with SHA-512, checked
    by :data:`backend` (the key loaded for this one call)."""
    try:
        key = backend.load(spki, max_bits)
    except ValueError:
        return False
    return backend.verify(key, signature, message)


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


KEY_CACHE = 1024
"""Owner keys a :class:`Verifier` keeps loaded (the least recently used dropped first)."""
_REFUSED = object()


class Verifier:
    """:func:`verify` with ``Limits.rsa_max_bits``, its results kept for ``Limits.verify_cache`` (key, value)
    pairs, the least recently used evicted. The last :data:`KEY_CACHE` owners' keys stay loaded: an owner
    signs many values, and loading a key costs OpenSSL its per-key setup (about 15 us of a 4096-bit
    verify's 110)."""

    def __init__(self, limits: Limits = DEFAULT) -> None:
        self.max_bits = limits.rsa_max_bits
        self.capacity = limits.verify_cache
        self._cache: OrderedDict[bytes, bool] = OrderedDict()
        self._keys: OrderedDict[bytes, Any] = OrderedDict()
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
        key = self._key(owner)
        if key is _REFUSED:
            self.refused_keys += 1
            valid = False
        else:
            valid = backend.verify(key, sig, message)
        cache[entry] = valid
        if len(cache) > self.capacity:
            cache.popitem(last=False)
        return valid

    def _key(self, owner: bytes) -> Any:
        """``owner`` loaded by the backend, or ``_REFUSED`` for a key we do not verify with."""
        keys = self._keys
        key = keys.get(owner)
        if key is not None:
            keys.move_to_end(owner)
            return key
        try:
            key = backend.load(owner, self.max_bits)
        except Exception:  # ValueError, or a key type the backend cannot load: refused, never a crash
            return _REFUSED  # not kept: an owner of any size may be refused, and the parse refuses it cheaply
        keys[owner] = key  # an accepted key's SPKI is at most about 550 bytes
        if len(keys) > KEY_CACHE:
            keys.popitem(last=False)
        return key
