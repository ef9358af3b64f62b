"""Web Push message encryption (RFC 8291), in the ``aes128gcm`` content coding of RFC 8188.

A UnifiedPush subscription may carry the user agent's keys as its topic, ``"<p256dh>|<auth>"`` (each half in
standard or URL-safe base64, padded or not), as OpenDHT's clients send them. :func:`encrypt` seals one message
in a single record, as OpenDHT does: a fresh P-256 key pair and a random salt per message, record size
``max(4096, len(ciphertext))``. :func:`decrypt` is the user agent's side, used by the test double.

The primitives (P-256 ECDH, AES-128-GCM) come from the ``cryptography`` package where it is importable and
from :mod:`trio_dht.purecrypto` otherwise (the zipapp without its native packages): see
:class:`Backend`. Keys are bytes either way.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from trio_dht import purecrypto

KEY_LEN = 65
"""An uncompressed P-256 point."""
AUTH_LEN = 16
SALT_LEN = 16
TAG_LEN = 16
HEADER_LEN = SALT_LEN + 4 + 1 + KEY_LEN
"""salt, record size, key id length, key id (the sender's public key): 86 bytes."""
DEFAULT_RECORD_SIZE = 4096


class WebPushCryptoError(ValueError):
    """Keys or a message that cannot be used (bad base64, not a P-256 point, failed authentication...)."""


def b64decode_any(text: str) -> bytes:
    """Decode standard or URL-safe base64, with or without padding."""
    cleaned = text.strip().replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WebPushCryptoError(f"bad base64: {exc}") from None


def b64url(data: bytes) -> str:
    """URL-safe base64 without padding, as Web Push carries keys."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def parse_topic_keys(topic: str) -> tuple[bytes, bytes] | None:
    """``(p256dh, auth)`` from a ``"<p256dh>|<auth>"`` topic, or None if the topic is not of that form."""
    if topic.count("|") != 1:
        return None
    p256dh_text, auth_text = topic.split("|")
    try:
        p256dh, auth = b64decode_any(p256dh_text), b64decode_any(auth_text)
    except WebPushCryptoError:
        return None
    if len(p256dh) != KEY_LEN or p256dh[0] != 4 or len(auth) != AUTH_LEN:
        return None
    return p256dh, auth


@dataclass(frozen=True)
class Backend:
    """The primitives RFC 8291 needs, from one library; everything else in this module is shared.

    Private keys are 32-byte P-256 scalars and public keys uncompressed points (65 bytes), whatever the
    library. The functions raise ValueError for a bad key or point and when a ciphertext fails authentication.
    """

    name: str
    public_key: Callable[[bytes], bytes]
    """The public point of a private key."""
    ecdh: Callable[[bytes, bytes], bytes]
    """``(private key, peer's public point) -> shared secret`` (the 32-byte x coordinate)."""
    aes128gcm_encrypt: Callable[[bytes, bytes, bytes], bytes]
    """``(key, 12-byte nonce, plaintext) -> ciphertext || 16-byte tag``."""
    aes128gcm_decrypt: Callable[[bytes, bytes, bytes], bytes]
    """``(key, nonce, ciphertext || tag) -> plaintext``."""


PURE_PYTHON = Backend(
    "purecrypto",
    purecrypto.p256_public_key,
    purecrypto.p256_ecdh,
    purecrypto.aes128gcm_encrypt,
    purecrypto.aes128gcm_decrypt,
)


def _cryptography_backend() -> Backend | None:
    try:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    except ImportError:
        return None

    def private_key(raw: bytes) -> ec.EllipticCurvePrivateKey:
        if len(raw) != purecrypto.P256_PRIVATE_LEN:
            raise ValueError("a P-256 private key is a 32-byte scalar")
        return ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())

    def public_key(private: bytes) -> bytes:
        return private_key(private).public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)

    def ecdh(private: bytes, peer_public: bytes) -> bytes:
        if len(peer_public) != purecrypto.P256_POINT_LEN:  # from_encoded_point also takes compressed points
            raise ValueError("not an uncompressed point")
        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), peer_public)
        return private_key(private).exchange(ec.ECDH(), peer)

    def aes128gcm_encrypt(key: bytes, nonce: bytes, plaintext: bytes) -> bytes:
        return AESGCM(key).encrypt(nonce, plaintext, None)

    def aes128gcm_decrypt(key: bytes, nonce: bytes, data: bytes) -> bytes:
        try:
            return AESGCM(key).decrypt(nonce, data, None)
        except InvalidTag:
            raise ValueError("authentication failed") from None

    return Backend("cryptography", public_key, ecdh, aes128gcm_encrypt, aes128gcm_decrypt)


CRYPTOGRAPHY = _cryptography_backend()
"""The ``cryptography`` package's primitives, or None where it is missing."""
backend: Backend = CRYPTOGRAPHY or PURE_PYTHON
"""The primitives in use, chosen once at import: ``cryptography`` (faster) where importable."""


def generate_private_key() -> bytes:
    """A fresh random P-256 private key (its 32-byte scalar)."""
    return purecrypto.p256_generate_private_key()


def public_bytes(private_key: bytes) -> bytes:
    """The uncompressed public point (65 bytes) of a 32-byte P-256 private key."""
    try:
        return backend.public_key(private_key)
    except ValueError as exc:
        raise WebPushCryptoError(f"not a P-256 private key: {exc}") from None


def _content_keys(
    ecdh_secret: bytes, auth: bytes, ua_public: bytes, as_public: bytes, salt: bytes
) -> tuple[bytes, bytes]:
    """The content-encryption key and the base nonce: HKDF of the ECDH secret keyed by the subscription's
    ``auth`` (with both public keys), then HKDF of that keyed by the message's salt (RFC 8291, RFC 8188)."""
    hkdf = purecrypto.hkdf_sha256  # HMAC from the standard library: as fast as cryptography's
    ikm = hkdf(auth, ecdh_secret, b"WebPush: info\x00" + ua_public + as_public, 32)
    cek = hkdf(salt, ikm, b"Content-Encoding: aes128gcm\x00", 16)
    nonce = hkdf(salt, ikm, b"Content-Encoding: nonce\x00", 12)
    return cek, nonce


def _ecdh(private_key: bytes, public: bytes) -> bytes:
    try:
        return backend.ecdh(private_key, public)
    except ValueError as exc:
        raise WebPushCryptoError(f"not a P-256 public key: {exc}") from None


def encrypt(
    plaintext: bytes,
    p256dh: bytes,
    auth: bytes,
    *,
    salt: bytes | None = None,
    sender_key: bytes | None = None,
    record_size: int = DEFAULT_RECORD_SIZE,
) -> bytes:
    """The ``aes128gcm`` body for one message to the user agent whose keys are ``p256dh`` and ``auth``.

    ``salt`` and ``sender_key`` (a 32-byte P-256 private key) are fresh random values unless given (tests
    pass RFC 8291's).
    """
    if len(auth) != AUTH_LEN:
        raise WebPushCryptoError("the auth secret is 16 bytes")
    salt = os.urandom(SALT_LEN) if salt is None else salt
    sender_key = generate_private_key() if sender_key is None else sender_key
    as_public = public_bytes(sender_key)
    cek, nonce = _content_keys(_ecdh(sender_key, p256dh), auth, p256dh, as_public, salt)
    ciphertext = backend.aes128gcm_encrypt(cek, nonce, plaintext + b"\x02")
    rs = max(record_size, len(ciphertext))
    return salt + struct.pack("!IB", rs, KEY_LEN) + as_public + ciphertext


def decrypt(body: bytes, ua_key: bytes, auth: bytes) -> bytes:
    """Decrypt an ``aes128gcm`` body as the user agent holding ``ua_key`` and ``auth`` (any number of
    records)."""
    if len(body) < HEADER_LEN:
        raise WebPushCryptoError("shorter than an aes128gcm header")
    salt = body[:SALT_LEN]
    rs, idlen = struct.unpack("!IB", body[SALT_LEN : SALT_LEN + 5])
    if idlen != KEY_LEN or rs <= TAG_LEN + 1:
        raise WebPushCryptoError("bad aes128gcm header")
    as_public = body[SALT_LEN + 5 : SALT_LEN + 5 + KEY_LEN]
    cek, nonce = _content_keys(_ecdh(ua_key, as_public), auth, public_bytes(ua_key), as_public, salt)
    ciphertext = body[SALT_LEN + 5 + KEY_LEN :]
    records = [ciphertext[i : i + rs] for i in range(0, len(ciphertext), rs)]
    if not records:
        raise WebPushCryptoError("no record")
    out = []
    base = int.from_bytes(nonce, "big")
    for seq, record in enumerate(records):
        try:
            plain = backend.aes128gcm_decrypt(cek, (base ^ seq).to_bytes(12, "big"), record)
        except ValueError:
            raise WebPushCryptoError("authentication failed") from None
        plain = plain.rstrip(b"\x00")
        last = seq == len(records) - 1
        if not plain or plain[-1] != (2 if last else 1):
            raise WebPushCryptoError("bad record delimiter")
        out.append(plain[:-1])
    return b"".join(out)
