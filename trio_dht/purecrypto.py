"""Pure-Python cryptography for where the ``cryptography`` package is missing (the zipapp on a Python other
than the one that built it, or with ``TRIO_DHT_NATIVE=0``): exactly the primitives trio_dht needs, on the
standard library only.

* P-256 (secp256r1): private scalars, uncompressed points (validated: coordinates below p, on the curve),
  ECDH (the shared x coordinate); Jacobian coordinates, a precomputed table for the base point.
* HKDF-SHA256 (RFC 5869).
* AES-128 (FIPS 197, table-based) in GCM (NIST SP 800-38D): 96-bit nonces, 16-byte tags.
* RSA PKCS#1 v1.5 signature verification with SHA-512 (RFC 8017 RSASSA-PKCS1-v1_5), the key a DER
  SubjectPublicKeyInfo.

Project Wycheproof's vectors for these four algorithms pass (tests/node/test_wycheproof.py), refusals
included: compressed points, other AES key and nonce sizes, other RSA exponents and a DigestInfo without its
NULL parameters are refused.

Callers prefer ``cryptography`` where it is importable (:mod:`trio_dht.signature`,
:mod:`trio_dht.push.webpush_crypto`). Python integers and table look-ups are not constant-time: these
functions leak timing. That is acceptable for their uses here: RSA verification handles public data only,
and the Web Push sender's P-256 key and AES key are fresh for every message (the user agent's side, which
holds a long-lived key, is used by the test double only).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets


class InvalidPoint(ValueError):
    """Bytes that are not an uncompressed point on P-256."""


class InvalidTag(ValueError):
    """An AES-GCM ciphertext or its associated data failed authentication."""


# -- P-256 -------------------------------------------------------------------------------------------------

P = 2**256 - 2**224 + 2**192 + 2**96 - 1
"""The field prime."""
B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
"""The curve is y² = x³ - 3x + B over GF(P)."""
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
"""The order of the base point (the cofactor is 1)."""
G = (
    0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
    0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5,
)
P256_PRIVATE_LEN = 32
P256_POINT_LEN = 65
"""``04 || x || y``."""

_Jacobian = tuple[int, int, int]
"""``(X, Y, Z)`` for the affine point ``(X/Z², Y/Z³)``; Z = 0 is the point at infinity."""
_INFINITY: _Jacobian = (1, 1, 0)
_WINDOW = 4
_base_table: list[list[tuple[int, int]]] = []
"""Row i holds j·16^i·G for j = 1..15 (affine), built on first use."""


def _double(pt: _Jacobian) -> _Jacobian:
    """2·pt (dbl-2001-b, for a = -3)."""
    x, y, z = pt
    if not z or not y:
        return _INFINITY
    delta = z * z % P
    gamma = y * y % P
    beta = x * gamma % P
    alpha = 3 * (x - delta) * (x + delta) % P
    x3 = (alpha * alpha - 8 * beta) % P
    z3 = ((y + z) ** 2 - gamma - delta) % P
    y3 = (alpha * (4 * beta - x3) - 8 * gamma * gamma) % P
    return x3, y3, z3


def _add(pt: _Jacobian, x2: int, y2: int, z2: int) -> _Jacobian:
    """pt + (x2, y2, z2); pass z2 = 1 for an affine point (then two multiplications fewer)."""
    x1, y1, z1 = pt
    if not z1:
        return x2, y2, z2
    if not z2:
        return pt
    z1z1 = z1 * z1 % P
    if z2 == 1:
        u1, s1 = x1, y1
    else:
        z2z2 = z2 * z2 % P
        u1 = x1 * z2z2 % P
        s1 = y1 * z2 * z2z2 % P
    h = (x2 * z1z1 - u1) % P
    r = (y2 * z1 * z1z1 - s1) % P
    if not h:
        return _double(pt) if not r else _INFINITY
    hh = h * h % P
    hhh = h * hh % P
    v = u1 * hh % P
    x3 = (r * r - hhh - 2 * v) % P
    y3 = (r * (v - x3) - s1 * hhh) % P
    z3 = z1 * h % P if z2 == 1 else z1 * z2 * h % P
    return x3, y3, z3


def _to_affine_many(points: list[_Jacobian]) -> list[tuple[int, int]]:
    """Affine coordinates of finite points, with one inversion for all of them (Montgomery's trick)."""
    prefix = [1]
    for _, _, z in points:
        prefix.append(prefix[-1] * z % P)
    inverse = pow(prefix[-1], -1, P)
    out: list[tuple[int, int]] = [(0, 0)] * len(points)
    for i in range(len(points) - 1, -1, -1):
        x, y, z = points[i]
        zinv = inverse * prefix[i] % P
        inverse = inverse * z % P
        zinv2 = zinv * zinv % P
        out[i] = (x * zinv2 % P, y * zinv2 * zinv % P)
    return out


def _build_base_table() -> None:
    rows: list[_Jacobian] = []
    base: _Jacobian = (*G, 1)
    for _ in range(256 // _WINDOW):
        multiple = base
        rows.append(multiple)
        for _ in range(2**_WINDOW - 2):
            multiple = _add(multiple, *base)
            rows.append(multiple)
        for _ in range(_WINDOW):
            base = _double(base)
    affine = _to_affine_many(rows)
    per_row = 2**_WINDOW - 1
    _base_table[:] = [affine[i : i + per_row] for i in range(0, len(affine), per_row)]


def _base_multiply(k: int) -> _Jacobian:
    """k·G: one mixed addition per non-zero 4-bit digit of k, no doubling."""
    if not _base_table:
        _build_base_table()
    acc = _INFINITY
    for row in _base_table:
        digit = k & 15
        if digit:
            acc = _add(acc, *row[digit - 1], 1)
        k >>= _WINDOW
    return acc


def _multiply(k: int, point: tuple[int, int]) -> _Jacobian:
    """k·point by a width-5 NAF (odd multiples up to 15·point, in affine coordinates)."""
    x, y = point
    twice = _double((x, y, 1))
    odd: list[_Jacobian] = [(x, y, 1)]
    for _ in range(7):
        odd.append(_add(twice, *odd[-1]))
    if any(not z for _, _, z in odd):  # only for points of tiny order, which P-256 does not have
        raise InvalidPoint("point of small order")
    table = _to_affine_many(odd)
    digits = []
    while k:
        if k & 1:
            digit = k & 31
            if digit > 16:
                digit -= 32
            k -= digit
        else:
            digit = 0
        digits.append(digit)
        k >>= 1
    acc = _INFINITY
    for digit in reversed(digits):
        acc = _double(acc)
        if digit > 0:
            acc = _add(acc, *table[digit >> 1], 1)
        elif digit < 0:
            px, py = table[-digit >> 1]
            acc = _add(acc, px, P - py, 1)
    return acc


def _affine(pt: _Jacobian) -> tuple[int, int]:
    if not pt[2]:
        raise InvalidPoint("the point at infinity")
    return _to_affine_many([pt])[0]


def _private_scalar(private: bytes) -> int:
    d = int.from_bytes(private, "big")
    if len(private) != P256_PRIVATE_LEN or not 0 < d < N:
        raise ValueError("a P-256 private key is a 32-byte scalar in [1, n-1]")
    return d


def p256_generate_private_key() -> bytes:
    """A fresh random P-256 private key: its 32-byte big-endian scalar."""
    return (secrets.randbelow(N - 1) + 1).to_bytes(P256_PRIVATE_LEN, "big")


def p256_encode_point(point: tuple[int, int]) -> bytes:
    """The uncompressed encoding ``04 || x || y`` of an affine point."""
    return b"\x04" + point[0].to_bytes(32, "big") + point[1].to_bytes(32, "big")


def p256_decode_point(data: bytes) -> tuple[int, int]:
    """The affine point of an uncompressed encoding; :class:`InvalidPoint` unless it is on P-256."""
    if len(data) != P256_POINT_LEN or data[0] != 4:
        raise InvalidPoint("not an uncompressed point (65 bytes, starting with 04)")
    x, y = int.from_bytes(data[1:33], "big"), int.from_bytes(data[33:], "big")
    if x >= P or y >= P or (y * y - (x * x * x - 3 * x + B)) % P:
        raise InvalidPoint("not a point on P-256")
    return x, y


def p256_public_key(private: bytes) -> bytes:
    """The uncompressed public point of a 32-byte private scalar."""
    return p256_encode_point(_affine(_base_multiply(_private_scalar(private))))


def p256_ecdh(private: bytes, peer_public: bytes) -> bytes:
    """The ECDH shared secret (the 32-byte x coordinate of private·peer); :class:`InvalidPoint` for a bad
    peer point."""
    d = _private_scalar(private)
    return _affine(_multiply(d, p256_decode_point(peer_public)))[0].to_bytes(32, "big")


# -- HKDF ----------------------------------------------------------------------------------------------------


def hkdf_sha256(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF with SHA-256: extract with ``salt``, expand with ``info`` to ``length`` bytes."""
    if not 0 <= length <= 255 * 32:
        raise ValueError("HKDF-SHA256 outputs at most 8160 bytes")
    prk = hmac.digest(salt or bytes(32), ikm, "sha256")
    okm = block = b""
    counter = 1
    while len(okm) < length:
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        okm += block
        counter += 1
    return okm[:length]


# -- AES-128 -------------------------------------------------------------------------------------------------


def _xtime(a: int) -> int:
    a <<= 1
    return a ^ 0x11B if a & 0x100 else a


def _aes_tables() -> tuple[list[int], tuple[list[int], ...]]:
    """The S-box (from inverses in GF(2^8) and the affine map) and the four round T-tables."""
    exp, log = [0] * 255, [0] * 256
    a = 1
    for i in range(255):  # 3 generates the multiplicative group
        exp[i], log[a] = a, i
        a ^= _xtime(a)
    sbox = []
    for x in range(256):
        inv = exp[-log[x] % 255] if x else 0
        s = inv
        for shift in range(1, 5):
            s ^= ((inv << shift) | (inv >> (8 - shift))) & 0xFF
        sbox.append(s ^ 0x63)
    te0 = []
    for s in sbox:
        s2 = _xtime(s)
        te0.append(s2 << 24 | s << 16 | s << 8 | (s2 ^ s))
    rotations = tuple([(t >> r | t << (32 - r)) & 0xFFFFFFFF for t in te0] for r in (8, 16, 24))
    return sbox, (te0, *rotations)


_SBOX, (_TE0, _TE1, _TE2, _TE3) = _aes_tables()
_RCON = (0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x1B, 0x36)


def _aes128_round_keys(key: bytes) -> list[int]:
    """The 44 words of the AES-128 key schedule."""
    if len(key) != 16:
        raise ValueError("AES-128 keys are 16 bytes")
    sbox = _SBOX
    words = [int.from_bytes(key[i : i + 4], "big") for i in range(0, 16, 4)]
    for i in range(4, 44):
        t = words[-1]
        if i % 4 == 0:
            t = (
                sbox[t >> 16 & 255] << 24 | sbox[t >> 8 & 255] << 16 | sbox[t & 255] << 8 | sbox[t >> 24]
            ) ^ _RCON[i // 4 - 1] << 24
        words.append(words[-4] ^ t)
    return words


def _aes128_encrypt_block(rk: list[int], block: int) -> int:
    """One AES-128 block (a 128-bit big-endian integer) through the cipher."""
    te0, te1, te2, te3 = _TE0, _TE1, _TE2, _TE3
    s0 = (block >> 96) ^ rk[0]
    s1 = (block >> 64 & 0xFFFFFFFF) ^ rk[1]
    s2 = (block >> 32 & 0xFFFFFFFF) ^ rk[2]
    s3 = (block & 0xFFFFFFFF) ^ rk[3]
    for r in range(4, 40, 4):
        s0, s1, s2, s3 = (
            te0[s0 >> 24] ^ te1[s1 >> 16 & 255] ^ te2[s2 >> 8 & 255] ^ te3[s3 & 255] ^ rk[r],
            te0[s1 >> 24] ^ te1[s2 >> 16 & 255] ^ te2[s3 >> 8 & 255] ^ te3[s0 & 255] ^ rk[r + 1],
            te0[s2 >> 24] ^ te1[s3 >> 16 & 255] ^ te2[s0 >> 8 & 255] ^ te3[s1 & 255] ^ rk[r + 2],
            te0[s3 >> 24] ^ te1[s0 >> 16 & 255] ^ te2[s1 >> 8 & 255] ^ te3[s2 & 255] ^ rk[r + 3],
        )
    sb = _SBOX
    out = 0
    columns = (s0, s1, s2, s3, s0, s1, s2)
    for i in range(4):  # the last round: SubBytes and ShiftRows, no MixColumns
        a, b, c, d = columns[i : i + 4]
        word = sb[a >> 24] << 24 | sb[b >> 16 & 255] << 16 | sb[c >> 8 & 255] << 8 | sb[d & 255]
        out = out << 32 | (word ^ rk[40 + i])
    return out


def aes128_encrypt_block(key: bytes, block: bytes) -> bytes:
    """AES-128 of one 16-byte block (for known-answer tests; GCM uses the cipher through its counter)."""
    if len(block) != 16:
        raise ValueError("AES blocks are 16 bytes")
    return _aes128_encrypt_block(_aes128_round_keys(key), int.from_bytes(block, "big")).to_bytes(16, "big")


# -- GCM -----------------------------------------------------------------------------------------------------

_BITREV = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))
"""GCM numbers bits from the most significant bit of the first byte; translating every byte through this
table and reading the block little-endian gives an integer whose bit i is the coefficient of x^i."""
_MASK128 = (1 << 128) - 1
GCM_NONCE_LEN = 12
GCM_TAG_LEN = 16
GCM_MAX_DATA = (2**32 - 2) * 16
"""The most plaintext one GCM nonce may encrypt: the 32-bit block counter's 2**32 - 2 blocks."""


def _ghash(h: int, data: bytes) -> bytes:
    """GHASH_H of ``data`` (a multiple of 16 bytes), H being the hash key as a block integer."""
    hpoly = int.from_bytes(h.to_bytes(16, "big").translate(_BITREV), "little")
    products = [0] * 16  # hpoly times each 4-bit polynomial, carry-less
    for k in range(1, 16):
        products[k] = products[k >> 1] << 1 if not k & 1 else products[k - 1] ^ hpoly
    reflected = data.translate(_BITREV)
    y = 0
    for i in range(0, len(reflected), 16):
        x = y ^ int.from_bytes(reflected[i : i + 16], "little")
        acc = 0
        for shift in range(0, 128, 4):
            acc ^= products[x >> shift & 15] << shift
        for _ in range(2):  # x^128 = x^7 + x^2 + x + 1
            hi = acc >> 128
            acc = (acc & _MASK128) ^ hi ^ hi << 1 ^ hi << 2 ^ hi << 7
        y = acc
    return y.to_bytes(16, "little").translate(_BITREV)


def _pad16(data: bytes) -> bytes:
    return data + bytes(-len(data) % 16)


def _gcm(key: bytes, nonce: bytes, data: bytes, aad: bytes, *, decrypt: bool) -> tuple[bytes, bytes]:
    """The CTR transform of ``data`` and the tag over ``aad`` and the ciphertext."""
    if len(nonce) != GCM_NONCE_LEN:
        raise ValueError("GCM nonces are 12 bytes")
    if len(data) > GCM_MAX_DATA:
        raise ValueError("too long for one GCM message")
    rk = _aes128_round_keys(key)
    h = _aes128_encrypt_block(rk, 0)
    j0 = int.from_bytes(nonce, "big") << 32 | 1
    size = len(data)
    blocks = range(j0 + 1, j0 + 1 + -(-size // 16))
    stream = b"".join(_aes128_encrypt_block(rk, counter).to_bytes(16, "big") for counter in blocks)
    out = (int.from_bytes(data, "big") ^ int.from_bytes(stream[:size], "big")).to_bytes(size, "big")
    ciphertext = data if decrypt else out
    lengths = (len(aad) * 8).to_bytes(8, "big") + (len(ciphertext) * 8).to_bytes(8, "big")
    s = _ghash(h, _pad16(aad) + _pad16(ciphertext) + lengths)
    tag = (int.from_bytes(s, "big") ^ _aes128_encrypt_block(rk, j0)).to_bytes(16, "big")
    return out, tag


def aes128gcm_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
    """AES-128-GCM: the ciphertext followed by its 16-byte tag."""
    ciphertext, tag = _gcm(key, nonce, plaintext, aad, decrypt=False)
    return ciphertext + tag


def aes128gcm_decrypt(key: bytes, nonce: bytes, data: bytes, aad: bytes = b"") -> bytes:
    """The plaintext of ``ciphertext || tag``; :class:`InvalidTag` if it fails authentication."""
    if len(data) < GCM_TAG_LEN:
        raise InvalidTag("shorter than a GCM tag")
    plaintext, tag = _gcm(key, nonce, data[:-GCM_TAG_LEN], aad, decrypt=True)
    if not hmac.compare_digest(tag, data[-GCM_TAG_LEN:]):
        raise InvalidTag("GCM authentication failed")
    return plaintext


# -- RSA -----------------------------------------------------------------------------------------------------

_RSA_ENCRYPTION = bytes.fromhex("2a864886f70d010101")
"""The OID 1.2.840.113549.1.1.1, DER content octets."""
_SHA512_DIGEST_INFO = bytes.fromhex("3051300d060960864801650304020305000440")
"""DER of DigestInfo{sha512, NULL} up to the 64 digest bytes: the fixed prefix of every SHA-512 encoded
message, the digest follows it."""
RSA_MAX_MODULUS_BITS = 4096
"""The largest modulus accepted by default (OpenDHT generates 4096-bit keys)."""
RSA_PUBLIC_EXPONENT = 65537
"""The only public exponent accepted (the one OpenDHT, and nearly every RSA key, uses)."""


class _Der:
    """A strict reader of the few DER forms an RSA SubjectPublicKeyInfo holds."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, tag: int) -> bytes:
        """The content octets of the next element, which must have this (single-byte) tag."""
        data, pos = self.data, self.pos
        if pos + 2 > len(data) or data[pos] != tag:
            raise ValueError(f"expected DER tag {tag:#x}")
        length = data[pos + 1]
        pos += 2
        if length & 0x80:
            count = length & 0x7F
            if not 1 <= count <= 4 or pos + count > len(data):
                raise ValueError("bad DER length")
            length = int.from_bytes(data[pos : pos + count], "big")
            if length < 0x80 or data[pos] == 0:
                raise ValueError("non-minimal DER length")
            pos += count
        if pos + length > len(data):
            raise ValueError("truncated DER element")
        self.pos = pos + length
        return data[pos : self.pos]

    def read_positive_integer(self) -> int:
        content = self.read(0x02)
        if not content or content[0] & 0x80:
            raise ValueError("not a positive DER INTEGER")
        if len(content) > 1 and not content[0] and not content[1] & 0x80:
            raise ValueError("not a minimal DER INTEGER")
        return int.from_bytes(content, "big")

    def at_end(self) -> bool:
        return self.pos == len(self.data)


def rsa_public_key_from_spki(spki: bytes, max_bits: int = RSA_MAX_MODULUS_BITS) -> tuple[int, int]:
    """``(modulus, public exponent)`` of a DER SubjectPublicKeyInfo; ValueError unless it is an RSA key
    (rsaEncryption) of at most ``max_bits`` with the exponent :data:`RSA_PUBLIC_EXPONENT`. Checked before
    any arithmetic: a refused key costs a parse."""
    outer = _Der(spki)
    info = _Der(outer.read(0x30))
    if not outer.at_end():
        raise ValueError("trailing bytes after the SubjectPublicKeyInfo")
    algorithm = _Der(info.read(0x30))
    if algorithm.read(0x06) != _RSA_ENCRYPTION:
        raise ValueError("not an rsaEncryption key")
    if not algorithm.at_end() and (algorithm.read(0x05) or not algorithm.at_end()):
        raise ValueError("rsaEncryption parameters must be NULL")
    bits = info.read(0x03)
    if not info.at_end() or not bits or bits[0] != 0:
        raise ValueError("bad subjectPublicKey BIT STRING")
    key_outer = _Der(bits[1:])
    key = _Der(key_outer.read(0x30))
    n, e = key.read_positive_integer(), key.read_positive_integer()
    if not key.at_end() or not key_outer.at_end():
        raise ValueError("trailing bytes in the RSAPublicKey")
    if n.bit_length() > max_bits or not n & 1 or n < 3:
        raise ValueError("bad RSA modulus")
    if e != RSA_PUBLIC_EXPONENT or e >= n:
        raise ValueError("bad RSA public exponent")
    return n, e


def rsa_verify_pkcs1v15_sha512(
    spki: bytes, signature: bytes, message: bytes, max_bits: int = RSA_MAX_MODULUS_BITS
) -> bool:
    """True if ``signature`` is an RSASSA-PKCS1-v1_5 signature with SHA-512 of ``message`` by the RSA key
    ``spki`` (DER SubjectPublicKeyInfo); False for any other key type, a malformed key or a bad signature
    (see :func:`rsa_verify_pkcs1v15_sha512_key`).
    """
    try:
        n, e = rsa_public_key_from_spki(spki, max_bits)
    except ValueError:
        return False
    return rsa_verify_pkcs1v15_sha512_key((n, e), signature, message)


def rsa_verify_pkcs1v15_sha512_key(key: tuple[int, int], signature: bytes, message: bytes) -> bool:
    """:func:`rsa_verify_pkcs1v15_sha512` with the key already parsed to ``(n, e)``. A signature is exactly
    as long as the modulus (as RFC 8017 and OpenSSL have it). The encoded message must be the one DER
    encoding, with the DigestInfo's NULL parameters: the form without them is refused.
    """
    n, e = key
    k = (n.bit_length() + 7) // 8
    s = int.from_bytes(signature, "big")
    digest_info = _SHA512_DIGEST_INFO + hashlib.sha512(message).digest()
    if len(signature) != k or s >= n or k < len(digest_info) + 11:
        return False
    expected = b"\x00\x01" + b"\xff" * (k - len(digest_info) - 3) + b"\x00" + digest_info
    return hmac.compare_digest(pow(s, e, n).to_bytes(k, "big"), expected)
