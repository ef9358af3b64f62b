"""The whole push flow end to end (both SUBSCRIBE dialects), every piece a real process on 127.0.0.1.

* A real OpenDHT node (PyPI opendht 4.4.2) and our node (the ``trio-dht`` CLI process, with its proxy and
  ``--pushserver`` at the gorush double) form the DHT. A device-side client subscribes in push mode; the real
  node puts; the wake-up reaches the gateway double; the test hands its ``data`` to the client as the mobile
  library would (a mapping of strings); the listener gets the value. Then, with a 12 s subscription lifetime,
  the timeout push (1 s before the deadline) is handed over too, the client re-SUBSCRIBEs, and the
  subscription outlives its original deadline and still pushes.
* The same for UnifiedPush (the endpoint double's URL as token, its ``p256dh|auth`` topic: encrypted pushes)
  in the seed dialect (``callback_id``, reply ``{"token": x}``, pushes ``{token, callback_id}``).
* Our client against OpenDHT's C++ proxy (Debian ``dhtnode --proxyserver --pushserver``): get, put, a LISTEN
  stream, and push mode with dhtnode's own pushes.

A LISTEN stream killed by a proxy restart is covered by ``test_client_proxy.py``
(``test_killed_listen_stream_is_restarted_without_misses_or_duplicates``), not repeated here.
With ``CI=true`` a missing peer fails these tests instead of skipping them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio
from cli_process import LOOPBACK_NODE, TrioDhtProcess, free_tcp_port, trio_dht_process
from peers import (
    needs_dhtnode,
    needs_opendht,
    open_dhtnode_peer,
    open_opendht_peer,
    require_dhtnode,
    require_opendht,
)
from peers.opendht_peer import OpenDhtPeer

from trio_dht.api import ValueEvent
from trio_dht.client import PushResult, open_proxy_client
from trio_dht.client.proxy_client import ProxyClient
from trio_dht.client.push_state import SubscriptionState
from trio_dht.infohash import InfoHash
from trio_dht.node import open_node
from trio_dht.testing.gorush import GorushDouble, open_gorush_double
from trio_dht.testing.unifiedpush import UnifiedPushDouble, WebPushEndpoint, open_unifiedpush_double
from trio_dht.value import Value

pytestmark = pytest.mark.interop

LOOPBACK = "127.0.0.1"
MODULE = (sys.executable, "-m", "trio_dht")
LIFETIME = 12.0
"""Subscription lifetime of the proxy under test: its timeout push comes 1/12 of it (1 s) before the end."""
BOUND = 15.0
"""Safety bound on every wait (not a timing assertion)."""

Data = dict[str, Any]


def as_device_gets_it(data: Data) -> dict[str, str]:
    """A push's data as FCM / a UnifiedPush distributor hands it to the app: every value a string."""
    return {name: value if isinstance(value, str) else json.dumps(value) for name, value in data.items()}


def is_timeout(data: Data) -> bool:
    return "timeout" in data


def is_wake_up(data: Data) -> bool:
    return "timeout" not in data


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = BOUND) -> None:
    try:
        with trio.fail_after(timeout):
            while not predicate():
                await trio.sleep(0.05)
    except trio.TooSlowError:
        raise AssertionError(f"no {what} within {timeout} s") from None


async def next_event(events: trio.MemoryReceiveChannel[ValueEvent]) -> ValueEvent:
    with trio.fail_after(BOUND):
        return await events.receive()


async def no_event(events: trio.MemoryReceiveChannel[ValueEvent], wait: float = 0.5) -> None:
    with trio.move_on_after(wait):
        event = await events.receive()
        raise AssertionError(f"unexpected event {event}")


# -- where a device's pushes arrive --------------------------------------------------------------------------


class GorushInbox:
    """Pushes for one FCM token at the gorush double, taken one by one (each checked as an Android push)."""

    def __init__(self, gorush: GorushDouble, token: str) -> None:
        self.gorush = gorush
        self.token = token

    def _mine(self, match: Callable[[Data], bool]) -> list[Data]:
        return [n for n in self.gorush.notifications if n["tokens"] == [self.token] and match(n["data"])]

    async def take(self, match: Callable[[Data], bool], timeout: float = BOUND) -> Data:
        """The data of the first notification ``match`` accepts (waiting for it), removed from the double."""
        await wait_for(lambda: bool(self._mine(match)), f"push to {self.token} at gorush", timeout)
        note = self._mine(match)[0]
        self.gorush.notifications.remove(note)
        assert note["platform"] == 2
        return note["data"]

    def count(self) -> int:
        return len(self._mine(lambda _: True))


class WebPushInbox:
    """Pushes at one UnifiedPush endpoint of the double, decrypted, taken one by one."""

    def __init__(self, endpoint: WebPushEndpoint) -> None:
        self.endpoint = endpoint

    def _mine(self, match: Callable[[Data], bool]) -> list[bytes]:
        return [m for m in self.endpoint.messages if match(json.loads(m))]

    async def take(self, match: Callable[[Data], bool], timeout: float = BOUND) -> Data:
        """The first decrypted message ``match`` accepts (waiting for it), removed from the endpoint."""
        what = f"push at {self.endpoint.url} (the double refuses plain or undecryptable ones with 400)"
        await wait_for(lambda: bool(self._mine(match)), what, timeout)
        message = self._mine(match)[0]
        self.endpoint.messages.remove(message)
        # every request was an RFC 8291 message the double decrypted with the subscription's keys
        assert all(r.headers.get("content-encoding") == "aes128gcm" for r in self.endpoint.requests)
        return json.loads(message)


# -- our node's process, a real OpenDHT node, the gateway doubles --------------------------------------------


@dataclass
class SeedStack:
    process: TrioDhtProcess
    real: OpenDhtPeer
    gorush: GorushDouble
    webpush: UnifiedPushDouble
    http: httpx.AsyncClient
    url: str

    async def subscriptions(self) -> Data:
        """The proxy's ``pushSubscriptions`` stats (subscribed, refreshed, expired, timeoutPushes...)."""
        response = await self.http.get("/node/stats")
        assert response.status_code == 200, response.text
        return response.json()["pushSubscriptions"]


@asynccontextmanager
async def open_seed_stack() -> AsyncIterator[SeedStack]:
    """``trio-dht`` (node + proxy + push, lifetime :data:`LIFETIME`) joined by a real OpenDHT node."""
    async with AsyncExitStack() as stack:
        gorush = await stack.enter_async_context(open_gorush_double())
        webpush = await stack.enter_async_context(open_unifiedpush_double(require_encryption=True))
        port = free_tcp_port()
        command = [
            *MODULE,
            *LOOPBACK_NODE,
            "--proxyserver", str(port),
            "--proxy-addr", LOOPBACK,
            "--pushserver", gorush.url.removeprefix("http://"),
            "--subscription-lifetime", f"{LIFETIME:g}s",
            "--push-allow-private-endpoints",  # the UnifiedPush double listens on 127.0.0.1
        ]  # fmt: skip
        process = await stack.enter_async_context(trio_dht_process(command))
        assert process.process.returncode is None, process.output
        real = await stack.enter_async_context(open_opendht_peer(bootstrap=(LOOPBACK, process.udp_port)))
        await real.wait_for_nodes(1, timeout=BOUND)
        url = f"http://{LOOPBACK}:{port}"
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=url, trust_env=False, timeout=10))
        with trio.fail_after(BOUND):  # the proxy's node knows the real one: puts and clients see a live DHT
            while (await http.get("/node/info")).json()["ipv4"]["good"] < 1:
                await trio.sleep(0.1)
        yield SeedStack(process, real, gorush, webpush, http, url)


async def wake_up_then_timeout(
    s: SeedStack,
    app: ProxyClient,
    inbox: GorushInbox | WebPushInbox,
    key: InfoHash,
    *,
    check_wake_up: Callable[[Data], None],
    check_timeout: Callable[[Data], None],
) -> None:
    """The seed flow on one key: subscribe, a real put's wake-up, the timeout push and re-SUBSCRIBE, a put
    after the original deadline. ``check_wake_up`` / ``check_timeout`` assert the exact push data."""
    async with app.listen(key) as events:
        subscribed_by = trio.current_time()  # the proxy's deadline is at most LIFETIME after this
        assert app.book.watches[key].state is SubscriptionState.SUBSCRIBED
        assert (await s.subscriptions())["subscribed"] == 1

        assert await s.real.put(key, b"hello device", utype="text/plain")
        data = await inbox.take(is_wake_up)
        check_wake_up(data)
        assert await app.push_notification_received(as_device_gets_it(data)) is PushResult.VALUES
        event = await next_event(events)
        assert (event.value.data, event.value.utype, event.expired) == (b"hello device", "text/plain", False)
        await no_event(events)

        # The timeout push, a margin before the deadline: handed over, the client re-SUBSCRIBEs.
        data = await inbox.take(is_timeout, timeout=LIFETIME + BOUND)
        check_timeout(data)
        assert await app.push_notification_received(as_device_gets_it(data)) is PushResult.LISTEN_REFRESH
        stats = await s.subscriptions()
        assert (stats["timeoutPushes"], stats["refreshed"], stats["expired"]) == (1, 1, 0), stats

        # Past the original deadline the subscription is still there, and a put still pushes.
        await trio.sleep_until(subscribed_by + LIFETIME + 0.5)
        stats = await s.subscriptions()
        assert (stats["active"], stats["expired"], stats["subscribed"]) == (1, 0, 1), stats
        assert await s.real.put(key, b"after the first deadline", utype="text/plain")
        data = await inbox.take(is_wake_up)
        check_wake_up(data)
        assert await app.push_notification_received(as_device_gets_it(data)) is PushResult.VALUES
        event = await next_event(events)
        assert (event.value.data, event.expired) == (b"after the first deadline", False)
        await no_event(events)
    stats = await s.subscriptions()  # the listen ended: UNSUBSCRIBEd
    assert (stats["active"], stats["unsubscribed"]) == (0, 1), stats


@needs_opendht
async def test_seed_flow_android_through_gorush() -> None:
    require_opendht()
    key = InfoHash.get("seed-flow-android")
    async with (
        open_seed_stack() as s,
        open_proxy_client(s.url, push_token="fcm-token", platform="android", client_id="seed-app") as app,
    ):

        def check_wake_up(data: Data) -> None:
            assert isinstance(data["t"], int)  # milliseconds, a JSON number
            assert data == {"key": key.hex(), "to": "seed-app", "s": app.session_id, "t": data["t"]}

        def check_timeout(data: Data) -> None:
            assert data == {"timeout": key.hex(), "to": "seed-app", "s": app.session_id}

        inbox = GorushInbox(s.gorush, "fcm-token")
        await wake_up_then_timeout(
            s, app, inbox, key, check_wake_up=check_wake_up, check_timeout=check_timeout
        )


@needs_opendht
async def test_seed_flow_unifiedpush_in_the_seed_dialect() -> None:
    require_opendht()
    key = InfoHash.get("seed-flow-unifiedpush")
    async with open_seed_stack() as s:
        endpoint = s.webpush.endpoint()
        async with open_proxy_client(
            s.url, push_token=endpoint.url, platform="unifiedpush", topic=endpoint.topic,
            client_id="seed-callback", dialect="seed",
        ) as app:  # fmt: skip

            def seed_token() -> int:
                token = app.book.watches[key].seed_token  # what the SUBSCRIBE reply {"token": x} gave
                assert isinstance(token, int)
                return token

            def check_wake_up(data: Data) -> None:
                assert data == {"callback_id": "seed-callback", "token": seed_token()}

            def check_timeout(data: Data) -> None:
                assert data == {"callback_id": "seed-callback", "timeout": key.hex(), "token": seed_token()}

            await wake_up_then_timeout(
                s, app, WebPushInbox(endpoint), key, check_wake_up=check_wake_up, check_timeout=check_timeout
            )
        assert s.gorush.notifications == []


@needs_dhtnode
async def test_our_client_against_dhtnode_proxy_with_its_pushes() -> None:
    """Get, put, a LISTEN stream and push mode through OpenDHT 2.4.12's own proxy and push sender."""
    require_dhtnode()
    stream_key, push_key = InfoHash.get("seed-dhtnode-stream"), InfoHash.get("seed-dhtnode-push")
    async with (
        open_gorush_double() as gorush,
        open_dhtnode_peer(extra_args=["--pushserver", gorush.url.removeprefix("http://")]) as dhtnode,
        open_node(port=0, host=LOOPBACK, host6=None, bootstrap=[dhtnode.address]) as node,
    ):
        await dhtnode.wait_for_nodes(1, timeout=BOUND)  # so that its puts succeed (a lone dhtnode says 502)

        async with open_proxy_client(dhtnode.proxy_url) as client:
            value = Value(b"through dhtnode", utype="text/plain")
            assert await client.put(stream_key, value)
            assert value.id != 0  # from dhtnode's reply
            got = await client.get(stream_key)
            assert [(v.id, v.data, v.utype) for v in got] == [(value.id, b"through dhtnode", "text/plain")]
            async with client.listen(stream_key) as events:
                assert (await next_event(events)).value.id == value.id
                assert await node.put(stream_key, Value(b"from our node", id=77))
                event = await next_event(events)
                assert (event.value.id, event.value.data, event.expired) == (77, b"from our node", False)
                await no_event(events)

        inbox = GorushInbox(gorush, "fcm-dhtnode")
        async with open_proxy_client(
            dhtnode.proxy_url, push_token="fcm-dhtnode", platform="android", client_id="seed-app"
        ) as app:

            def check_wake_up(data: Data) -> None:  # dhtnode 2.4.12: {key, s, t, to}, t a JSON number
                assert isinstance(data["t"], int)
                assert data == {"key": push_key.hex(), "s": app.session_id, "t": data["t"], "to": "seed-app"}

            async with app.listen(push_key) as events:
                assert app.book.watches[push_key].state is SubscriptionState.SUBSCRIBED
                assert await node.put(push_key, Value(b"wake up", id=78))
                data = await inbox.take(is_wake_up)
                check_wake_up(data)
                assert await app.push_notification_received(as_device_gets_it(data)) is PushResult.VALUES
                event = await next_event(events)
                assert (event.value.id, event.value.data) == (78, b"wake up")

                # dhtnode's 22 h refresh push, as it would send it: the refresh SUBSCRIBE is accepted
                timeout = {"timeout": push_key.hex(), "to": "seed-app", "s": app.session_id}
                assert await app.push_notification_received(timeout) is PushResult.LISTEN_REFRESH
                assert await node.put(push_key, Value(b"after the refresh", id=79))
                data = await inbox.take(is_wake_up)
                check_wake_up(data)
                assert await app.push_notification_received(as_device_gets_it(data)) is PushResult.VALUES
                assert (await next_event(events)).value.id == 79
                await no_event(events)
                assert inbox.count() == 0
        # the client UNSUBSCRIBEd on leaving: dhtnode pushes no more
        assert await node.put(push_key, Value(b"nobody listens", id=80))
        with trio.move_on_after(1.0):
            await inbox.take(lambda _: True)
            raise AssertionError("dhtnode pushed after UNSUBSCRIBE")
