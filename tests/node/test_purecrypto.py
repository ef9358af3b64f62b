"""trio_dht.purecrypto: known answers (FIPS 197, the GCM spec's test cases, RFC 5869, P-256 multiples, RFC
8291's keys), cross-checks against ``cryptography``, refusal of bad points, keys and signatures, and
signed-value verification with both backends."""

from __future__ import annotations

import secrets
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_dht import crypto, signature
from trio_dht import purecrypto as pc
from trio_dht.limits import Limits
from trio_dht.push import webpush_crypto
from trio_dht.push.webpush_crypto import b64decode_any
from trio_dht.value import Value

# -- AES and GCM ---------------------------------------------------------------------------------------------


def test_aes128_fips197_appendix_c1():
    key = bytes(range(16))
    block = bytes.fromhex("00112233445566778899aabbccddeeff")
    assert pc.aes128_encrypt_block(key, block).hex() == "69c4e0d86a7b0430d8cdb78070b4c55a"


GCM_KEY = "feffe9928665731c6d6a8f9467308308"
GCM_IV = "cafebabefacedbaddecaf888"
GCM_PLAIN = (
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255"
)
GCM_CIPHER = (
    "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
    "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091473f5985"
)


@pytest.mark.parametrize(
    ("key", "iv", "plain", "aad", "cipher", "tag"),
    [  # McGrew & Viega, "The Galois/Counter Mode of Operation", test cases 1 to 4 (AES-128)
        ("00" * 16, "00" * 12, "", "", "", "58e2fccefa7e3061367f1d57a4e7455a"),
        (
            "00" * 16,
            "00" * 12,
            "00" * 16,
            "",
            "0388dace60b6a392f328c2b971b2fe78",
            "ab6e47d42cec13bdf53a67b21257bddf",
        ),
        (GCM_KEY, GCM_IV, GCM_PLAIN, "", GCM_CIPHER, "4d5c2af327cd64a62cf35abd2ba6fab4"),
        (
            GCM_KEY,
            GCM_IV,
            GCM_PLAIN[:120],
            "feedfacedeadbeeffeedfacedeadbeefabaddad2",
            GCM_CIPHER[:120],
            "5bc94fbc3221a5db94fae95ae7121a47",
        ),
    ],
)
def test_gcm_known_answers(key, iv, plain, aad, cipher, tag):
    key, iv, plain, aad = (bytes.fromhex(x) for x in (key, iv, plain, aad))
    sealed = pc.aes128gcm_encrypt(key, iv, plain, aad)
    assert sealed.hex() == cipher + tag
    assert pc.aes128gcm_decrypt(key, iv, sealed, aad) == plain


@settings(max_examples=60, deadline=None)
@given(
    key=st.binary(min_size=16, max_size=16),
    nonce=st.binary(min_size=12, max_size=12),
    plain=st.binary(max_size=300),
    aad=st.binary(max_size=40),
)
def test_gcm_matches_cryptography_and_round_trips(key, nonce, plain, aad):
    sealed = pc.aes128gcm_encrypt(key, nonce, plain, aad)
    assert sealed == AESGCM(key).encrypt(nonce, plain, aad or None)
    assert pc.aes128gcm_decrypt(key, nonce, sealed, aad) == plain


@settings(max_examples=30, deadline=None)
@given(plain=st.binary(max_size=100), flip=st.integers(min_value=0))
def test_gcm_refuses_any_flipped_bit(plain, flip):
    key, nonce, aad = bytes(range(16)), bytes(12), b"header"
    sealed = bytearray(pc.aes128gcm_encrypt(key, nonce, plain, aad))
    where = flip % (len(sealed) * 8)
    sealed[where // 8] ^= 1 << where % 8
    with pytest.raises(pc.InvalidTag):
        pc.aes128gcm_decrypt(key, nonce, bytes(sealed), aad)


def test_gcm_refuses_wrong_aad_short_input_and_bad_sizes():
    key, nonce = bytes(16), bytes(12)
    sealed = pc.aes128gcm_encrypt(key, nonce, b"data", b"a")
    with pytest.raises(pc.InvalidTag):
        pc.aes128gcm_decrypt(key, nonce, sealed, b"b")
    with pytest.raises(pc.InvalidTag):
        pc.aes128gcm_decrypt(key, nonce, sealed[:15])
    with pytest.raises(ValueError):
        pc.aes128gcm_encrypt(bytes(32), nonce, b"")  # AES-128 only
    with pytest.raises(ValueError):
        pc.aes128gcm_encrypt(key, bytes(16), b"")  # 96-bit nonces only


# -- HKDF ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ikm", "salt", "info", "length", "okm"),
    [  # RFC 5869 Appendix A, test cases 1 to 3
        (
            b"\x0b" * 22,
            bytes(range(13)),
            bytes(range(0xF0, 0xFA)),
            42,
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
        ),
        (
            bytes(range(0x50)),
            bytes(range(0x60, 0xB0)),
            bytes(range(0xB0, 0x100)),
            82,
            "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c59045a99cac7827271cb41c65e590e09"
            "da3275600c2f09b8367793a9aca3db71cc30c58179ec3e87c14c01d5c1f3434f1d87",
        ),
        (
            b"\x0b" * 22,
            b"",
            b"",
            42,
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
        ),
    ],
)
def test_hkdf_rfc5869_vectors(ikm, salt, info, length, okm):
    assert pc.hkdf_sha256(salt, ikm, info, length).hex() == okm


@settings(max_examples=40, deadline=None)
@given(
    salt=st.binary(max_size=40),
    ikm=st.binary(max_size=80),
    info=st.binary(max_size=40),
    length=st.integers(1, 200),
)
def test_hkdf_matches_cryptography(salt, ikm, info, length):
    expected = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt or None, info=info).derive(ikm)
    assert pc.hkdf_sha256(salt, ikm, info, length) == expected


# -- P-256 ---------------------------------------------------------------------------------------------------


def raw_public(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def scalar_bytes(k: int) -> bytes:
    return k.to_bytes(32, "big")


def test_p256_known_multiples_of_the_base_point():
    assert pc.p256_public_key(scalar_bytes(1)) == pc.p256_encode_point(pc.G)
    two_g = (
        0x7CF27B188D034F7E8A52380304B51AC3C08969E277F21B35A60B48FC47669978,
        0x07775510DB8ED040293D9AC69F7430DBBA7DADE63CE982299E04B79D227873D1,
    )
    assert pc.p256_public_key(scalar_bytes(2)) == pc.p256_encode_point(two_g)
    assert pc.p256_public_key(scalar_bytes(pc.N - 1)) == pc.p256_encode_point((pc.G[0], pc.P - pc.G[1]))
    # The variable-base path agrees with the table: 2·G and (n-1)·G from G.
    g = pc.p256_encode_point(pc.G)
    assert pc.p256_ecdh(scalar_bytes(2), g) == two_g[0].to_bytes(32, "big")
    assert pc.p256_ecdh(scalar_bytes(pc.N - 1), g) == pc.G[0].to_bytes(32, "big")


def test_p256_rfc8291_keys_and_their_shared_secret():
    as_private = b64decode_any("yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw")
    ua_private = b64decode_any("q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94")
    as_public = pc.p256_public_key(as_private)
    ua_public = pc.p256_public_key(ua_private)
    assert as_public == b64decode_any(
        "BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A8"
    )
    assert ua_public == b64decode_any(
        "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4"
    )
    assert pc.p256_ecdh(as_private, ua_public) == pc.p256_ecdh(ua_private, as_public)


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, pc.N - 1))
def test_p256_public_key_and_ecdh_match_cryptography(k):
    ours = scalar_bytes(k)
    theirs = ec.generate_private_key(ec.SECP256R1())
    assert pc.p256_public_key(ours) == raw_public(ec.derive_private_key(k, ec.SECP256R1()))
    assert pc.p256_ecdh(ours, raw_public(theirs)) == theirs.exchange(
        ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), pc.p256_public_key(ours))
    )


@settings(max_examples=10, deadline=None)
@given(a=st.integers(1, pc.N - 1), b=st.integers(1, pc.N - 1))
def test_p256_ecdh_is_symmetric(a, b):
    a_raw, b_raw = scalar_bytes(a), scalar_bytes(b)
    assert pc.p256_ecdh(a_raw, pc.p256_public_key(b_raw)) == pc.p256_ecdh(b_raw, pc.p256_public_key(a_raw))


def test_p256_generated_keys_are_valid_and_distinct():
    keys = {pc.p256_generate_private_key() for _ in range(5)}
    assert len(keys) == 5
    for key in keys:
        assert len(key) == 32 and 0 < int.from_bytes(key, "big") < pc.N
        assert pc.p256_decode_point(pc.p256_public_key(key))


def off_curve(point: bytes) -> bytes:
    return point[:-1] + bytes([point[-1] ^ 1])


@pytest.mark.parametrize(
    "encoded",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00", id="infinity"),
        pytest.param(b"\x04" + bytes(64), id="(0, 0)"),
        pytest.param(off_curve(pc.p256_encode_point(pc.G)), id="off the curve"),
        pytest.param(b"\x05" + pc.p256_encode_point(pc.G)[1:], id="bad prefix"),
        pytest.param(b"\x02" + pc.G[0].to_bytes(32, "big"), id="compressed"),
        pytest.param(pc.p256_encode_point(pc.G) + b"\x00", id="too long"),
        pytest.param(
            b"\x04" + (pc.G[0] + pc.P).to_bytes(33, "big")[1:] + pc.G[1].to_bytes(32, "big"), id="x>=p"
        ),
        pytest.param(
            b"\x04" + pc.G[0].to_bytes(32, "big") + (pc.G[1] + pc.P).to_bytes(33, "big")[1:], id="y>=p"
        ),
    ],
)
def test_p256_invalid_points_are_refused(encoded):
    with pytest.raises(pc.InvalidPoint):
        pc.p256_decode_point(encoded)
    with pytest.raises(pc.InvalidPoint):
        pc.p256_ecdh(scalar_bytes(7), encoded)


@pytest.mark.parametrize("scalar", [bytes(32), scalar_bytes(pc.N), b"\xff" * 32, b"\x01" * 31, b"\x01" * 33])
def test_p256_private_keys_out_of_range_are_refused(scalar):
    with pytest.raises(ValueError):
        pc.p256_public_key(scalar)
    with pytest.raises(ValueError):
        pc.p256_ecdh(scalar, pc.p256_encode_point(pc.G))


@settings(max_examples=15, deadline=None)
@given(plaintext=st.binary(max_size=3000), auth=st.binary(min_size=16, max_size=16))
def test_webpush_round_trips_with_the_pure_backend_and_across_backends(plaintext, auth):
    ua = pc.p256_generate_private_key()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(webpush_crypto, "backend", webpush_crypto.PURE_PYTHON)
        body = webpush_crypto.encrypt(plaintext, pc.p256_public_key(ua), auth)
        assert webpush_crypto.decrypt(body, ua, auth) == plaintext
    assert webpush_crypto.backend is webpush_crypto.CRYPTOGRAPHY
    assert webpush_crypto.decrypt(body, ua, auth) == plaintext


# -- RSA -----------------------------------------------------------------------------------------------------


def spki_of(key) -> bytes:
    public = key.public_key() if hasattr(key, "public_key") else key
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def rsa_sign(key: rsa.RSAPrivateKey, message: bytes) -> bytes:
    return key.sign(message, padding.PKCS1v15(), hashes.SHA512())


@pytest.fixture(scope="module", params=[(2048, 65537), (4096, 65537)], ids=lambda p: f"{p[0]}-e{p[1]}")
def rsa_key(request: pytest.FixtureRequest) -> rsa.RSAPrivateKey:
    bits, exponent = request.param
    return rsa.generate_private_key(public_exponent=exponent, key_size=bits)


@pytest.fixture(scope="module")
def rsa_2048() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_rsa_spki_gives_the_modulus_and_exponent(rsa_key):
    numbers = rsa_key.public_key().public_numbers()
    assert pc.rsa_public_key_from_spki(spki_of(rsa_key)) == (numbers.n, numbers.e)


def test_rsa_signatures_by_cryptography_verify(rsa_key):
    spki = spki_of(rsa_key)
    for message in (b"", b"a signed value", bytes(range(256)) * 10):
        sig = rsa_sign(rsa_key, message)
        assert pc.rsa_verify_pkcs1v15_sha512(spki, sig, message)
        assert not pc.rsa_verify_pkcs1v15_sha512(spki, sig, message + b"!")
        for i in (0, len(sig) // 2, len(sig) - 1):
            tampered = bytearray(sig)
            tampered[i] ^= 0x40
            assert not pc.rsa_verify_pkcs1v15_sha512(spki, bytes(tampered), message)


def test_rsa_refuses_other_hashes_keys_and_lengths(rsa_2048):
    spki, message = spki_of(rsa_2048), b"message"
    sig = rsa_sign(rsa_2048, message)
    sha256_sig = rsa_2048.sign(message, padding.PKCS1v15(), hashes.SHA256())
    pss_sig = rsa_2048.sign(message, padding.PSS(padding.MGF1(hashes.SHA512()), 32), hashes.SHA512())
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    n = rsa_2048.public_key().public_numbers().n
    for bad in (sha256_sig, pss_sig, b"", b"\x00" + sig, sig[1:], n.to_bytes(256, "big"), bytes(256)):
        assert not pc.rsa_verify_pkcs1v15_sha512(spki, bad, message)
    assert not pc.rsa_verify_pkcs1v15_sha512(spki_of(other), sig, message)


def test_rsa_refuses_non_rsa_and_malformed_keys(rsa_2048):
    spki, message = spki_of(rsa_2048), b"message"
    sig = rsa_sign(rsa_2048, message)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    for bad in (
        spki_of(ec_key),
        spki + b"\x00",
        b"",
        b"\x30\x80" + spki[4:],
        spki_of(ec_key)[:20] + spki[20:],
    ):
        with pytest.raises(ValueError):
            pc.rsa_public_key_from_spki(bad)
        assert not pc.rsa_verify_pkcs1v15_sha512(bad, sig, message)
    for cut in range(len(spki)):  # every truncation, and every single-byte corruption of the header
        assert not pc.rsa_verify_pkcs1v15_sha512(spki[:cut], sig, message)
    for i in range(40):
        corrupt = bytearray(spki)
        corrupt[i] ^= 0x01
        assert not pc.rsa_verify_pkcs1v15_sha512(bytes(corrupt), sig, message)


def test_rsa_refuses_huge_exponents():
    def der(tag: int, content: bytes) -> bytes:
        if len(content) < 0x80:
            return bytes([tag, len(content)]) + content
        length = len(content).to_bytes((len(content).bit_length() + 7) // 8, "big")
        return bytes([tag, 0x80 | len(length)]) + length + content

    def spki(n: int, e: int) -> bytes:
        ints = [der(0x02, (x.to_bytes(x.bit_length() // 8 + 1, "big"))) for x in (n, e)]
        algorithm = der(0x30, der(0x06, bytes.fromhex("2a864886f70d010101")) + b"\x05\x00")
        return der(0x30, algorithm + der(0x03, b"\x00" + der(0x30, b"".join(ints))))

    n = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key().public_numbers().n
    assert spki(n, 65537) == spki_of(rsa.RSAPublicNumbers(65537, n).public_key())
    assert pc.rsa_public_key_from_spki(spki(n, 65537)) == (n, 65537)
    for e in (2**65 + 1, 1, 3, 65536, 65539, n + 2):  # 65537 only
        with pytest.raises(ValueError):
            pc.rsa_public_key_from_spki(spki(n, e))


# -- signed values, with either backend ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cryptography", "purecrypto"])
def test_signed_values_verify_with_both_backends(backend, rsa_2048, monkeypatch: pytest.MonkeyPatch):
    if backend == "purecrypto":
        monkeypatch.setattr(signature, "verify_rsa_sha512", pc.rsa_verify_pkcs1v15_sha512)
    else:  # the dev venv has cryptography
        assert signature.verify_rsa_sha512 is not pc.rsa_verify_pkcs1v15_sha512
    signed = crypto.sign_value(rsa_2048, Value(b"hello", type=3, id=7, seq=2))
    assert signature.verify(signed)
    assert signature.verify(Value.from_wire(signed.to_wire()))
    edited = Value(b"hellO", type=3, id=7, seq=2, owner=signed.owner, signature=signed.signature)
    assert not signature.verify(edited)
    assert not signature.verify(
        Value(b"hello", type=3, id=7, seq=3, owner=signed.owner, signature=signed.signature)
    )
    assert not signature.verify(Value(b"hello", type=3, id=7, seq=2, owner=signed.owner))
    assert not signature.verify(Value(b"hello", type=3, id=7, seq=2))
    ec_owner = spki_of(ec.generate_private_key(ec.SECP256R1()))
    assert not signature.verify(
        Value(b"hello", type=3, id=7, seq=2, owner=ec_owner, signature=signed.signature)
    )
    assert not signature.verify(
        Value(b"hello", type=3, id=7, seq=2, owner=b"junk", signature=signed.signature)
    )


# -- bounds: key size, exponent, and the cache of results ----------------------------------------------------


def _der(tag: int, content: bytes) -> bytes:
    if len(content) < 0x80:
        return bytes([tag, len(content)]) + content
    length = len(content).to_bytes((len(content).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _spki(n: int, e: int) -> bytes:
    ints = [_der(0x02, x.to_bytes(x.bit_length() // 8 + 1, "big")) for x in (n, e)]
    algorithm = _der(0x30, _der(0x06, bytes.fromhex("2a864886f70d010101")) + b"\x05\x00")
    return _der(0x30, algorithm + _der(0x03, b"\x00" + _der(0x30, b"".join(ints))))


@pytest.mark.parametrize("backend", ["cryptography", "purecrypto"])
def test_oversized_or_odd_exponent_keys_are_refused_before_any_arithmetic(
    backend, rsa_2048, monkeypatch: pytest.MonkeyPatch
):
    huge = (1 << 16383) | secrets.randbits(16000) | 1  # a 16,384-bit "modulus"
    n = rsa_2048.public_key().public_numbers().n
    calls = []
    real = signature.backend if backend == "cryptography" else signature.PURE
    counted = real._replace(verify=lambda *args: calls.append(args) or real.verify(*args))
    monkeypatch.setattr(signature, "backend", counted)
    monkeypatch.setattr(pc, "pow", lambda *args: pytest.fail("modular exponentiation"), raising=False)
    verifier = signature.Verifier()
    for owner in (_spki(huge, 65537), _spki(n, 3), _spki(n, (1 << 64) + 1)):
        value = Value(b"x", type=3, id=1, seq=1, owner=owner, signature=b"\x01" * 2048)
        assert not verifier.verify(value)
    assert verifier.refused_keys == 3 and calls == []
    assert not pc.rsa_verify_pkcs1v15_sha512(_spki(huge, 65537), b"\x01" * 2048, b"x")
    small = signature.Verifier(Limits(rsa_max_bits=1024))  # a smaller bound refuses a 2048-bit key
    monkeypatch.undo()
    signed = crypto.sign_value(rsa_2048, Value(b"hello", type=3, id=7, seq=2))
    assert not small.verify(signed) and small.refused_keys == 1
    assert signature.Verifier().verify(signed)


def test_results_are_cached_per_key_and_value_in_a_bounded_lru(rsa_2048, monkeypatch: pytest.MonkeyPatch):
    calls, loads = [], []
    real = signature.backend
    counted = real._replace(
        load=lambda *args: loads.append(1) or real.load(*args),
        verify=lambda *args: calls.append(1) or real.verify(*args),
    )
    monkeypatch.setattr(signature, "backend", counted)
    verifier = signature.Verifier(Limits(verify_cache=2))
    values = [crypto.sign_value(rsa_2048, Value(b"v%d" % i, type=3, id=i + 1, seq=1)) for i in range(3)]
    assert verifier.verify(values[0]) and verifier.verify(Value.from_wire(values[0].to_wire()))
    assert len(calls) == 1 and verifier.cache_hits == 1
    forged = Value(b"v0!", type=3, id=1, seq=1, owner=values[0].owner, signature=values[0].signature)
    assert not verifier.verify(forged) and not verifier.verify(forged)  # a refusal is cached too
    assert len(calls) == 2
    verifier.verify(values[1])
    verifier.verify(values[2])  # evicts values[0]'s entry, the least recently used
    assert verifier.verify(values[0]) and len(calls) == 5
    assert len(loads) == 1  # one owner: its key is loaded once


def test_owner_keys_stay_loaded_in_a_bounded_lru(rsa_2048, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(signature, "KEY_CACHE", 2)
    keys = [rsa_2048, *(rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))]
    loads = []
    real = signature.backend
    monkeypatch.setattr(
        signature, "backend", real._replace(load=lambda *a: loads.append(a[0]) or real.load(*a))
    )
    verifier = signature.Verifier(Limits(verify_cache=1))
    signed = [crypto.sign_value(k, Value(b"v%d" % i, type=3, id=1, seq=1)) for i, k in enumerate(keys)]
    for value in (*signed, signed[2], signed[1]):
        assert verifier.verify(value)
    assert loads == [v.owner for v in signed]  # the last two owners were still loaded
    assert verifier.verify(signed[0]) and len(loads) == 4  # the first was dropped, and is loaded again
    refused = Value(b"x", type=3, id=1, seq=1, owner=b"junk", signature=b"\x01" * 256)
    assert not verifier.verify(refused) and not verifier.verify(replace(refused, data=b"y"))
    assert verifier.refused_keys == 2 and len(verifier._keys) == 2  # a refused owner is not kept
