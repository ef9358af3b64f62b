"""SUBSCRIBE / UNSUBSCRIBE routes and the proxy's push hooks, at the ASGI level against an in-memory DHT."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import trio

from trio_dht.infohash import InfoHash
from trio_dht.proxy import ProxyConfig, create_app
from trio_dht.proxy.permanent import PermanentPut
from trio_dht.proxy.subscribe import subscribe_blueprint
from trio_dht.proxy.value_json import PushTarget
from trio_dht.push.dispatcher import DeliveryQueue, Dispatcher
from trio_dht.push.gateway import Outcome
from trio_dht.push.hooks import CountingGateway, ProxyPushHooks, PushCounts
from trio_dht.push.payloads import Platform, PushKind
from trio_dht.push.service import PushService
from trio_dht.testing.memory_dht import MemoryDht
from trio_dht.value import Value

KEY = InfoHash.get("hello")


class RecordingGateway:
    name = "recording"
    max_batch = 100

    def __init__(self) -> None:
        self.pushes: list = []

    def lane(self, push):
        return 0

    async def send(self, pushes):
        self.pushes.extend(pushes)
        return [Outcome.DELIVERED] * len(pushes)


@dataclass
class Stack:
    dht: MemoryDht
    gateway: RecordingGateway
    service: PushService
    hooks: ProxyPushHooks
    client: httpx.AsyncClient


@pytest.fixture(params=[True, False], ids=["fast", "quart"])
async def stack(request: pytest.FixtureRequest, nursery: trio.Nursery) -> AsyncIterator[Stack]:
    dht = MemoryDht()
    gateway = RecordingGateway()
    counts = PushCounts()
    counting = CountingGateway(gateway, counts)
    dispatcher = Dispatcher(dict.fromkeys(Platform, counting), queue=DeliveryQueue(batch_window=0.001))
    service = PushService(dht, dispatcher)
    await nursery.start(dht.run)
    await nursery.start(dispatcher.run)
    await nursery.start(service.run)
    hooks = ProxyPushHooks(service, dispatcher, counts)
    app = create_app(
        dht, ProxyConfig(fast_path=request.param), blueprints=[subscribe_blueprint(service)], push=hooks
    )
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 4321))
    async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
        yield Stack(dht, gateway, service, hooks, client)


def body(**fields) -> bytes:
    return json.dumps(
        {"key": "tok", "client_id": "c", "session_id": "s1", "platform": "android"} | fields
    ).encode()


async def pushes(stack: Stack, count: int) -> list:
    with trio.fail_after(5):
        while len(stack.gateway.pushes) < count:
            await trio.sleep(0.01)
    out, stack.gateway.pushes = stack.gateway.pushes, []
    return out


async def test_subscribe_new_existing_refresh_unsubscribe(stack: Stack) -> None:
    await stack.dht.put(KEY, Value(b"v", id=7))
    r = await stack.client.request("SUBSCRIBE", "/key/hello", content=body())
    assert (r.status_code, r.content, r.headers["content-length"]) == (200, b"{}\n", "3")
    assert r.headers["content-type"] == "application/json" and r.headers["server"] == "trio-dht"
    [push] = await pushes(stack, 1)  # the value already there pushes at once
    assert push.data["key"] == KEY.hex() and push.high_priority

    r = await stack.client.request("SUBSCRIBE", f"/{KEY.hex()}", content=body())
    assert r.status_code == 200 and "content-length" not in r.headers  # chunked: the values, as a GET
    assert [json.loads(line)["id"] for line in r.content.splitlines()] == ["7"]
    r = await stack.client.request("SUBSCRIBE", "/key/hello", content=body(refresh=True, session_id="s2"))
    assert (r.status_code, r.content) == (200, b"{}\n") and "content-length" not in r.headers
    assert stack.service.push_listeners_count == 1

    r = await stack.client.request("UNSUBSCRIBE", "/key/hello", content=body())
    assert (r.status_code, r.content, r.headers["content-length"]) == (200, b"", "0")
    assert stack.service.push_listeners_count == 0 and len(stack.service.book) == 0
    r = await stack.client.request("UNSUBSCRIBE", "/key/hello", content=body())  # idempotent
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("method", "content", "status", "err"),
    [
        ("SUBSCRIBE", b"{", 400, "Incorrect JSON"),
        ("SUBSCRIBE", b"", 400, "Incorrect JSON"),
        ("SUBSCRIBE", b"[]", 400, "Incorrect JSON"),
        ("SUBSCRIBE", b'{"key":""}', 400, "No token"),
        ("SUBSCRIBE", b'{"key":"t","refresh":"yes"}', 400, None),
        ("UNSUBSCRIBE", b"{}", 400, "No token"),
        ("UNSUBSCRIBE", b"\xff", 400, "Incorrect JSON"),
    ],
)
async def test_bad_bodies(stack: Stack, method: str, content: bytes, status: int, err: str | None) -> None:
    r = await stack.client.request(method, "/key/hello", content=content)
    assert r.status_code == status
    if err is not None:
        assert r.json() == {"err": err}


async def test_stats_ping_and_permanent_put_warning(stack: Stack) -> None:
    await stack.client.request("SUBSCRIBE", "/key/hello", content=body())
    await stack.client.request("SUBSCRIBE", "/key/other", content=body(key="tok2", platform="ios"))
    await stack.dht.put(KEY, Value(b"v", id=1, prio=1))
    [push] = await pushes(stack, 1)
    assert not push.high_priority

    r = await stack.client.post("/node/pingPush", json={"key": "tok3", "client_id": "c3", "platform": "ios"})
    assert r.status_code == 200
    [pong] = await pushes(stack, 1)
    assert (pong.token, pong.platform, pong.data, pong.high_priority) == (
        "tok3",
        Platform.IOS,
        {"pong": True, "to": "c3"},
        True,
    )

    target = PushTarget("tok4", client_id="c4", platform="android", session_id="s4")
    stack.hooks.permanent_put_due(PermanentPut(KEY, Value(b"p", id=99), 0.0, target, 0.0))
    stack.hooks.permanent_put_due(PermanentPut(KEY, Value(b"p", id=98), 0.0))  # no push target: nothing
    [warn] = await pushes(stack, 1)
    assert warn.kind is PushKind.TIMEOUT and not warn.high_priority
    assert warn.data == {"s": "s4", "timeout": KEY.hex(), "to": "c4", "vid": "99"}

    stats = (await stack.client.get("/node/stats")).json()
    assert stats["pushListenersCount"] == 2
    assert stats["androidPush"] == {"highPriorityCount": 0, "normalPriorityCount": 2}
    assert stats["iosPush"] == {"highPriorityCount": 1, "normalPriorityCount": 0}
    assert stats["unifiedPush"] == {"highPriorityCount": 0, "normalPriorityCount": 0}
    assert stats["pushSubscriptions"]["active"] == 2 and stats["pushSubscriptions"]["subscribed"] == 2
    assert stats["pushDelivery"]["delivered"] == 3 and stats["pushDelivery"]["failures"] == 0
