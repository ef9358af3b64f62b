"""The APNs gateway against the APNs double: HTTP/2 over TLS, ES256 provider tokens, Apple's replies."""

import base64
import json
import math
import ssl
import sys
import time
import uuid

import httpx
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from trio_dht.limits import Limits
from trio_dht.push.apns import (
    PRODUCTION_URL,
    SANDBOX_URL,
    TOKEN_REFRESH,
    ApnsGateway,
    ApnsKey,
    ApnsKeyError,
    provider_token,
)
from trio_dht.push.dispatcher import DeliveryQueue, Dispatcher
from trio_dht.push.gateway import OVERSIZED, TIMED_OUT, Outcome, TemporaryGatewayError
from trio_dht.push.payloads import Dialect, Platform, Push, PushKind, timeout_data, values_data
from trio_dht.testing.apns import generate_test_key, open_apns_double

BUNDLE = "com.example.app"
TOKEN = "ab" * 32
VALUES = values_data(Dialect.CURRENT, key_hex="3f" * 20, client_id="client-1", session_id="sess-9",
                     sub_token=0, t_ms=1764000000000)  # fmt: skip
TIMEOUT = timeout_data(
    Dialect.CURRENT, key_hex="3f" * 20, client_id="client-1", session_id="sess-9", sub_token=0
)


class Clock:
    """A wall clock the test moves by hand (the gateway and the double share it)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def push(token=TOKEN, *, sid=1, kind=PushKind.VALUES, data=VALUES, high=False, topic=""):
    return Push(sid, kind, token, Platform.IOS, topic, dict(data), high)


def device(i: int) -> str:
    return f"{i:064x}"


def jwt_parts(authorization: str):
    scheme, token = authorization.split(" ")
    assert scheme == "bearer"
    head, claims, signature = token.split(".")
    decode = lambda part: base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))  # noqa: E731
    return json.loads(decode(head)), json.loads(decode(claims)), decode(signature)


@pytest.fixture
def key():
    return generate_test_key()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
async def apns(key, clock):
    async with open_apns_double(keys=[key], bundle_ids=[BUNDLE, "com.example.other"], clock=clock) as double:
        yield double


@pytest.fixture
async def gateway(key, clock, apns):
    async with ApnsGateway(
        key.apns_key(), bundle_id=BUNDLE, url=apns.url, ca_file=apns.ca_file, clock=clock
    ) as gw:
        yield gw


# -- the requests --------------------------------------------------------------------------------------------


async def test_background_wake_up_request(gateway, apns, key, clock):
    assert await gateway.send([push()]) == [Outcome.DELIVERED]
    [request] = apns.requests
    assert request.method == "POST" and request.path == f"/3/device/{TOKEN}"
    headers = request.headers
    assert headers["apns-topic"] == BUNDLE
    assert headers["apns-push-type"] == "background"
    assert headers["apns-priority"] == "5"
    assert headers["apns-expiration"] == str(int(clock.now) + 86400)
    assert headers["content-type"] == "application/json"
    assert str(uuid.UUID(headers["apns-id"])) == headers["apns-id"]
    assert json.loads(request.body) == {"aps": {"content-available": 1}, **VALUES}
    head, claims, signature = jwt_parts(headers["authorization"])
    assert head == {"alg": "ES256", "kid": key.key_id}
    assert claims == {"iss": key.team_id, "iat": int(clock.now)}
    assert len(signature) == 64  # raw r || s, not DER
    assert apns.notifications[0].payload["key"] == "3f" * 20


async def test_high_priority_wake_up_is_an_alert(gateway, apns):
    assert await gateway.send([push(high=True, topic="com.example.other")]) == [Outcome.DELIVERED]
    [request] = apns.requests
    assert request.headers["apns-topic"] == "com.example.other"  # the subscription's topic first
    assert request.headers["apns-push-type"] == "alert"
    assert request.headers["apns-priority"] == "10"
    assert json.loads(request.body) == {"aps": {"alert": {"title": "hello"}, "mutable-content": 1}, **VALUES}


async def test_timeout_push_is_an_alert(gateway, apns):
    assert await gateway.send([push(kind=PushKind.TIMEOUT, data=TIMEOUT)]) == [Outcome.DELIVERED]
    [request] = apns.requests
    assert request.headers["apns-push-type"] == "alert" and request.headers["apns-priority"] == "10"
    body = json.loads(request.body)
    assert body == {"aps": {"alert": {"title": "hello"}, "mutable-content": 1}, **TIMEOUT}
    assert body["timeout"] == "3f" * 20


def test_hosts(key):
    apns_key = key.apns_key()
    assert ApnsGateway(apns_key).url == PRODUCTION_URL == "https://api.push.apple.com"
    assert ApnsGateway(apns_key, sandbox=True).url == SANDBOX_URL == "https://api.sandbox.push.apple.com"
    assert ApnsGateway(apns_key, url="https://127.0.0.1:9999/").url == "https://127.0.0.1:9999"


async def test_unsendable_pushes_are_decided_without_a_request(key, apns):
    async with ApnsGateway(key.apns_key(), url=apns.url, ca_file=apns.ca_file) as no_topic:
        assert await no_topic.send([push()]) == [Outcome.DROPPED]
    async with ApnsGateway(key.apns_key(), bundle_id=BUNDLE, url=apns.url, ca_file=apns.ca_file) as gw:
        big = push(data={"key": "x" * 5000})
        assert await gw.send([big, push("../../x?y"), push("")]) == [
            Outcome.DROPPED,
            Outcome.TOKEN_GONE,
            Outcome.TOKEN_GONE,
        ]
    assert apns.requests == []


# -- provider tokens -----------------------------------------------------------------------------------------


async def test_provider_token_reused_then_refreshed_after_50_minutes(gateway, apns, clock):
    await gateway.send([push(device(i)) for i in range(3)])
    clock.now += TOKEN_REFRESH - 60
    await gateway.send([push()])
    first = {r.headers["authorization"] for r in apns.requests}
    assert len(first) == 1 and gateway.tokens.signed == 1
    clock.now += 60
    assert await gateway.send([push()]) == [Outcome.DELIVERED]
    assert gateway.tokens.signed == 2
    latest = apns.requests[-1].headers["authorization"]
    assert latest not in first
    assert jwt_parts(latest)[1]["iat"] == int(clock.now)
    assert [status for status, _ in apns.replies] == [200] * 5  # no TooManyProviderTokenUpdates


async def test_expired_provider_token_is_refreshed_once_and_the_push_resent(gateway, apns):
    await gateway.send([push()])
    apns.expire_provider_tokens()
    pushes = [push(device(i), sid=i) for i in range(10)]
    assert await gateway.send(pushes) == [Outcome.DELIVERED] * 10
    assert gateway.tokens.signed == 2  # ten streams refused, one new token
    refused = [r for r in apns.replies if r == (403, "ExpiredProviderToken")]
    assert len(refused) == 10 and len(apns.notifications) == 11
    resent = apns.requests[-10:]
    ids = {r.headers["apns-id"] for r in apns.requests[1:11]}
    assert {r.headers["apns-id"] for r in resent} == ids  # the same apns-id when sent again


async def test_still_expired_after_a_refresh_drops(key, apns, clock):
    late = Clock()
    late.now = clock.now - 2 * 3600  # our clock is wrong: every token we sign is two hours old to Apple
    async with ApnsGateway(
        key.apns_key(), bundle_id=BUNDLE, url=apns.url, ca_file=apns.ca_file, clock=late
    ) as gw:
        assert await gw.send([push()]) == [Outcome.DROPPED]
    assert apns.replies == [(403, "ExpiredProviderToken")] * 2
    assert gw.tokens.signed == 2


async def test_wrong_key_is_refused_and_said(apns, caplog):
    other = generate_test_key()
    async with ApnsGateway(other.apns_key(), bundle_id=BUNDLE, url=apns.url, ca_file=apns.ca_file) as gw:
        assert await gw.send([push()]) == [Outcome.DROPPED]
        assert await gw.send([push()]) == [Outcome.DROPPED]
    assert apns.replies == [(403, "InvalidProviderToken")] * 2
    lines = [r.getMessage() for r in caplog.records if r.name == "trio_dht.push.apns"]
    assert lines == ["APNs refused a push: 403 InvalidProviderToken"]  # once per 10 s


# -- Apple's replies -----------------------------------------------------------------------------------------


async def test_dead_tokens_are_gone(gateway, apns):
    apns.fail_token(device(1), "Unregistered")
    apns.fail_token(device(2), "BadDeviceToken")
    apns.fail_token(device(3), "DeviceTokenNotForTopic")
    pushes = [push(device(i), sid=i) for i in range(5)]
    outcomes = await gateway.send(pushes)
    assert outcomes == [
        Outcome.DELIVERED,
        Outcome.TOKEN_GONE,
        Outcome.TOKEN_GONE,
        Outcome.TOKEN_GONE,
        Outcome.DELIVERED,
    ]
    assert sorted(apns.replies) == sorted([(200, "")] * 2 + [(410, "Unregistered"), (400, "BadDeviceToken"),
                                                             (400, "DeviceTokenNotForTopic")])  # fmt: skip


async def test_other_refusals_drop(gateway, apns):
    apns.fail_token(device(1), "TopicDisallowed")
    apns.script(413, "PayloadTooLarge")
    assert await gateway.send([push()]) == [Outcome.DROPPED]
    assert await gateway.send([push(device(1))]) == [Outcome.DROPPED]


async def test_service_unavailable_retries_the_batch_with_retry_after(gateway, apns):
    apns.script(503, "ServiceUnavailable", headers={"retry-after": "7"}, times=2)
    with pytest.raises(TemporaryGatewayError) as info:
        await gateway.send([push(device(1)), push(device(2))])
    assert info.value.retry_after == 7.0
    assert await gateway.send([push(device(1)), push(device(2))]) == [Outcome.DELIVERED] * 2


async def test_one_throttled_device_retries_alone(gateway, apns):
    apns.fail_token(device(1), "TooManyRequests")
    assert await gateway.send([push(device(0)), push(device(1))]) == [Outcome.DELIVERED, Outcome.RETRY]
    with pytest.raises(TemporaryGatewayError):
        await gateway.send([push(device(1))])


async def test_oversized_replies_are_not_read(gateway, apns):
    apns.script(400, "x" * 70_000)  # over Limits.push_response_bytes (64 KiB)
    assert await gateway.send([push()]) == [Outcome.DROPPED]
    apns.script(503, "x" * 70_000)
    with pytest.raises(TemporaryGatewayError) as info:
        await gateway.send([push()])
    assert info.value.reason == OVERSIZED
    assert await gateway.send([push()]) == [Outcome.DELIVERED]


async def test_a_stream_without_reply_times_out(key, apns):
    apns.script(200, delay=math.inf)
    limits = Limits(push_request_timeout=0.5)
    async with ApnsGateway(
        key.apns_key(), bundle_id=BUNDLE, url=apns.url, ca_file=apns.ca_file, limits=limits
    ) as gw:
        start = trio.current_time()
        with pytest.raises(TemporaryGatewayError) as info:
            await gw.send([push()])
        assert info.value.reason == TIMED_OUT and trio.current_time() - start < 2
        assert await gw.send([push()]) == [Outcome.DELIVERED]  # the connection still serves


# -- HTTP/2 and TLS ------------------------------------------------------------------------------------------


async def test_a_batch_goes_out_at_once_on_one_connection(gateway, apns):
    apns.script(200, delay=0.5, times=20)
    start = trio.current_time()
    assert await gateway.send([push(device(i), sid=i) for i in range(20)]) == [Outcome.DELIVERED] * 20
    assert trio.current_time() - start < 3  # one after another would take 10 s
    await gateway.send([push(device(i), sid=i) for i in range(5)])
    assert len(apns.connections) == 1 and len(apns.requests) == 25


async def test_tls_is_verified_against_the_ca(key, apns):
    async with open_apns_double(keys=[key], bundle_ids=[BUNDLE]) as other:
        async with ApnsGateway(key.apns_key(), bundle_id=BUNDLE, url=apns.url, ca_file=other.ca_file) as gw:
            with pytest.raises(TemporaryGatewayError, match="CERTIFICATE_VERIFY_FAILED"):
                await gw.send([push()])
        async with ApnsGateway(key.apns_key(), bundle_id=BUNDLE, url=apns.url) as system_cas:
            with pytest.raises(TemporaryGatewayError, match="CERTIFICATE_VERIFY_FAILED"):
                await system_cas.send([push()])
    assert apns.requests == []


async def test_through_the_dispatcher_dead_tokens_are_pruned(gateway, apns):
    apns.fail_token(device(2), "Unregistered")
    gone = []
    dispatcher = Dispatcher({Platform.IOS: gateway}, queue=DeliveryQueue(batch_window=0.0))
    dispatcher.on_token_gone(gone.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.run)
        for i in range(4):
            dispatcher.submit(push(device(i), sid=i))
        with trio.fail_after(5):
            while not gone or len(apns.notifications) < 3:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert gone == [device(2)] and len(apns.notifications) == 3


# -- keys ----------------------------------------------------------------------------------------------------


def test_key_files(tmp_path, key):
    path = key.write(tmp_path)
    assert path.name == f"AuthKey_{key.key_id}.p8"
    loaded = ApnsKey.load(path, key_id=key.key_id, team_id=key.team_id)
    token = provider_token(loaded, 1764000000)
    assert token.count(".") == 2

    def write(name, data):
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    def pem(private_key, encryption=None):
        encryption = encryption or serialization.NoEncryption()
        return private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )

    p384 = pem(ec.generate_private_key(ec.SECP384R1()))
    rsa_key = pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    encrypted = pem(ec.generate_private_key(ec.SECP256R1()), serialization.BestAvailableEncryption(b"pw"))
    cases = [
        (tmp_path / "missing.p8", "cannot read the APNs key file .*missing.p8.*No such file"),
        (write("text.p8", b"hello"), "not a PEM PKCS#8 private key"),
        (write("encrypted.p8", encrypted), "not a PEM PKCS#8 private key .* .it is encrypted"),
        (
            write("garbage.p8", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
            "not a usable",
        ),
        (write("rsa.p8", rsa_key), "not an elliptic-curve key"),
        (write("p384.p8", p384), "secp384r1 key; APNs keys are P-256"),
        (write("huge.p8", key.pem + b"\n" * 70_000), "holds more than 65536 bytes"),
    ]
    for file, message in cases:
        with pytest.raises(ApnsKeyError, match=message):
            ApnsKey.load(file, key_id=key.key_id, team_id=key.team_id)
    with pytest.raises(ApnsKeyError, match="key id must be 10 letters or digits"):
        ApnsKey.from_pem(key.pem, key_id="short", team_id=key.team_id)
    with pytest.raises(ApnsKeyError, match="team id"):
        ApnsKey.from_pem(key.pem, key_id=key.key_id, team_id="")


# -- the double's own checks ---------------------------------------------------------------------------------


async def test_the_double_is_strict(apns, key, clock):
    good = provider_token(key.apns_key(), int(clock.now))
    base = {
        "authorization": f"bearer {good}",
        "apns-topic": BUNDLE,
        "apns-push-type": "background",
        "apns-priority": "5",
        "apns-expiration": "0",
    }
    body = b'{"aps":{"content-available":1}}'
    context = ssl.create_default_context(cafile=apns.ca_file)
    async with httpx.AsyncClient(http2=True, verify=context) as client:

        async def reply(headers=base, content=body, path=f"/3/device/{TOKEN}"):
            r = await client.post(apns.url + path, headers=headers, content=content)
            return r.status_code, (r.json()["reason"] if r.content else "")

        assert await reply() == (200, "")
        assert await reply(path="/3/device/abc") == (400, "BadDeviceToken")
        assert await reply(path="/2/device/" + TOKEN) == (404, "BadPath")
        assert await reply(base | {"apns-topic": "com.other"}) == (400, "TopicDisallowed")
        assert await reply({k: v for k, v in base.items() if k != "apns-topic"}) == (400, "MissingTopic")
        assert await reply(base | {"apns-priority": "10"}) == (400, "BadPriority")
        assert await reply(base | {"apns-push-type": "alert"}) == (400, "InvalidPushType")
        assert await reply(base | {"apns-push-type": "wake"}) == (400, "InvalidPushType")
        assert await reply(base | {"apns-expiration": "soon"}) == (400, "BadExpirationDate")
        assert await reply(base | {"apns-id": "nope"}) == (400, "BadMessageId")
        assert await reply(content=b"") == (400, "PayloadEmpty")
        assert await reply(content=b'{"x":1}') == (400, "BadPayload")
        assert await reply(content=b'{"aps":{"content-available":1},"k":"' + b"x" * 4096 + b'"}') == (
            413,
            "PayloadTooLarge",
        )
        assert await reply({k: v for k, v in base.items() if k != "authorization"}) == (
            403,
            "MissingProviderToken",
        )
        forged = provider_token(generate_test_key().apns_key(), int(clock.now))
        assert await reply(base | {"authorization": f"bearer {forged}"}) == (403, "InvalidProviderToken")
        old = provider_token(key.apns_key(), int(clock.now) - 3601)
        assert await reply(base | {"authorization": f"bearer {old}"}) == (403, "ExpiredProviderToken")
        newer = provider_token(key.apns_key(), int(clock.now))  # a new signature: another token, too soon
        assert await reply(base | {"authorization": f"bearer {newer}"}) == (
            429,
            "TooManyProviderTokenUpdates",
        )
    async with httpx.AsyncClient(verify=context) as http1:
        r = await http1.post(apns.url + f"/3/device/{TOKEN}", headers=base, content=body)
        assert r.status_code == 505


def test_without_cryptography_the_key_is_refused_clearly(key, monkeypatch):
    monkeypatch.setitem(sys.modules, "cryptography.exceptions", None)
    with pytest.raises(ApnsKeyError, match="need the cryptography package"):
        ApnsKey.from_pem(key.pem, key_id=key.key_id, team_id=key.team_id)
