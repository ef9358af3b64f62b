"""SUBSCRIBE / UNSUBSCRIBE routes and the proxy's push hooks, over loopback against an in-memory DHT.

Every test runs three times: with the plain-HTTP front end serving SUBSCRIBE/UNSUBSCRIBE (``fast``); with an
HTTP worker process relaying them to it (``worker``: every other request hands its connection over); and with
every request served by hypercorn and the Quart app, the same routes as Quart views (``quart``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

import httpx
import pytest
import trio
from proxy_layers import serve_with_quart
from test_proxy_frontend import connect

from trio_dht.infohash import InfoHash
from trio_dht.proxy import ProxyConfig, serve_proxy
from trio_dht.proxy.permanent import PermanentPut
from trio_dht.proxy.push_hooks import CountingGateway, ProxyPushHooks, PushCounts
from trio_dht.push.dispatcher import DeliveryQueue, Dispatcher
from trio_dht.push.gateway import Outcome
from trio_dht.push.payloads import Platform, PushKind
from trio_dht.push.service import PushService
from trio_dht.rest.value_json import PushTarget
from trio_dht.testing.memory_dht import MemoryDht
from trio_dht.value import Value

KEY = InfoHash.get("hello")
BOUND = 5.0
"""Safety bound on every wait (not a timing assertion)."""


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
    fast: bool

    def served_here(self, r: httpx.Response) -> None:
        """The response came from the path under test: the front end sends a reason phrase, h11 none."""
        assert r.reason_phrase == ("OK" if self.fast else "") or r.status_code != 200


@pytest.fixture(params=["fast", "worker", "quart"])
async def stack(
    request: pytest.FixtureRequest, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Stack]:
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
    fast = request.param != "quart"
    workers = 1 if request.param == "worker" else 0
    if not fast:
        serve_with_quart(monkeypatch)
    config = ProxyConfig(host="127.0.0.1", port=0, max_body=1000, http_workers=workers)
    serve = partial(serve_proxy, dht, config, push=hooks)
    (url,) = await nursery.start(serve)
    async with httpx.AsyncClient(base_url=url, timeout=BOUND) as client:
        yield Stack(dht, gateway, service, hooks, client, fast)


def body(**fields) -> bytes:
    return json.dumps(
        {"key": "tok", "client_id": "c", "session_id": "s1", "platform": "android"} | fields
    ).encode()


async def pushes(stack: Stack, count: int) -> list:
    with trio.fail_after(BOUND):
        while len(stack.gateway.pushes) < count:
            await trio.sleep(0.01)
    out, stack.gateway.pushes = stack.gateway.pushes, []
    return out


async def test_subscribe_new_existing_refresh_unsubscribe(stack: Stack) -> None:
    await stack.dht.put(KEY, Value(b"v", id=7))
    r = await stack.client.request("SUBSCRIBE", "/key/hello", content=body())
    assert (r.status_code, r.content, r.headers["content-length"]) == (200, b"{}\n", "3")
    assert r.headers["content-type"] == "application/json" and r.headers["server"] == "trio-dht"
    assert r.headers["access-control-allow-origin"] == "*"
    stack.served_here(r)
    [push] = await pushes(stack, 1)  # the value already there pushes at once
    assert push.data["key"] == KEY.hex() and push.high_priority

    r = await stack.client.request("SUBSCRIBE", f"/{KEY.hex()}", content=body())
    assert r.status_code == 200 and "content-length" not in r.headers  # chunked: the values, as a GET
    assert [json.loads(line)["id"] for line in r.content.splitlines()] == ["7"]
    assert r.headers["transfer-encoding"] == "chunked" and r.headers["content-type"] == "application/json"
    stack.served_here(r)
    r = await stack.client.request("SUBSCRIBE", "/key/hello", content=body(refresh=True, session_id="s2"))
    assert (r.status_code, r.content) == (200, b"{}\n") and "content-length" not in r.headers
    assert stack.service.push_listeners_count == 1

    r = await stack.client.request("UNSUBSCRIBE", "/key/hello", content=body())
    assert (r.status_code, r.content, r.headers["content-length"]) == (200, b"", "0")
    stack.served_here(r)
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
        ("SUBSCRIBE", b'{"platform":"android"}', 400, "No token"),
        ("SUBSCRIBE", b"{}", 400, "No token"),
        ("SUBSCRIBE", b'{"key":"t","refresh":"yes"}', 400, None),
        ("UNSUBSCRIBE", b"{}", 400, "No token"),
        ("UNSUBSCRIBE", b"\xff", 400, "Incorrect JSON"),
    ],
)
async def test_bad_bodies(stack: Stack, method: str, content: bytes, status: int, err: str | None) -> None:
    r = await stack.client.request(method, "/key/hello", content=content)
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json" and r.headers["server"] == "trio-dht"
    if err is not None:
        assert r.json() == {"err": err}
    assert len(stack.service.book) == 0
    r = await stack.client.request("SUBSCRIBE", f"/{KEY.hex()}", content=body())  # the connection still works
    assert r.status_code == 200
    stack.served_here(r)


@pytest.mark.parametrize("method", ["SUBSCRIBE", "UNSUBSCRIBE"])
async def test_body_over_the_limit(stack: Stack, method: str) -> None:
    r = await stack.client.request(method, "/key/hello", content=body(key="t" * 1000))
    assert r.status_code == 413 and r.json() == {"err": "Request Entity Too Large"}
    assert len(stack.service.book) == 0


async def test_a_failing_service_is_a_500(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(key: InfoHash, body: bytes) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(stack.hooks, "unsubscribe", broken)  # the service's method, as the hooks hold it
    r = await stack.client.request("UNSUBSCRIBE", "/key/hello", content=body())
    assert r.status_code == 500 and r.json() == {"err": "Internal server error"}


async def test_pipelined_raw_requests(stack: Stack) -> None:
    """Six requests in one write, on one connection: each answered in order, the stream ends cleanly."""
    await stack.dht.put(KEY, Value(b"v", id=7))
    port = int(str(stack.client.base_url).rstrip("/").rsplit(":", 1)[1])
    client = await connect(port)

    def request(method: str, path: str, content: bytes, close: bool = False) -> bytes:
        extra = "Connection: close\r\n" if close else ""
        return (
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(content)}\r\n{extra}\r\n".encode()
            + content
        )

    await client.stream.send_all(
        request("SUBSCRIBE", "/key/hello", body())
        + request("SUBSCRIBE", f"/{KEY.hex()}", body())
        + request("SUBSCRIBE", "/key/hello/", body(refresh=True))
        + request("SUBSCRIBE", "/key/hello", b"{")
        + request("UNSUBSCRIBE", "/KEY/hello", body())
        + request("UNSUBSCRIBE", "/key/hello", body(), close=True)
    )
    responses = [await client.response() for _ in range(6)]
    statuses = [int(status.split()[1]) for status, _, _ in responses]
    assert statuses == [200, 200, 200, 400, 200, 200]
    (_, new, created), (_, existing, values), (_, refreshed, empty), (_, _, bad), (_, gone, _), _ = responses
    assert (new["content-length"], created) == ("3", b"{}\n")
    assert existing["transfer-encoding"] == "chunked" and json.loads(values)["id"] == "7"
    assert refreshed["transfer-encoding"] == "chunked" and empty == b"{}\n"
    assert json.loads(bad) == {"err": "Incorrect JSON"}
    assert gone["content-length"] == "0"
    assert all(headers["content-type"] == "application/json" for _, headers, _ in responses)
    assert await client.at_eof()
    assert len(stack.service.book) == 0


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


async def test_subscriptions_per_client_address(stack: Stack) -> None:
    """Each path (front end, worker relay, Quart) hands the client's address to the caps."""
    stack.service.book.per_source = 2
    for client_id in ("a", "b"):
        r = await stack.client.request("SUBSCRIBE", "/key/hello", content=body(client_id=client_id))
        assert r.status_code == 200
    r = await stack.client.request("SUBSCRIBE", "/key/hello", content=body(client_id="c"))
    assert r.status_code == 429 and r.json() == {"err": "Too many push subscriptions from this address"}
    assert r.headers["content-type"] == "application/json"
    r = await stack.client.request("SUBSCRIBE", "/key/hello", content=body(client_id="a", refresh=True))
    assert r.status_code == 200  # a refresh is not a new subscription
    assert stack.service.book.held_by("127.0.0.1") == 2
    r = await stack.client.request("UNSUBSCRIBE", "/key/hello", content=body(client_id="a"))
    r = await stack.client.request("SUBSCRIBE", "/key/hello", content=body(client_id="c"))
    assert r.status_code == 200

    r = await stack.client.get("/node/stats")
    assert r.json()["pushSubscriptions"]["refusedPerSource"] == 1
    assert r.json()["pushSubscriptions"]["sources"] == 1
