"""The proxy client in push mode against a fake proxy (httpx.MockTransport, no sockets) on a MockClock:
SUBSCRIBE bodies of both dialects, wake-ups, timeout pushes, pushes for another session, token changes, the
refresh timer, permanent-put refreshes and request timeouts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from trio_dht.api import ValueEvent
from trio_dht.client import InvalidPushNotification, ProxyTimeout, PushResult, open_proxy_client
from trio_dht.infohash import InfoHash
from trio_dht.rest.value_json import dumps, value_from_json, value_line, value_to_json
from trio_dht.value import Value

H = 3600.0
KEY = InfoHash.get("inbox")
NODE_ID = "ab" * 20


class FakeProxy:
    """A proxy that keeps values per key and records every request (method, path, JSON body)."""

    def __init__(self, *, seed: bool = False) -> None:
        self.seed = seed
        self.values: dict[str, dict[int, Value]] = {}
        self.requests: list[tuple[str, str, object]] = []
        self.silent = False
        self.next_seed_token = 1000

    def put(self, key: InfoHash, value: Value) -> None:
        self.values.setdefault(key.hex(), {})[value.id] = value

    def remove(self, key: InfoHash, value_id: int) -> None:
        del self.values[key.hex()][value_id]

    def sent(self, method: str) -> list[object]:
        return [body for m, _, body in self.requests if m == method]

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        path = request.url.path
        self.requests.append((request.method, path, json.loads(body) if body else None))
        if self.silent:
            await trio.sleep_forever()
        if path == "/":
            return httpx.Response(200, content=dumps({"node_id": NODE_ID, "ipv4": {"good": 4}}) + b"\n")
        key = path.split("/")[2]
        if request.method == "GET":
            values = self.values.get(key, {}).values()
            return httpx.Response(200, content=b"".join(value_line(v) for v in values))
        if request.method == "SUBSCRIBE":
            if self.seed:
                self.next_seed_token += 1
                return httpx.Response(200, content=dumps({"token": self.next_seed_token}) + b"\n")
            return httpx.Response(200, content=b"{}\n")
        if request.method == "UNSUBSCRIBE":
            return httpx.Response(200)
        if request.method == "POST":
            doc = json.loads(body)
            value = value_from_json(doc)
            value.id = value.id or 4321
            self.put(InfoHash.from_hex(key), value)
            return httpx.Response(200, content=value_line(value))
        return httpx.Response(501)


@pytest.fixture
def proxy() -> FakeProxy:
    return FakeProxy()


def client_for(proxy: FakeProxy, **kwargs):
    kwargs.setdefault("push_token", "tok")
    kwargs.setdefault("client_id", "app")
    kwargs.setdefault("session_id", "S1")
    return open_proxy_client("http://proxy.test", transport=httpx.MockTransport(proxy.handle), **kwargs)


async def take(events: AsyncIterator[ValueEvent]) -> list[tuple[int, bool]]:
    """The events queued now (without waiting for more)."""
    got = []
    while True:
        try:
            event = events.receive_nowait()  # type: ignore[attr-defined]
        except trio.WouldBlock:
            return got
        got.append((event.value.id, event.expired))


async def test_listen_subscribes_and_wakeups_deliver_only_real_changes(
    proxy: FakeProxy, autojump_clock
) -> None:
    proxy.put(KEY, Value(b"one", id=1))
    async with client_for(proxy, platform="ios", topic="com.example") as dht, dht.listen(KEY) as events:
        assert dht.push_mode and dht.connected
        [subscribe] = proxy.sent("SUBSCRIBE")
        assert subscribe == {
            "client_id": "app", "key": "tok", "platform": "ios", "session_id": "S1", "topic": "com.example",
        }  # fmt: skip
        assert proxy.sent("GET")[-1:] == [None] and await take(events) == [(1, False)]  # current values first
        assert not any(path.endswith("/listen") for _, path, _ in proxy.requests)
        push = {"key": KEY.hex(), "to": "app", "t": 1717171717171, "s": "S1"}
        # the proxy's own "values exist" push right after SUBSCRIBE: nothing new
        assert await dht.push_notification_received(json.dumps(push)) is PushResult.VALUES
        assert await take(events) == []
        proxy.put(KEY, Value(b"two", id=2))
        proxy.put(KEY, Value(b"one, edited", id=1))
        as_strings = {name: str(value) for name, value in push.items()} | {"t": "1717171717200"}
        assert await dht.push_notification_received(as_strings) is PushResult.VALUES
        assert sorted(await take(events)) == [(1, False), (2, False)]
        proxy.remove(KEY, 2)
        expiry = as_strings | {"exp": "2", "t": "1717171717300"}
        assert await dht.push_notification_received(expiry) is PushResult.VALUES_EXPIRED
        assert await take(events) == [(2, True)]
        assert (
            await dht.push_notification_received(json.dumps(push | {"exp": "2"})) is PushResult.VALUES_EXPIRED
        )
        assert await take(events) == []  # an old push, and the value is gone anyway
        proxy.remove(KEY, 1)
        assert await dht.push_notification_received(as_strings | {"t": "1717171717400"}) is PushResult.VALUES
        assert await take(events) == [(1, True)]  # gone from the listing: expired
        other_key = {"key": InfoHash.get("x").hex(), "to": "app", "s": "S1"}
        assert await dht.push_notification_received(other_key) is PushResult.IGNORED_NO_OP
        with pytest.raises(InvalidPushNotification):
            await dht.push_notification_received("{not json")
    assert proxy.sent("UNSUBSCRIBE") == [{"client_id": "app", "key": "tok"}]
    assert await dht.push_notification_received(push) is PushResult.IGNORED_STOPPED


async def test_timeout_push_and_refresh_timer_resubscribe(proxy: FakeProxy, autojump_clock) -> None:
    async with client_for(proxy, subscription_refresh=5 * H) as dht, dht.listen(KEY):
        assert len(proxy.sent("SUBSCRIBE")) == 1
        await trio.sleep(2 * H)
        timeout = {"timeout": KEY.hex(), "to": "app", "s": "S1"}
        assert await dht.push_notification_received(timeout) is PushResult.LISTEN_REFRESH
        subs = proxy.sent("SUBSCRIBE")
        assert len(subs) == 2 and subs[1]["refresh"] is True
        await trio.sleep(5 * H - 60)  # the timer moved with that refresh
        assert len(proxy.sent("SUBSCRIBE")) == 2
        await trio.sleep(120)  # no timeout push came (proxy restarted, gateway down): the timer re-subscribes
        subs = proxy.sent("SUBSCRIBE")
        assert len(subs) == 3 and subs[2]["refresh"] is True
        await trio.sleep(5 * H)
        assert len(proxy.sent("SUBSCRIBE")) == 4


async def test_push_for_another_session_resubscribes(proxy: FakeProxy, autojump_clock) -> None:
    async with client_for(proxy) as dht, dht.listen(KEY) as events:
        await trio.sleep(60)
        proxy.put(KEY, Value(b"call", id=7))
        stolen = {
            "key": KEY.hex(),
            "to": "app",
            "t": "1",
            "s": "extension",
        }  # the other process subscribed last
        assert await dht.push_notification_received(stolen) is PushResult.IGNORED_WRONG_SESSION
        assert await take(events) == [(7, False)]  # not dropped: the change was fetched
        subs = proxy.sent("SUBSCRIBE")
        assert len(subs) == 2 and subs[1]["session_id"] == "S1" and subs[1]["refresh"] is True
        assert await dht.push_notification_received(stolen) is PushResult.IGNORED_WRONG_SESSION
        assert len(proxy.sent("SUBSCRIBE")) == 2  # just re-subscribed: no SUBSCRIBE ping-pong
        timeout = {"timeout": KEY.hex(), "to": "app", "s": "extension"}
        assert await dht.push_notification_received(timeout) is PushResult.IGNORED_WRONG_SESSION
        assert len(proxy.sent("SUBSCRIBE")) == 3
        other_app = {"key": KEY.hex(), "to": "another-account", "s": "S1"}
        assert await dht.push_notification_received(other_app) is PushResult.IGNORED_NO_OP


async def test_new_token_resubscribes_all_and_unsubscribes_the_old(proxy: FakeProxy, autojump_clock) -> None:
    second = InfoHash.get("second")
    async with client_for(proxy) as dht, dht.listen(KEY), dht.listen(second):
        await dht.set_push_token("tok")  # unchanged: nothing
        assert len(proxy.sent("SUBSCRIBE")) == 2
        await dht.set_push_token("new-tok")
        subs = proxy.sent("SUBSCRIBE")[2:]
        assert sorted(s["key"] for s in subs) == ["new-tok", "new-tok"] and all(s["refresh"] for s in subs)
        unsubs = [(path, body) for m, path, body in proxy.requests if m == "UNSUBSCRIBE"]
        assert sorted(unsubs) == sorted(
            [(f"/key/{k.hex()}", {"client_id": "app", "key": "tok"}) for k in (KEY, second)]
        )
        with pytest.raises(ValueError):
            await dht.set_push_token("")
    assert sorted(b["key"] for b in proxy.sent("UNSUBSCRIBE")) == ["new-tok", "new-tok", "tok", "tok"]


async def test_seed_dialect(autojump_clock) -> None:
    proxy = FakeProxy(seed=True)
    proxy.put(KEY, Value(b"one", id=1))
    async with client_for(proxy, dialect="seed") as dht, dht.listen(KEY) as events:
        assert proxy.sent("SUBSCRIBE") == [{"callback_id": "app", "key": "tok", "platform": "android"}]
        assert await take(events) == [(1, False)]
        token = dht.book.watches[KEY].seed_token
        proxy.put(KEY, Value(b"two", id=2))
        wake = json.dumps({"token": token, "callback_id": "app"})
        assert await dht.push_notification_received(wake) is PushResult.VALUES
        assert await take(events) == [(2, False)]
        timeout = {"token": str(token), "callback_id": "app", "timeout": KEY.hex()}  # strings, as FCM gives
        assert await dht.push_notification_received(timeout) is PushResult.LISTEN_REFRESH
        new_token = dht.book.watches[KEY].seed_token
        assert new_token != token and len(proxy.sent("SUBSCRIBE")) == 2
        stale = {"token": str(token), "callback_id": "app"}  # the subscription token we no longer hold
        proxy.put(KEY, Value(b"three", id=3))
        await trio.sleep(60)
        assert await dht.push_notification_received(stale) is PushResult.IGNORED_WRONG_SESSION
        assert await take(events) == [(3, False)] and len(proxy.sent("SUBSCRIBE")) == 3
    [unsub] = proxy.sent("UNSUBSCRIBE")
    assert unsub == {"callback_id": "app", "key": "tok", "token": proxy.next_seed_token}  # the latest


async def test_permanent_put_refresh(proxy: FakeProxy, autojump_clock) -> None:
    async with client_for(proxy) as dht:
        value = Value(b"presence")
        assert await dht.put(KEY, value, permanent=True)
        [post] = proxy.sent("POST")
        assert post["permanent"] == {
            "client_id": "app", "key": "tok", "platform": "android", "session_id": "S1", "topic": "",
        }  # fmt: skip
        assert value.id == 4321
        refresh = {"timeout": KEY.hex(), "to": "app", "vid": "4321", "s": "S1"}
        assert await dht.push_notification_received(refresh) is PushResult.PUT_REFRESH
        assert len(proxy.sent("POST")) == 2 and proxy.sent("POST")[1]["id"] == "4321"
        await trio.sleep(22 * H + 60)  # no push: the timer re-POSTs before the proxy's 24 h end
        assert len(proxy.sent("POST")) == 3
        assert dht.cancel_put(KEY, 4321)
        await trio.sleep(48 * H)
        assert len(proxy.sent("POST")) == 3
        assert await dht.push_notification_received(refresh) is PushResult.IGNORED_NO_OP
    async with client_for(proxy, push_token=None) as dht:
        await dht.put(KEY, Value(b"plain"), permanent=True)
        assert proxy.sent("POST")[-1]["permanent"] is True


async def test_stream_mode_ignores_pushes(proxy: FakeProxy, autojump_clock) -> None:
    async with client_for(proxy, push_token=None) as dht:
        push = {"key": KEY.hex(), "to": "app", "s": "S1"}
        assert await dht.push_notification_received(push) is PushResult.IGNORED_NO_OP


async def test_every_request_has_a_timeout(proxy: FakeProxy, autojump_clock) -> None:
    async with client_for(proxy, timeout=10.0) as dht:
        proxy.silent = True
        with pytest.raises(ProxyTimeout, match=r"GET /key/.* within 10 s"):
            await dht.get(KEY)
        with pytest.raises(ProxyTimeout, match="POST"):
            await dht.put(KEY, Value(b"x"))
        assert not (await dht.check_health()).connected
        async with dht.listen(KEY) as events:  # SUBSCRIBE timed out: retried with backoff
            assert dht.book.watches[KEY].state.value == "failed"
            proxy.silent = False
            await trio.sleep(300)
            assert dht.book.watches[KEY].state.value == "subscribed" and await take(events) == []
            assert dht.connected  # the health check ran again after the failures
        proxy.silent = True
    # closing with a subscription left: UNSUBSCRIBE is bounded too
    assert proxy.requests[-1][0] == "UNSUBSCRIBE"


async def test_value_json_of_put_bodies(proxy: FakeProxy, autojump_clock) -> None:
    async with client_for(proxy, push_token=None) as dht:
        value = Value(b"hi", id=77, utype="text/plain", prio=1)
        await dht.put(KEY, value)
        assert proxy.sent("POST") == [value_to_json(value)]
