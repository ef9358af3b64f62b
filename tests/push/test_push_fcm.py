"""The FCM HTTP v1 gateway against the FCM double (loopback, HTTP/2 h2c), and the double's own checks."""

import json
import time
import urllib.parse
from contextlib import asynccontextmanager

import httpx
import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from trio_dht.limits import DEFAULT as DEFAULT_LIMITS
from trio_dht.limits import Limits
from trio_dht.push.dispatcher import DeliveryQueue, Dispatcher
from trio_dht.push.fcm import (
    GRANT_TYPE,
    SCOPE,
    FcmCredentialsError,
    FcmGateway,
    fcm_message,
    jwt_assertion,
    load_service_account,
    new_fcm_client,
    parse_service_account,
)
from trio_dht.push.gateway import (
    OVERSIZED,
    TIMED_OUT,
    Outcome,
    PermanentGatewayError,
    TemporaryGatewayError,
)
from trio_dht.push.payloads import Dialect, Platform, Push, PushKind, timeout_data, values_data
from trio_dht.testing.fcm import new_service_account, open_fcm_double

KEY = "3f2a" + "0" * 36


def push(token="tok-1", *, sid=1, data=None, high=True, kind=PushKind.VALUES) -> Push:
    data = data if data is not None else {"key": KEY, "s": "sess-9", "t": 1764000000000, "to": "client-1"}
    return Push(sid, kind, token, Platform.ANDROID, "", data, high)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def fcm_setup(*, limits=DEFAULT_LIMITS, clock=None, **double_options):
    async with open_fcm_double(**double_options) as fcm, new_fcm_client(limits, fcm.url) as client:
        account = parse_service_account(fcm.service_account())
        options = {"clock": clock} if clock else {}
        async with FcmGateway(client, account, fcm_url=fcm.url, limits=limits, **options) as gateway:
            yield fcm, gateway


# -- messages ------------------------------------------------------------------------------------------------


async def test_wake_up_push_is_the_exact_v1_message():
    data = values_data(
        Dialect.CURRENT,
        key_hex=KEY,
        client_id="client-1",
        session_id="sess-9",
        sub_token=7,
        t_ms=1764000000000,
    )
    async with fcm_setup() as (fcm, gateway):
        assert await gateway.send([push(data=data, high=True)]) == [Outcome.DELIVERED]
    expected = {
        "android": {"priority": "high", "ttl": "86400s"},
        "data": {"key": KEY, "s": "sess-9", "t": "1764000000000", "to": "client-1"},
        "token": "tok-1",
    }
    assert fcm.messages == [expected]
    sent = fcm.requests[-1]
    assert sent.path == "/v1/projects/trio-dht-test/messages:send"
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["authorization"].startswith("Bearer ya29.double-")
    assert json.loads(sent.body) == {"message": expected}
    assert fcm.http_versions == {"2"}


async def test_an_ios_subscription_through_fcm_carries_the_ios_push_as_its_apns_block():
    """FCM sends a data-only message to iOS at low priority: the apns block shows OpenDHT's iOS push."""
    ios = [
        Push(1, PushKind.VALUES, "ios-1", Platform.IOS, "", {"key": KEY}, True),
        Push(2, PushKind.VALUES, "ios-2", Platform.NONE, "", {"key": KEY}, False),  # no platform: as iOS
    ]
    async with fcm_setup() as (fcm, gateway):
        assert await gateway.send(ios) == [Outcome.DELIVERED] * 2
    alert, background = sorted(fcm.messages, key=lambda m: m["token"])
    assert alert["apns"] == {
        "headers": {"apns-push-type": "alert", "apns-priority": "10"},
        "payload": {"aps": {"alert": alert["apns"]["payload"]["aps"]["alert"], "mutable-content": 1}},
    }
    assert background["apns"] == {
        "headers": {"apns-push-type": "background", "apns-priority": "5"},
        "payload": {"aps": {"content-available": 1}},
    }
    assert "apns" not in fcm_message(push())["message"]  # an Android subscription's has none


async def test_timeout_push_is_the_exact_v1_message():
    current = timeout_data(
        Dialect.CURRENT, key_hex=KEY, client_id="client-1", session_id="sess-9", sub_token=7
    )
    seed = timeout_data(Dialect.SEED, key_hex=KEY, client_id="cb-1", session_id="", sub_token=42)
    async with fcm_setup() as (fcm, gateway):
        pushes = [push(data=current, high=False, kind=PushKind.TIMEOUT), push("tok-2", data=seed, high=False)]
        assert await gateway.send(pushes) == [Outcome.DELIVERED] * 2
    normal = {"priority": "normal", "ttl": "86400s"}
    assert sorted(fcm.messages, key=lambda m: m["token"]) == [
        {"android": normal, "data": {"s": "sess-9", "timeout": KEY, "to": "client-1"}, "token": "tok-1"},
        {"android": normal, "data": {"callback_id": "cb-1", "timeout": KEY, "token": "42"}, "token": "tok-2"},
    ]
    # non-string values become JSON text, as gorush writes them
    assert fcm_message(push(data={"b": True, "n": None, "x": 1.5}))["message"]["data"] == {
        "b": "true",
        "n": "null",
        "x": "1.5",
    }


# -- access token --------------------------------------------------------------------------------------------


async def test_many_pushes_one_token_one_connection_in_flight_together():
    async with fcm_setup() as (fcm, gateway):
        first = [push(f"tok-{i}", sid=i) for i in range(40)]
        assert await gateway.send(first) == [Outcome.DELIVERED] * 40
        assert await gateway.send([push("again")]) == [Outcome.DELIVERED]
    assert fcm.token_requests == 1 and gateway.token_requests == 1
    assert len(fcm.messages) == 41
    assert gateway._origin.connections_made == 1  # every message: streams of one HTTP/2 connection
    assert len(fcm.connections) == 2  # and one for the token endpoint
    assert fcm.http_versions == {"2"}
    assert fcm.max_in_flight > 1
    claims = fcm.assertions[0]
    assert claims["scope"] == SCOPE and claims["aud"] == fcm.token_uri


async def test_token_renewed_five_minutes_before_it_expires():
    clock = Clock()
    async with fcm_setup(clock=clock) as (fcm, gateway):
        await gateway.send([push()])
        clock.now += 3600 - 300 - 1
        await gateway.send([push()])
        assert fcm.token_requests == 1
        clock.now += 2
        assert await gateway.send([push()]) == [Outcome.DELIVERED]
        assert fcm.token_requests == 2


async def test_short_lived_token_renewed_at_half_life():
    clock = Clock()
    async with fcm_setup(clock=clock, token_lifetime=60) as (fcm, gateway):
        await gateway.send([push()])
        clock.now += 29
        await gateway.send([push()])
        assert fcm.token_requests == 1
        clock.now += 2
        await gateway.send([push()])
        assert fcm.token_requests == 2


async def test_401_renews_the_token_once_and_loses_no_push():
    async with fcm_setup() as (fcm, gateway):
        await gateway.send([push()])
        fcm.expire_tokens()
        pushes = [push(f"tok-{i}", sid=i) for i in range(5)]
        assert await gateway.send(pushes) == [Outcome.DELIVERED] * 5
        assert fcm.token_requests == 2  # one renewal for the five pushes that saw the 401
        assert len(fcm.messages) == 6
        assert [r.path for r in fcm.requests].count("/v1/projects/trio-dht-test/messages:send") == 11


async def test_a_second_401_drops_the_push():
    async with fcm_setup() as (fcm, gateway):
        fcm.script(401, {"error": {"code": 401, "status": "UNAUTHENTICATED"}}, times=2)
        assert await gateway.send([push()]) == [Outcome.DROPPED]
        assert fcm.token_requests == 2
        assert await gateway.send([push()]) == [Outcome.DELIVERED]


async def test_token_endpoint_failures():
    async with fcm_setup() as (fcm, gateway):
        fcm.script(503, headers={"Retry-After": "30"}, endpoint="token")
        with pytest.raises(TemporaryGatewayError) as temporary:
            await gateway.send([push(), push("tok-2", sid=2)])
        assert temporary.value.retry_after == 30
        fcm.script(
            400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}, endpoint="token"
        )
        with pytest.raises(PermanentGatewayError, match="invalid_grant"):
            await gateway.send([push()])
        fcm.script(200, b'{"access_token": "ya29.x", "expires_in": NaN}', endpoint="token")
        with pytest.raises(PermanentGatewayError, match="access_token"):
            await gateway.send([push()])
        fcm.script(200, b'{"token_type": "Bearer"}', endpoint="token")
        with pytest.raises(PermanentGatewayError, match="access_token"):
            await gateway.send([push()])
        assert await gateway.send([push()]) == [Outcome.DELIVERED]
        assert fcm.messages and fcm.token_requests == 5


async def test_key_the_double_does_not_trust_is_refused():
    async with open_fcm_double() as fcm, new_fcm_client(fcm_url=fcm.url) as client:
        stranger = parse_service_account(new_service_account(token_uri=fcm.token_uri))
        async with FcmGateway(client, stranger, fcm_url=fcm.url) as gateway:
            with pytest.raises(PermanentGatewayError, match="account not found"):
                await gateway.send([push()])
        # the right e-mail with another key
        trusted = fcm.service_account()
        forged = new_service_account(token_uri=fcm.token_uri, client_email=trusted["client_email"])
        forged["private_key_id"] = trusted["private_key_id"]
        async with FcmGateway(client, parse_service_account(forged), fcm_url=fcm.url) as gateway:
            with pytest.raises(PermanentGatewayError, match="Invalid JWT Signature"):
                await gateway.send([push()])
        assert fcm.messages == []


# -- outcomes ------------------------------------------------------------------------------------------------


async def test_unregistered_and_invalid_tokens_are_gone_bad_payloads_dropped():
    async with fcm_setup() as (fcm, gateway):
        fcm.unregister("dead")
        fcm.invalidate("garbled")
        pushes = [
            push("dead", sid=1),
            push("alive", sid=2),
            push("garbled", sid=3),
            push("alive-2", sid=4, data={"from": "x"}),  # a reserved key: our bug, not the token's
            push("alive-3", sid=5, data={"big": "x" * 5000}),
        ]
        outcomes = await gateway.send(pushes)
    assert outcomes == [
        Outcome.TOKEN_GONE,
        Outcome.DELIVERED,
        Outcome.TOKEN_GONE,
        Outcome.DROPPED,
        Outcome.DROPPED,
    ]
    assert [m["token"] for m in fcm.messages] == ["alive"]


async def test_invalid_argument_pointing_at_the_token_field_prunes():
    violation = {
        "@type": "type.googleapis.com/google.rpc.BadRequest",
        "fieldViolations": [{"field": "message.token"}],
    }
    other = {
        "@type": "type.googleapis.com/google.rpc.BadRequest",
        "fieldViolations": [{"field": "message.data"}],
    }
    async with fcm_setup() as (fcm, gateway):
        for details, outcome in (([violation], Outcome.TOKEN_GONE), ([violation, other], Outcome.DROPPED)):
            error = {"code": 400, "message": "Invalid registration token", "status": "INVALID_ARGUMENT"}
            body = {"error": error | {"details": details}}
            fcm.script(400, body)
            assert await gateway.send([push()]) == [outcome]
        fcm.script(404, {"error": {"code": 404, "status": "NOT_FOUND"}})  # no UNREGISTERED: maybe a wrong URL
        mismatch = {
            "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
            "errorCode": "SENDER_ID_MISMATCH",
        }
        fcm.script(403, {"error": {"code": 403, "status": "PERMISSION_DENIED", "details": [mismatch]}})
        assert await gateway.send([push(), push("b", sid=2)]) == [Outcome.DROPPED] * 2


async def test_503_with_retry_after_backs_the_batch_off():
    async with fcm_setup() as (fcm, gateway):
        fcm.script(503, headers={"Retry-After": "7"})
        with pytest.raises(TemporaryGatewayError) as one:
            await gateway.send([push()])
        assert one.value.retry_after == 7
        fcm.script(429, headers={"Retry-After": "3"})
        fcm.script(500, headers={"Retry-After": "9"})
        with pytest.raises(TemporaryGatewayError) as both:
            await gateway.send([push(), push("tok-2", sid=2)])
        assert both.value.retry_after == 9  # the longest wait asked for
        fcm.script(503)
        outcomes = await gateway.send([push(), push("tok-2", sid=2)])
        assert sorted(o.value for o in outcomes) == ["delivered", "retry"]  # only the failed one again


async def test_dispatcher_retries_after_503_and_prunes_unregistered():
    async with fcm_setup() as (fcm, gateway):
        fcm.unregister("dead")
        fcm.script(503, headers={"Retry-After": "0"})
        dispatcher = Dispatcher({Platform.ANDROID: gateway}, queue=DeliveryQueue(batch_window=0.0))
        gone = []
        dispatcher.on_token_gone(gone.append)
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.run)
            dispatcher.submit(push("alive", sid=1))
            with trio.fail_after(5):
                while not fcm.messages:
                    await trio.sleep(0.01)
            dispatcher.submit(push("dead", sid=2))
            with trio.fail_after(5):
                while not gone:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert [m["token"] for m in fcm.messages] == ["alive"]
    assert gone == ["dead"]
    assert dispatcher.stats["batch-failed"] == 1


async def test_every_wait_is_bounded():
    limits = Limits(push_request_timeout=0.5, push_response_bytes=1024)
    async with fcm_setup(limits=limits) as (fcm, gateway):
        fcm.script(200, b'{"name": "x"}', times=2, byte_interval=1.0)
        with pytest.raises(TemporaryGatewayError) as slow:
            await gateway.send([push(), push("b", sid=2)])
        assert slow.value.reason == TIMED_OUT
        fcm.script(400, b"x" * 100, repeat=100)
        with pytest.raises(PermanentGatewayError) as huge:
            await gateway.send([push()])
        assert huge.value.reason == OVERSIZED
        fcm.script(200, b"x" * 100, repeat=100, endpoint="token")
        fcm.expire_tokens()
        with pytest.raises(PermanentGatewayError):
            await gateway.send([push()])
        assert await gateway.send([push()]) == [Outcome.DELIVERED]


# -- service-account files -----------------------------------------------------------------------------------


def _pem(key) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.fixture(scope="module")
def good_account():
    return new_service_account()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: [a], "not a JSON object"),
        (lambda a: a | {"type": "authorized_user"}, "'authorized_user' key"),
        (lambda a: {k: v for k, v in a.items() if k != "client_email"}, "'client_email' is missing"),
        (lambda a: a | {"project_id": ""}, "'project_id' is missing"),
        (lambda a: a | {"project_id": "x/../other"}, "not a project id"),
        (lambda a: a | {"client_email": "nobody"}, "not an e-mail address"),
        (lambda a: a | {"private_key_id": 5}, "'private_key_id'"),
        (lambda a: a | {"token_uri": "ftp://example.com/token"}, "token_uri"),
        (
            lambda a: a | {"private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"},
            "private_key: ",
        ),
        (lambda a: a | {"private_key": _pem(rsa.generate_private_key(65537, 1024))}, "1024-bit"),
        (lambda a: a | {"private_key": _pem(ec.generate_private_key(ec.SECP256R1()))}, "not an RSA key"),
    ],
)
def test_bad_service_account_files_are_refused_clearly(tmp_path, good_account, change, message):
    path = tmp_path / "sa.json"
    path.write_text(json.dumps(change(dict(good_account))))
    with pytest.raises(FcmCredentialsError, match=message) as refused:
        load_service_account(path)
    assert str(path) in str(refused.value)


def test_unreadable_service_account_files(tmp_path, good_account):
    with pytest.raises(FcmCredentialsError, match="cannot read it"):
        load_service_account(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FcmCredentialsError, match="not JSON"):
        load_service_account(tmp_path / "bad.json")
    (tmp_path / "big.json").write_bytes(b" " * 70000)
    with pytest.raises(FcmCredentialsError, match="over 65536 bytes"):
        load_service_account(tmp_path / "big.json")
    (tmp_path / "good.json").write_text(json.dumps(good_account))
    account = load_service_account(tmp_path / "good.json")
    assert (account.project_id, account.token_uri) == ("trio-dht-test", "https://oauth2.googleapis.com/token")


# -- the JWT assertion against PyJWT -------------------------------------------------------------------------


def test_assertion_is_what_pyjwt_writes_and_reads(good_account):
    account = parse_service_account(good_account)
    now = int(time.time())
    mine = jwt_assertion(account, now)
    claims = {
        "aud": account.token_uri,
        "exp": now + 3600,
        "iat": now,
        "iss": account.client_email,
        "scope": SCOPE,
    }
    theirs = jwt.encode(
        claims, account.private_key, algorithm="RS256", headers={"kid": account.private_key_id}
    )
    assert mine == theirs  # RS256 (PKCS#1 v1.5) is deterministic: byte for byte the same token
    public = account.private_key.public_key()
    assert jwt.decode(mine, public, algorithms=["RS256"], audience=account.token_uri) == claims
    assert jwt.get_unverified_header(mine) == {"alg": "RS256", "kid": account.private_key_id, "typ": "JWT"}


async def _ask_token(client, fcm, assertion):
    body = urllib.parse.urlencode({"grant_type": GRANT_TYPE, "assertion": assertion})
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    return await client.post(fcm.token_uri, content=body, headers=headers)


async def test_double_checks_assertions_as_google_does():
    async with open_fcm_double() as fcm, new_fcm_client(fcm_url=fcm.url) as client:
        info = fcm.service_account()
        key = serialization.load_pem_private_key(info["private_key"].encode(), None)
        now = int(time.time())
        good = {
            "aud": fcm.token_uri,
            "exp": now + 3600,
            "iat": now,
            "iss": info["client_email"],
            "scope": SCOPE,
        }

        def sign(claims, **headers):
            return jwt.encode(
                claims, key, algorithm="RS256", headers={"kid": info["private_key_id"], **headers}
            )

        reply = await _ask_token(client, fcm, sign(good))  # PyJWT's token is accepted
        assert reply.status_code == 200 and reply.json()["expires_in"] == 3600
        refused = {
            "aud": sign(good | {"aud": "https://oauth2.googleapis.com/token"}),
            "lifetime": sign(good | {"exp": now + 3601}),
            "expired": sign(good | {"iat": now - 4000, "exp": now - 400}),
            "future": sign(good | {"iat": now + 600, "exp": now + 1200}),
            "scope": sign(good | {"scope": "https://www.googleapis.com/auth/userinfo.email"}),
            "kid": sign(good, kid="another"),
            "hs256": jwt.encode(good, "s" * 32, algorithm="HS256"),
            "tampered": sign(good)[:-4] + "AAAA",
            "garbage": "a.b",
            "issuer": jwt.PyJWS().encode(json.dumps(good | {"iss": ["x"]}).encode(), key, algorithm="RS256"),
        }
        for name, assertion in refused.items():
            reply = await _ask_token(client, fcm, assertion)
            assert reply.status_code == 400, name
            assert reply.json()["error"] in ("invalid_grant", "invalid_scope"), name
        assert len(fcm.assertions) == 1


async def test_double_checks_messages_strictly():
    async with fcm_setup() as (fcm, gateway), new_fcm_client(fcm_url=fcm.url) as client:
        token = await gateway._bearer()
        url = f"{fcm.url}/v1/projects/trio-dht-test/messages:send"
        good = fcm_message(push())["message"]

        async def send(message, *, bearer=token, to=url):
            headers = {"Authorization": f"Bearer {bearer}"}
            return await client.post(to, content=json.dumps({"message": message}), headers=headers)

        assert (await send(good)).status_code == 200
        assert (await send(good, bearer="nope")).json()["error"]["status"] == "UNAUTHENTICATED"
        other = url.replace("trio-dht-test", "other")
        assert (await send(good, to=other)).json()["error"]["status"] == "PERMISSION_DENIED"
        bad = {
            "message.data[t].value": good | {"data": {"t": 1}},
            "message.android.ttl": good | {"android": {"ttl": "86400"}},
            "message.android.priority": good | {"android": {"priority": "urgent"}},
            "message.android.colour": good | {"android": {"colour": "red"}},
            "message": good | {"topic": "news"},
            "message.data[google.x].key": good | {"data": {"google.x": "1"}},
        }
        for field, message in bad.items():
            reply = await send(message)
            assert reply.status_code == 400, field
            error = reply.json()["error"]
            assert error["status"] == "INVALID_ARGUMENT"
            assert error["details"][-1]["fieldViolations"][0]["field"] == field
        assert len(fcm.messages) == 1


async def test_double_speaks_http1_too():
    async with fcm_setup() as (fcm, _), httpx.AsyncClient() as client:
        reply = await client.post(f"{fcm.url}/v1/projects/trio-dht-test/messages:send", content=b"{}")
        assert reply.status_code == 401
        assert fcm.http_versions == {"1.1"}


async def test_past_the_deadline_only_the_unanswered_pushes_are_retried():
    limits = Limits(push_request_timeout=0.5, push_response_bytes=1024)
    async with fcm_setup(limits=limits) as (fcm, gateway):
        fcm.script(200, b'{"name": "x"}', times=1, byte_interval=1.0)  # the first push's reply trickles
        outcomes = await gateway.send([push("slow", sid=1), push("b", sid=2), push("c", sid=3)])
    assert outcomes == [Outcome.RETRY, Outcome.DELIVERED, Outcome.DELIVERED]  # b and c are not sent twice
