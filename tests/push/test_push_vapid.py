"""VAPID (RFC 8292): the JWT checked by PyJWT and by cryptography, the header, its cache, the key checks, the
UnifiedPush gateway's header, and ``trio-dht vapid-keygen``."""

from __future__ import annotations

import base64
import json
import stat
import subprocess
import sys
import time

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from trio_dht import __main__ as program
from trio_dht.push import vapid
from trio_dht.push.gateway import Outcome, new_http_client
from trio_dht.push.payloads import Platform, Push, PushKind
from trio_dht.push.unifiedpush import UnifiedPushGateway
from trio_dht.push.vapid import Vapid, VapidKeyError, load_private_key, origin
from trio_dht.testing.unifiedpush import open_unifiedpush_double

SUBJECT = "mailto:ops@example.org"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_header(value: str) -> tuple[str, str]:
    scheme, _, params = value.partition(" ")
    assert scheme == "vapid"
    t, k = params.split(", ")
    assert t.startswith("t=") and k.startswith("k=")
    return t[2:], k[2:]


def test_pyjwt_accepts_the_token(key: ec.EllipticCurvePrivateKey) -> None:
    clock = Clock(time.time())
    signer = Vapid(key, SUBJECT, clock=clock)
    token, public = parse_header(signer.header("https://push.example.net:443/wpush/v2/abc?x=1"))
    assert public == signer.public_key
    assert jwt.get_unverified_header(token) == {"typ": "JWT", "alg": "ES256"}
    claims = jwt.decode(token, key.public_key(), algorithms=["ES256"], audience="https://push.example.net")
    assert claims["sub"] == SUBJECT
    assert clock.now < claims["exp"] <= clock.now + 24 * 3600
    assert claims["exp"] == int(clock.now + vapid.LIFETIME)
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(token, key.public_key(), algorithms=["ES256"], audience="https://other.example.net")


def test_token_verifies_with_cryptography_and_k_is_the_public_point(key: ec.EllipticCurvePrivateKey) -> None:
    token, public = parse_header(Vapid(key, SUBJECT, clock=Clock()).header("http://10.0.0.1:8080/up/x"))
    head, body, signature = token.split(".")
    raw = b64decode(signature)
    assert len(raw) == 64  # r || s, not DER
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    point = b64decode(public)
    assert len(point) == 65 and point[0] == 4
    peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    peer.verify(der, f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256()))  # raises if it does not verify
    assert json.loads(b64decode(body))["aud"] == "http://10.0.0.1:8080"


def test_pyjwt_signed_token_has_the_same_shape(key: ec.EllipticCurvePrivateKey) -> None:
    """The differential half: PyJWT's own ES256 token decodes to the same claims our decoder reads."""
    claims = {"aud": "https://a.example", "exp": 1_800_003_600, "sub": SUBJECT}
    theirs = jwt.encode(claims, key, algorithm="ES256")
    ours = Vapid(key, SUBJECT).token("https://a.example", 1_800_003_600)
    for token in (theirs, ours):
        assert jwt.decode(token, key.public_key(), algorithms=["ES256"], audience="https://a.example",
                          options={"verify_exp": False}) == claims  # fmt: skip
        assert len(b64decode(token.split(".")[2])) == 64


@pytest.mark.parametrize(
    ("endpoint", "aud"),
    [
        ("https://Push.Example.NET/wpush/abc", "https://push.example.net"),
        ("https://push.example.net:443/a", "https://push.example.net"),
        ("https://push.example.net:8443/a", "https://push.example.net:8443"),
        ("http://up.example:80/a?b=c", "http://up.example"),
        ("http://[2001:DB8::1]:8080/up", "http://[2001:db8::1]:8080"),
        ("HTTPS://ntfy.sh/upABC", "https://ntfy.sh"),
    ],
)
def test_origin(endpoint: str, aud: str) -> None:
    assert origin(endpoint) == aud


@pytest.mark.parametrize("endpoint", ["ftp://x/y", "https:///nohost", "not a url", ""])
def test_origin_rejects(endpoint: str) -> None:
    with pytest.raises(ValueError):
        origin(endpoint)


def test_header_is_cached_per_origin_until_near_expiry(key: ec.EllipticCurvePrivateKey) -> None:
    clock = Clock()
    signer = Vapid(key, SUBJECT, clock=clock)
    first = signer.header("https://a.example/1")
    assert signer.header("https://a.example/2?q") == first  # same origin: the same token
    other = signer.header("https://b.example/1")
    assert other != first
    clock.now += vapid.LIFETIME - vapid.RENEW_BEFORE - 1
    assert signer.header("https://a.example/1") == first
    clock.now += 2
    renewed = signer.header("https://a.example/1")
    assert renewed != first
    token, _ = parse_header(renewed)
    claims = jwt.decode(token, key.public_key(), algorithms=["ES256"], audience="https://a.example",
                        options={"verify_exp": False})  # fmt: skip
    assert claims["exp"] == int(clock.now + vapid.LIFETIME)


def test_cache_is_bounded(key: ec.EllipticCurvePrivateKey, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vapid, "MAX_CACHED_ORIGINS", 3)
    signer = Vapid(key, SUBJECT, clock=Clock())
    first = signer.header("https://h0.example/")
    for i in range(1, 4):
        signer.header(f"https://h{i}.example/")
    assert len(signer._cache) == 3
    assert signer.header("https://h0.example/") != first  # the oldest was dropped, so it is signed again


def test_lifetime_is_at_most_a_day(key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(ValueError, match="24 hours"):
        Vapid(key, SUBJECT, lifetime=24 * 3600 + 1)


def pem(private_key, fmt=serialization.PrivateFormat.PKCS8) -> bytes:
    return private_key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def test_load_private_key_takes_p256_in_pkcs8_or_sec1(key: ec.EllipticCurvePrivateKey) -> None:
    for fmt in (serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL):
        assert load_private_key(pem(key, fmt)).private_numbers() == key.private_numbers()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: pem(ec.generate_private_key(ec.SECP384R1())), "not an EC P-256"),
        (lambda: pem(rsa.generate_private_key(65537, 1024)), "not an EC P-256"),
        (lambda: b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "PEM"),
        (lambda: b"hello", "PEM"),
        (
            lambda: ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"pw"),
            ),
            "unencrypted",
        ),
    ],
)
def test_load_private_key_rejects(make, message: str) -> None:
    with pytest.raises(VapidKeyError, match=message):
        load_private_key(make())


async def test_unifiedpush_requests_carry_the_vapid_header(key: ec.EllipticCurvePrivateKey) -> None:
    signer = Vapid(key, SUBJECT)
    async with open_unifiedpush_double() as server, new_http_client() as client:
        ep = server.endpoint()
        data = {"key": "a828", "s": "su", "t": 1, "to": "cu"}
        push = Push(1, PushKind.VALUES, ep.url, Platform.UNIFIEDPUSH, ep.topic, data, True)
        signed = UnifiedPushGateway(client, allow_private=True, vapid=signer)
        assert await signed.send([push]) == [Outcome.DELIVERED]
        token, public = parse_header(ep.requests[-1].headers["authorization"])
        assert public == signer.public_key
        jwt.decode(token, key.public_key(), algorithms=["ES256"], audience=server.url)
        assert await UnifiedPushGateway(client, allow_private=True).send([push]) == [Outcome.DELIVERED]
        assert "authorization" not in ep.requests[-1].headers


def test_vapid_keygen_writes_a_0600_key_and_prints_its_public_key(tmp_path, capsys) -> None:
    path = tmp_path / "vapid.pem"
    assert program.main(["vapid-keygen", str(path)]) == 0
    printed = capsys.readouterr().out.strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_private_key(path.read_bytes())
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert printed == vapid.public_key_b64(key) and "=" not in printed and len(b64decode(printed)) == 65
    assert program.main(["vapid-keygen", str(path)]) == 1  # never over an existing file
    assert "cannot create" in capsys.readouterr().err
    assert load_private_key(path.read_bytes()).private_numbers() == key.private_numbers()


def test_vapid_keygen_through_the_real_program(tmp_path) -> None:
    path = tmp_path / "k.pem"
    done = subprocess.run(
        [sys.executable, "-m", "trio_dht", "vapid-keygen", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == vapid.public_key_b64(load_private_key(path.read_bytes()))
    usage = subprocess.run([sys.executable, "-m", "trio_dht", "vapid-keygen"], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: trio-dht vapid-keygen" in usage.stderr
