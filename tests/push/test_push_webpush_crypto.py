"""RFC 8291 Web Push encryption: the RFC's test vector, round trips, and topic key parsing; every test with
both backends (``cryptography`` and the pure-Python one the zipapp uses)."""

import base64

import pytest

from trio_dht.push import webpush_crypto as wc


@pytest.fixture(autouse=True, params=["cryptography", "purecrypto"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> wc.Backend:
    """Each test once with each backend (the module picks one at import)."""
    chosen = {"cryptography": wc.CRYPTOGRAPHY, "purecrypto": wc.PURE_PYTHON}[request.param]
    assert chosen is not None, "the dev venv has cryptography"
    monkeypatch.setattr(wc, "backend", chosen)
    return chosen


def b64(text: str) -> bytes:
    return wc.b64decode_any(text)


# RFC 8291 Appendix A.
PLAINTEXT = b"When I grow up, I want to be a watermelon"
AS_PRIVATE = "yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw"
AS_PUBLIC = "BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A8"
UA_PRIVATE = "q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94"
UA_PUBLIC = "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4"
SALT = "DGv6ra1nlYgDCS1FRnbzlw"
AUTH = "BTBZMqHH6r4Tts7J_aSIgg"
BODY = (
    "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl"
    "7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN"
)


def test_rfc8291_vector_encrypts_to_the_published_body():
    sender = b64(AS_PRIVATE)
    assert wc.public_bytes(sender) == b64(AS_PUBLIC)
    body = wc.encrypt(PLAINTEXT, b64(UA_PUBLIC), b64(AUTH), salt=b64(SALT), sender_key=sender)
    assert body == b64(BODY)


def test_rfc8291_vector_decrypts():
    ua = b64(UA_PRIVATE)
    assert wc.public_bytes(ua) == b64(UA_PUBLIC)
    assert wc.decrypt(b64(BODY), ua, b64(AUTH)) == PLAINTEXT


def test_round_trip_with_fresh_keys_and_the_header_layout():
    ua = wc.generate_private_key()
    auth = bytes(range(16))
    body = wc.encrypt(b'{"key":"x"}', wc.public_bytes(ua), auth)
    assert int.from_bytes(body[16:20], "big") == 4096
    assert body[20] == 65
    assert len(body) == wc.HEADER_LEN + len(b'{"key":"x"}') + 1 + wc.TAG_LEN
    assert wc.decrypt(body, ua, auth) == b'{"key":"x"}'
    # Each message has its own salt and sender key.
    assert (
        wc.encrypt(b"a", wc.public_bytes(ua), auth)[:16] != wc.encrypt(b"a", wc.public_bytes(ua), auth)[:16]
    )


def test_tampering_and_wrong_keys_are_refused():
    ua = wc.generate_private_key()
    auth = bytes(16)
    body = bytearray(wc.encrypt(b"hello", wc.public_bytes(ua), auth))
    body[-1] ^= 1
    with pytest.raises(wc.WebPushCryptoError):
        wc.decrypt(bytes(body), ua, auth)
    with pytest.raises(wc.WebPushCryptoError):
        wc.decrypt(b"short", ua, auth)
    with pytest.raises(wc.WebPushCryptoError):
        wc.encrypt(b"x", b"\x04" + bytes(64), auth)


def test_topic_keys_accept_both_base64_alphabets_padded_or_not():
    p256dh, auth = b64(UA_PUBLIC), b64(AUTH)
    std = base64.b64encode(p256dh).decode() + "|" + base64.b64encode(auth).decode()
    url = base64.urlsafe_b64encode(p256dh).decode().rstrip("=") + "|" + wc.b64url(auth)
    assert wc.parse_topic_keys(std) == (p256dh, auth)
    assert wc.parse_topic_keys(url) == (p256dh, auth)
    assert wc.parse_topic_keys("com.example.app") is None
    assert wc.parse_topic_keys("a|b|c") is None
    assert wc.parse_topic_keys(wc.b64url(auth) + "|" + wc.b64url(auth)) is None
    assert wc.parse_topic_keys("!!!|???") is None


def test_bad_keys_are_refused():
    ua = wc.generate_private_key()
    with pytest.raises(wc.WebPushCryptoError):
        wc.public_bytes(bytes(32))  # zero is not a private key
    with pytest.raises(wc.WebPushCryptoError):
        public = wc.public_bytes(ua)
        compressed = bytes([2 + public[-1] % 2]) + public[1:33]
        wc.encrypt(b"x", compressed, bytes(16))  # not a Web Push key
    with pytest.raises(wc.WebPushCryptoError):
        wc.encrypt(b"x", wc.public_bytes(ua), bytes(15))


def test_a_body_from_one_backend_decrypts_with_the_other(
    backend: wc.Backend, monkeypatch: pytest.MonkeyPatch
):
    ua, auth = wc.generate_private_key(), bytes(range(16))
    body = wc.encrypt(b"x" * 200, wc.public_bytes(ua), auth)
    other = wc.PURE_PYTHON if backend is wc.CRYPTOGRAPHY else wc.CRYPTOGRAPHY
    monkeypatch.setattr(wc, "backend", other)
    assert wc.decrypt(body, ua, auth) == b"x" * 200
