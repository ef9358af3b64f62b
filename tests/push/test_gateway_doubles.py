"""The gateway doubles speak the real protocols; the real gateways work against them (loopback)."""

import json

import httpx
import pytest
import trio

from trio_dht.infohash import InfoHash
from trio_dht.limits import Limits
from trio_dht.push import webpush_crypto
from trio_dht.push.dispatcher import DeliveryQueue, Dispatcher
from trio_dht.push.gateway import (
    OVERSIZED,
    TIMED_OUT,
    Outcome,
    PermanentGatewayError,
    TemporaryGatewayError,
    new_http_client,
)
from trio_dht.push.gorush import GorushGateway
from trio_dht.push.payloads import Platform, Push, PushKind
from trio_dht.push.service import PushService
from trio_dht.push.unifiedpush import UnifiedPushGateway
from trio_dht.testing.gorush import open_gorush_double
from trio_dht.testing.memory_dht import MemoryDht
from trio_dht.testing.unifiedpush import open_unifiedpush_double
from trio_dht.value import Value

MISSING = {"code": 400, "message": "Missing notifications field."}
NOTE = {"tokens": ["t"], "platform": 2, "data": {"k": 1}, "android": {"priority": "high", "ttl": "86400s"}}


async def post(url, payload):
    async with httpx.AsyncClient() as client:
        content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return await client.post(url + "/api/push", content=content)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"not json", MISSING),
        (b"[]", MISSING),
        ({}, MISSING),
        ({"notifications": None}, MISSING),
        ({"notifications": [NOTE | {"platform": "ios"}]}, MISSING),
        ({"notifications": [NOTE | {"mutable_content": 1}]}, MISSING),
        ({"notifications": [NOTE | {"android": {"ttl": 86400}}]}, MISSING),
        ({"notifications": [NOTE | {"android": {"data": {"a": 1}}}]}, MISSING),
        ({"notifications": [NOTE | {"expiration": 1.5}]}, MISSING),
        ({"notifications": [NOTE | {"alert": {"title": 5}}]}, MISSING),
        ({"notifications": [NOTE | {"Platform": "2"}]}, MISSING),  # Go matches names case-insensitively
        ({"notifications": []}, {"code": 400, "message": "Notifications field is empty."}),
        (
            {"notifications": [NOTE] * 101},
            {"code": 400, "message": "Number of notifications(101) over limit(100)"},
        ),
    ],
)
async def test_gorush_double_rejects_like_gorush(payload, expected):
    async with open_gorush_double() as gorush:
        response = await post(gorush.url, payload)
        assert response.status_code == 400 and response.json() == expected
        assert gorush.notifications == []


async def test_gorush_double_accepts_counts_and_logs_failures():
    async with open_gorush_double(hide_token=True) as gorush:
        gorush.fail_token("dead-token-123", "Unregistered")
        payload = {
            "notifications": [
                NOTE
                | {
                    "tokens": ["ok", "dead-token-123"],
                    "unknown_field": [1],
                    "sound": {"x": 1},
                    "badge": None,
                },
                NOTE | {"platform": 3},  # huawei disabled: dropped, not counted
                NOTE | {"platform": 1, "notif_id": "n1", "tokens": ["dead-token-123"], "expiration": 17},
            ]
        }
        response = await post(gorush.url, payload)
        assert response.status_code == 200
        body = response.json()
        assert body["success"] == "ok" and body["counts"] == 3
        assert body["logs"] == [
            {"type": "failed-push", "platform": "android", "token": "**********-123", "message": "",
             "error": "Unregistered"},
            {"type": "failed-push", "platform": "ios", "token": "**********-123", "message": "",
             "error": "Unregistered", "notif_id": "n1"},
        ]  # fmt: skip
        assert len(gorush.notifications) == 2
    async with open_gorush_double(sync=False) as gorush:
        gorush.fail_token("ok", "BadDeviceToken")
        assert (await post(gorush.url, {"notifications": [NOTE | {"tokens": ["ok"]}]})).json()["logs"] == []


def push(sid, token, platform, data=None, topic="", high=True):
    return Push(sid, PushKind.VALUES, token, platform, topic, data or {"key": "k", "t": 1}, high)


async def test_gorush_gateway_against_the_double():
    async with open_gorush_double() as gorush, new_http_client() as client:
        gateway = GorushGateway(client, gorush.url, bundle_id="com.example.app")
        gorush.fail_token("gone", "Requested entity was not found.")
        gorush.fail_token("busy", "TooManyRequests")
        outcomes = await gateway.send(
            [
                push(1, "fine", Platform.ANDROID),
                push(2, "gone", Platform.ANDROID),
                push(3, "busy", Platform.IOS),
            ]
        )
        assert outcomes == [Outcome.DELIVERED, Outcome.TOKEN_GONE, Outcome.RETRY]
        assert len(gorush.requests) == 1
        sent = gorush.requests[0].json()["notifications"]
        assert sent[0] == {"android": {"priority": "high", "ttl": "86400s"}, "data": {"key": "k", "t": 1},
                           "platform": 2, "tokens": ["fine"]}  # fmt: skip
        assert sent[2]["topic"] == "com.example.app" and sent[2]["push_type"] == "alert"
        gorush.script(503, headers={"Retry-After": "7"})
        with pytest.raises(TemporaryGatewayError) as info:
            await gateway.send([push(1, "fine", Platform.ANDROID)])
        assert info.value.retry_after == 7
        gorush.script(400, b'{"code":400,"message":"Missing notifications field."}')
        with pytest.raises(PermanentGatewayError):
            await gateway.send([push(1, "fine", Platform.ANDROID)])
    async with new_http_client() as client:
        with pytest.raises(TemporaryGatewayError):  # nothing listens there any more
            await GorushGateway(client, gorush.url).send([push(1, "x", Platform.ANDROID)])


async def test_unifiedpush_double_decrypts_and_answers_scripted_codes():
    async with open_unifiedpush_double(require_encryption=True) as server, new_http_client() as client:
        ep = server.endpoint()
        gateway = UnifiedPushGateway(client, allow_private=True)
        data = {"key": "a828", "s": "su", "t": 1795624641716, "to": "cu"}
        assert await gateway.send([push(1, ep.url + "?x=1", Platform.UNIFIEDPUSH, data, ep.topic)]) == [
            Outcome.DELIVERED
        ]
        assert json.loads(ep.messages[0]) == data
        request = ep.requests[0]
        assert request.path == f"/up/{ep.name}?x=1"
        assert request.headers["host"] == server.url.removeprefix("http://")  # the port is kept
        assert request.headers["ttl"] == "86400" and request.headers["urgency"] == "high"
        assert request.headers["content-encoding"] == "aes128gcm"
        # Plain JSON is refused by an AND_3 server: our push is dropped, not retried.
        assert await gateway.send([push(1, ep.url, Platform.UNIFIEDPUSH, data, "")]) == [Outcome.DROPPED]
        for status, outcome in ((410, Outcome.TOKEN_GONE), (404, Outcome.TOKEN_GONE), (413, Outcome.DROPPED),
                                (301, Outcome.DROPPED)):  # fmt: skip
            ep.script(status, headers={"Location": "http://127.0.0.1:1/elsewhere"})
            assert await gateway.send([push(1, ep.url, Platform.UNIFIEDPUSH, data, ep.topic)]) == [outcome]
        ep.script(429, headers={"Retry-After": "30"})
        with pytest.raises(TemporaryGatewayError) as info:
            await gateway.send([push(1, ep.url, Platform.UNIFIEDPUSH, data, ep.topic)])
        assert info.value.retry_after == 30
        ep.script(507)
        with pytest.raises(TemporaryGatewayError):
            await gateway.send([push(1, ep.url, Platform.UNIFIEDPUSH, data, ep.topic)])
        assert len(ep.messages) == 1 and len(server.requests) == 8  # the redirect was not followed


async def test_unifiedpush_double_checks_ttl_size_and_ciphertext():
    async with open_unifiedpush_double() as server, httpx.AsyncClient() as client:
        ep = server.endpoint()
        assert (await client.post(ep.url, content=b"x")).status_code == 400  # no TTL
        assert (await client.post(ep.url, content=b"x" * 4097, headers={"TTL": "0"})).status_code == 413
        bad = {"TTL": "60", "Content-Encoding": "aes128gcm"}
        assert (await client.post(ep.url, content=b"\0" * 200, headers=bad)).status_code == 400
        good = webpush_crypto.encrypt(b"hi", ep.p256dh, ep.auth)
        assert (await client.post(ep.url, content=good, headers=bad)).status_code == 201
        assert (await client.post(server.url + "/up/nobody", content=b"x", headers=bad)).status_code == 404
        assert ep.messages == [b"hi"]


async def test_ssrf_guard_refuses_loopback_unless_allowed():
    async with open_unifiedpush_double() as server, new_http_client() as client:
        ep = server.endpoint()
        guarded = UnifiedPushGateway(client)
        assert await guarded.send([push(1, ep.url, Platform.UNIFIEDPUSH, topic=ep.topic)]) == [
            Outcome.TOKEN_GONE
        ]
        assert server.requests == []


async def test_end_to_end_service_gateway_down_then_back():
    """A put during a gorush outage reaches each device once after recovery; UnifiedPush round-trips."""
    key = InfoHash.get("e2e")
    dht = MemoryDht()
    async with (
        open_gorush_double() as gorush,
        open_unifiedpush_double(require_encryption=True) as up,
        new_http_client() as client,
        trio.open_nursery() as nursery,
    ):
        gateways = {
            Platform.ANDROID: GorushGateway(client, gorush.url),
            Platform.IOS: GorushGateway(client, gorush.url),
            Platform.UNIFIEDPUSH: UnifiedPushGateway(client, allow_private=True),
        }
        dispatcher = Dispatcher(
            gateways, queue=DeliveryQueue(batch_window=0.01, backoff_base=0.05, backoff_cap=0.2)
        )
        service = PushService(dht, dispatcher, allow_private_endpoints=True)
        await nursery.start(dispatcher.run)
        await nursery.start(service.run)
        ep = up.endpoint()
        for i, platform in enumerate(("android", "ios", "android")):
            sub = {"key": f"dev{i}", "client_id": "c", "session_id": "s", "platform": platform}
            assert (await service.subscribe(key, json.dumps(sub).encode())).status == 200
        sub = {"key": ep.url, "client_id": "cu", "platform": "unifiedpush", "topic": ep.topic}
        assert (await service.subscribe(key, json.dumps(sub).encode())).status == 200
        gorush.script(503, times=3)
        for n in range(5):
            await dht.put(key, Value(b"v%d" % n, id=n + 1))
        with trio.fail_after(10):
            while len(gorush.notifications) < 3 or not ep.messages:
                await trio.sleep(0.05)
        await trio.sleep(0.3)
        tokens = sorted(n["tokens"][0] for n in gorush.notifications)
        assert tokens == ["dev0", "dev1", "dev2"]  # exactly one wake-up each, after three failed requests
        assert len(gorush.requests) >= 4
        assert json.loads(ep.messages[-1])["key"] == key.hex()
        nursery.cancel_scope.cancel()


LIMITS = Limits(push_request_timeout=1.5, push_response_bytes=4096)


async def test_a_slowloris_endpoint_times_out_as_a_whole_and_a_huge_reply_is_cut():
    """One byte a second keeps httpx's per-read timeout happy; the request's own deadline still ends it."""
    async with open_unifiedpush_double() as server, new_http_client(LIMITS) as client:
        ep = server.endpoint()
        gateway = UnifiedPushGateway(client, allow_private=True, limits=LIMITS)
        ep.script(201, body=b"x" * 100, byte_interval=0.4)
        start = trio.current_time()
        with pytest.raises(TemporaryGatewayError) as info:
            await gateway.send([push(1, ep.url, Platform.UNIFIEDPUSH, topic=ep.topic)])
        assert info.value.reason == TIMED_OUT and 1.4 < trio.current_time() - start < 3
        ep.script(201, body=b"y" * 65536, repeat=3200)  # 200 MiB, streamed by the double
        with pytest.raises(PermanentGatewayError) as info:  # a 2xx: the same push would get the same reply
            await gateway.send([push(1, ep.url, Platform.UNIFIEDPUSH, topic=ep.topic)])
        assert info.value.reason == OVERSIZED
        ep.script(503, body=b"z" * 65536, repeat=3)
        with pytest.raises(TemporaryGatewayError) as info:  # a 5xx: temporary, whatever its body
            await gateway.send([push(1, ep.url, Platform.UNIFIEDPUSH, topic=ep.topic)])
        assert info.value.reason == OVERSIZED
        # The endpoint still works (an oversized reply's connection is closed, never reused mid-body).
        assert await gateway.send([push(1, ep.url, Platform.UNIFIEDPUSH, topic=ep.topic)]) == [
            Outcome.DELIVERED
        ]


@pytest.mark.parametrize("https_path", [False, True])
async def test_gorush_slowloris_and_huge_replies(https_path):
    """The same bounds on both of gorush's transports (the lean keep-alive client and httpx)."""
    async with open_gorush_double() as gorush, new_http_client(LIMITS) as client:
        gateway = GorushGateway(client, gorush.url, limits=LIMITS)
        if https_path:  # the httpx path, as an https:// gorush takes it (here over plain loopback HTTP)
            gateway._lean = None
        gorush.script(200, b'{"counts":1,"logs":[],"success":"ok"}', byte_interval=0.4)
        with pytest.raises(TemporaryGatewayError) as info:
            await gateway.send([push(1, "t", Platform.ANDROID)])
        assert info.value.reason == TIMED_OUT
        gorush.script(200, b"[" * 65536, repeat=100)
        with pytest.raises(PermanentGatewayError) as info:
            await gateway.send([push(1, "t", Platform.ANDROID)])
        assert info.value.reason == OVERSIZED
        gorush.script(502, b"<html>" * 1000)  # chunked (no Content-Length)
        with pytest.raises(TemporaryGatewayError) as info:
            await gateway.send([push(1, "t", Platform.ANDROID)])
        assert info.value.reason == OVERSIZED
        assert await gateway.send([push(1, "t", Platform.ANDROID)]) == [Outcome.DELIVERED]
        gateway.close()
