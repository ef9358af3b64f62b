"""Push notifications end to end with real OpenDHT peers: our proxy and push service before our real node.

* A real OpenDHT node (PyPI opendht 4.4.2), bootstrapped to our node, puts on a subscribed key: the gorush
  double gets the Android and the iOS notification, the UnifiedPush double decrypts the Web Push message.
* Subscribing to a key that already holds values pushes at once; a value expiring pushes with ``exp``.
* OpenDHT's C++ proxy client (``dhtnode --proxyclient URL --devicekey TOKEN``) listens through our proxy by
  SUBSCRIBE, and a put from the real node reaches the gorush double for its token.

With ``CI=true`` a missing peer fails these tests instead of skipping them.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio
from peers import (
    needs_dhtnode,
    needs_opendht,
    open_dhtnode_proxy_client,
    require_dhtnode,
    require_opendht,
)
from peers.opendht_peer import OpenDhtPeer
from test_proxy_interop import _put_over_the_wire, join_node_and_real_peer

from trio_dht.infohash import InfoHash
from trio_dht.node import DhtNode
from trio_dht.proxy import ProxyConfig, serve_proxy
from trio_dht.proxy.push_hooks import CountingGateway, ProxyPushHooks, PushCounts
from trio_dht.push.dispatcher import DeliveryQueue, Dispatcher
from trio_dht.push.gateway import new_http_client
from trio_dht.push.gorush import GorushGateway
from trio_dht.push.payloads import Platform
from trio_dht.push.service import PushService
from trio_dht.push.unifiedpush import UnifiedPushGateway
from trio_dht.testing.gorush import GorushDouble, open_gorush_double
from trio_dht.testing.unifiedpush import UnifiedPushDouble, open_unifiedpush_double
from trio_dht.value import Value

pytestmark = [pytest.mark.interop, needs_opendht]

LOOPBACK = "127.0.0.1"
BUNDLE_ID = "com.example.app"


@dataclass
class PushStack:
    node: DhtNode
    real: OpenDhtPeer
    gorush: GorushDouble
    webpush: UnifiedPushDouble
    service: PushService
    http: httpx.AsyncClient
    url: str

    async def subscribe(self, key: InfoHash, fields: dict[str, Any]) -> httpx.Response:
        return await self.http.request("SUBSCRIBE", f"{self.url}/key/{key.hex()}", json=fields)

    async def notifications(self, count: int, timeout: float = 10) -> list[dict[str, Any]]:
        """Wait until the gorush double holds ``count`` notifications; take them."""
        with trio.fail_after(timeout):
            while len(self.gorush.notifications) < count:
                await trio.sleep(0.02)
        out = list(self.gorush.notifications)
        self.gorush.notifications.clear()
        return out


@asynccontextmanager
async def open_push_stack() -> AsyncIterator[PushStack]:
    """Our node, proxy and push service; a real OpenDHT node in the DHT; gorush and Web Push doubles."""
    async with AsyncExitStack() as stack:
        node, real = await join_node_and_real_peer(stack)
        gorush = await stack.enter_async_context(open_gorush_double())
        webpush = await stack.enter_async_context(open_unifiedpush_double())
        client = await stack.enter_async_context(new_http_client())
        http = await stack.enter_async_context(httpx.AsyncClient(trust_env=False, timeout=10))
        counts = PushCounts()
        gorush_gateway = CountingGateway(GorushGateway(client, gorush.url, bundle_id=BUNDLE_ID), counts)
        gateways = dict.fromkeys((Platform.ANDROID, Platform.IOS, Platform.NONE), gorush_gateway)
        gateways[Platform.UNIFIEDPUSH] = CountingGateway(
            UnifiedPushGateway(client, allow_private=True), counts
        )
        dispatcher = Dispatcher(gateways, queue=DeliveryQueue(batch_window=0.005))
        service = PushService(node, dispatcher, lifetime=24 * 3600, allow_private_endpoints=True)
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        await nursery.start(dispatcher.run)
        await nursery.start(service.run)
        urls = await nursery.start(
            lambda task_status: serve_proxy(
                node,
                ProxyConfig(host=LOOPBACK, port=0),
                push=ProxyPushHooks(service, dispatcher, counts),
                task_status=task_status,
            )
        )
        url = next(u for u in urls if u.startswith("http://"))
        yield PushStack(node, real, gorush, webpush, service, http, url)


def assert_values_data(data: dict[str, Any], key: InfoHash, client_id: str, session: str) -> None:
    assert set(data) == {"key", "s", "t", "to"}
    assert (data["key"], data["to"], data["s"]) == (key.hex(), client_id, session)
    assert abs(data["t"] - time.time() * 1000) < 60_000


async def test_real_node_put_reaches_android_ios_and_unifiedpush() -> None:
    require_opendht()
    async with open_push_stack() as s:
        key = InfoHash.get("push-interop-three-platforms")
        endpoint = s.webpush.endpoint()
        for fields in (
            {"key": "fcm-token", "platform": "android", "client_id": "ca", "session_id": "sa"},
            {"key": "apns-token", "platform": "ios", "client_id": "ci", "session_id": "si"},
            {"key": endpoint.url, "platform": "unifiedpush", "client_id": "cu", "session_id": "su",
             "topic": endpoint.topic},
        ):  # fmt: skip
            r = await s.subscribe(key, fields)
            assert (r.status_code, r.content) == (200, b"{}\n")
        assert s.service.push_listeners_count == 3

        assert await s.real.put(key, b"from the real node", utype="text/plain")

        notes = sorted(await s.notifications(2), key=lambda n: n["platform"])
        ios, android = notes
        assert android["platform"] == 2 and android["tokens"] == ["fcm-token"]
        assert android["android"] == {"priority": "high", "ttl": "86400s"} and "topic" not in android
        assert_values_data(android["data"], key, "ca", "sa")
        assert ios["platform"] == 1 and ios["tokens"] == ["apns-token"] and ios["topic"] == BUNDLE_ID
        assert (ios["priority"], ios["push_type"], ios["mutable_content"]) == ("high", "alert", True)
        assert ios["alert"] == {"title": "hello"} and ios["expiration"] > time.time() + 23 * 3600
        assert_values_data(ios["data"], key, "ci", "si")

        with trio.fail_after(10):
            while not endpoint.messages:
                await trio.sleep(0.02)
        [request] = endpoint.requests
        assert request.headers["content-encoding"] == "aes128gcm"
        assert (request.headers["ttl"], request.headers["urgency"]) == ("86400", "high")
        assert_values_data(json.loads(endpoint.messages[0]), key, "cu", "su")

        stats = (await s.http.get(f"{s.url}/node/stats")).json()
        assert stats["pushListenersCount"] == 3
        assert stats["androidPush"]["highPriorityCount"] == 1 and stats["iosPush"]["highPriorityCount"] == 1
        assert stats["unifiedPush"]["highPriorityCount"] == 1


async def test_subscribe_to_stored_values_pushes_at_once_and_expiry_pushes_carry_exp() -> None:
    require_opendht()
    async with open_push_stack() as s:
        key = InfoHash.get("push-interop-stored")
        assert await s.real.put(key, b"already there", utype="text/plain")
        with trio.fail_after(10):
            while not await s.node.get(key):
                await trio.sleep(0.05)

        r = await s.subscribe(key, {"key": "tok-stored", "platform": "android", "client_id": "c"})
        assert (r.status_code, r.content) == (200, b"{}\n")
        [note] = await s.notifications(1)
        assert note["tokens"] == ["tok-stored"] and note["android"]["priority"] == "high"
        assert_values_data(note["data"], key, "c", "")

        # A type-5 value (60 s of life) created 52 s ago: a push now, and one with "exp" about 8 s later.
        short = Value(data=b"ice", type=5, id=0x103)
        await _put_over_the_wire(s.node, key, short, created=int(time.time()) - 52)
        [note] = await s.notifications(1)
        assert "exp" not in note["data"] and note["android"]["priority"] == "high"
        [note] = await s.notifications(1, timeout=15)
        assert note["data"]["exp"] == str(0x103) and note["android"]["priority"] == "normal"
        assert note["data"]["key"] == key.hex()


@needs_dhtnode
async def test_cpp_proxy_client_subscribes_through_our_proxy() -> None:
    require_opendht()
    require_dhtnode()
    async with (
        open_push_stack() as s,
        open_dhtnode_proxy_client(s.url, devicekey="cpp-client-token") as client,
    ):
        key = InfoHash.get("push-interop-cpp-client")
        async with client.listen(key.hex()):
            with trio.fail_after(10):  # its listen becomes a SUBSCRIBE
                while s.service.push_listeners_count < 1:
                    await trio.sleep(0.05)
            [sub] = list(s.service.book)
            assert (sub.token, sub.client_id, sub.key) == ("cpp-client-token", "dhtnode", key)

            assert await s.real.put(key, b"for the cpp client", utype="text/plain")
            notes = await s.notifications(1)
            assert [n["tokens"] for n in notes] == [["cpp-client-token"]]
            assert notes[0]["data"]["to"] == "dhtnode" and notes[0]["data"]["key"] == key.hex()
            assert notes[0]["data"]["s"] == sub.session_id != ""
