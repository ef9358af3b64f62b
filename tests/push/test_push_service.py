"""The push service against an in-memory DHT: replies, pushes, deadlines (MockClock hours), refresh."""

import json

import pytest
import trio

from trio_dht.infohash import InfoHash
from trio_dht.push.dispatcher import DeliveryQueue, Dispatcher
from trio_dht.push.gateway import Outcome
from trio_dht.push.payloads import Platform, PushKind
from trio_dht.push.service import PushService
from trio_dht.testing.memory_dht import MemoryDht
from trio_dht.value import Value

H = 3600.0
KEY = InfoHash.get("device-key")
WALL = 1_800_000_000.0


class RecordingGateway:
    name = "recording"
    max_batch = 100

    def __init__(self):
        self.pushes = []
        self.gone: set[str] = set()

    def lane(self, push):
        return 0

    async def send(self, pushes):
        self.pushes.extend(pushes)
        return [Outcome.TOKEN_GONE if p.token in self.gone else Outcome.DELIVERED for p in pushes]

    def take(self):
        out, self.pushes = self.pushes, []
        return out


def body(**fields) -> bytes:
    return json.dumps(
        {"key": "tok", "client_id": "c", "session_id": "s1", "platform": "android"} | fields
    ).encode()


@pytest.fixture  # tests using it take ``autojump_clock`` themselves (pytest-trio reads it there)
async def stack(nursery):
    dht = MemoryDht(lifetime=lambda value: 100 * H)
    gateway = RecordingGateway()
    platforms = {p: gateway for p in Platform}
    dispatcher = Dispatcher(platforms, queue=DeliveryQueue(batch_window=0.01))
    service = PushService(dht, dispatcher, wall_clock=lambda: WALL)
    await nursery.start(dht.run)  # expiry events of callback listens
    await nursery.start(dispatcher.run)
    await nursery.start(service.run)
    return dht, gateway, service


async def test_subscribe_replies_and_pushes_for_present_then_new_values(stack, autojump_clock):
    dht, gateway, service = stack
    await dht.put(KEY, Value(b"present", id=1))
    reply = await service.subscribe(KEY, body())
    assert (reply.status, reply.body, reply.chunked) == (200, b"{}\n", False)
    await trio.sleep(1)
    [push] = gateway.take()
    assert push.data == {"key": KEY.hex(), "s": "s1", "t": int(WALL * 1000), "to": "c"} and push.high_priority
    await dht.put(KEY, Value(b"new", id=2, prio=1))
    await trio.sleep(1)
    [push] = gateway.take()
    assert not push.high_priority and push.kind is PushKind.VALUES
    assert dht.listener_count(KEY) == 1 and service.push_listeners_count == 1


async def test_existing_subscription_replies(stack, autojump_clock):
    dht, _, service = stack
    await dht.put(KEY, Value(b"v", id=5))
    await service.subscribe(KEY, body())
    refresh = await service.subscribe(KEY, body(refresh=True))
    assert (refresh.status, refresh.body, refresh.chunked) == (200, b"{}\n", True)
    again = await service.subscribe(KEY, body())
    assert again.chunked and [v.id for v in again.values] == [5]


async def test_timeout_push_before_deadline_and_listen_ends_at_it(stack, autojump_clock):
    dht, gateway, service = stack
    await service.subscribe(KEY, body())
    await trio.sleep(5.5 * H - 10)
    assert gateway.take() == []
    await trio.sleep(20)
    [push] = gateway.take()
    assert push.kind is PushKind.TIMEOUT and push.data == {"s": "s1", "timeout": KEY.hex(), "to": "c"}
    assert dht.listener_count(KEY) == 1
    await trio.sleep(0.5 * H)  # now 6 h + 10 s
    assert dht.listener_count(KEY) == 0 and len(service.book) == 0 and service.watched_keys == 0
    await dht.put(KEY, Value(b"late", id=9))
    await trio.sleep(1)
    assert gateway.take() == []


async def test_refresh_moves_the_timeout_push_and_the_listen_deadline(stack, autojump_clock):
    dht, gateway, service = stack
    start = trio.current_time()
    await service.subscribe(KEY, body())
    await trio.sleep(3 * H)
    await service.subscribe(KEY, body(refresh=True, session_id="s2"))
    await trio.sleep(5.5 * H - 10)  # past the first deadline (6 h)
    assert gateway.take() == [] and dht.listener_count(KEY) == 1
    await trio.sleep(20)
    [push] = gateway.take()
    assert push.kind is PushKind.TIMEOUT and push.data["s"] == "s2"
    assert 8.5 * H <= trio.current_time() - start <= 8.5 * H + 11
    await trio.sleep(0.5 * H)
    assert dht.listener_count(KEY) == 0


async def test_opendht_lifetime_24h(nursery, autojump_clock):
    dht, gateway = MemoryDht(), RecordingGateway()
    dispatcher = Dispatcher({Platform.ANDROID: gateway})
    service = PushService(dht, dispatcher, lifetime=24 * H)
    await nursery.start(dispatcher.run)
    await nursery.start(service.run)
    await service.subscribe(KEY, body())
    await trio.sleep(22 * H - 1)
    assert gateway.take() == []
    await trio.sleep(2)
    assert [p.kind for p in gateway.take()] == [PushKind.TIMEOUT]
    await trio.sleep(2 * H)
    assert dht.listener_count(KEY) == 0


async def test_subscriptions_share_one_listen_and_late_joiners_are_woken(stack, autojump_clock):
    dht, gateway, service = stack
    await service.subscribe(KEY, body())
    await dht.put(KEY, Value(b"v", id=1))
    await trio.sleep(1)
    gateway.take()
    await service.subscribe(KEY, body(client_id="c2"))
    await trio.sleep(1)
    [push] = gateway.take()
    assert push.data["to"] == "c2"
    assert dht.listener_count(KEY) == 1
    await dht.put(KEY, Value(b"w", id=2))
    await trio.sleep(1)
    assert sorted(p.data["to"] for p in gateway.take()) == ["c", "c2"]


async def test_expired_value_push_carries_exp(nursery, autojump_clock):
    dht, gateway = MemoryDht(), RecordingGateway()
    dispatcher = Dispatcher({Platform.ANDROID: gateway})
    service = PushService(dht, dispatcher)
    await nursery.start(dht.run)
    await nursery.start(dispatcher.run)
    await nursery.start(service.run)
    await service.subscribe(KEY, body())
    await dht.put(KEY, Value(b"short", id=500))  # type 0 lives 10 min
    await trio.sleep(1)
    gateway.take()
    await trio.sleep(600)
    [push] = gateway.take()
    assert push.data["exp"] == "500" and not push.high_priority


async def test_unsubscribe_stops_the_listen_and_errors(stack, autojump_clock):
    dht, _, service = stack
    await service.subscribe(KEY, body())
    await trio.sleep(0)
    reply = service.unsubscribe(KEY, b'{"key":"tok","client_id":"c"}')
    assert (reply.status, reply.body) == (200, b"")
    await trio.sleep(1)
    assert dht.listener_count(KEY) == 0
    assert service.unsubscribe(KEY, b'{"key":"tok","client_id":"c"}').status == 200
    for call in (service.unsubscribe(KEY, b"{}"), await service.subscribe(KEY, b'{"platform":"ios"}')):
        assert (call.status, call.body) == (400, b'{"err":"No token"}\n')
    assert (await service.subscribe(KEY, b"nope")).body == b'{"err":"Incorrect JSON"}\n'


async def test_seed_dialect(stack, autojump_clock):
    dht, gateway, service = stack
    reply = await service.subscribe(KEY, b'{"key":"dev","callback_id":"cb","platform":"android"}')
    token = json.loads(reply.body)["token"]
    assert reply.status == 200 and isinstance(token, int)
    again = await service.subscribe(KEY, b'{"key":"dev","callback_id":"cb","platform":"android"}')
    assert json.loads(again.body) == {"token": token}
    await dht.put(KEY, Value(b"v", id=1))
    await trio.sleep(1)
    assert [p.data for p in gateway.take()] == [{"callback_id": "cb", "token": token}]
    await trio.sleep(5.5 * H)
    assert [p.data for p in gateway.take()] == [{"callback_id": "cb", "timeout": KEY.hex(), "token": token}]
    service.unsubscribe(KEY, json.dumps({"key": "dev", "token": token, "callback_id": "cb"}).encode())
    assert len(service.book) == 0


async def test_dead_tokens_are_pruned(stack, autojump_clock):
    dht, gateway, service = stack
    gateway.gone.add("tok")
    await service.subscribe(KEY, body())
    await service.subscribe(InfoHash.get("other"), body())
    await dht.put(KEY, Value(b"v", id=1))
    await trio.sleep(1)
    assert len(service.book) == 0 and service.stats["pruned"] == 2
    assert dht.listener_count() == 0


async def test_unifiedpush_endpoints_are_guarded(stack, autojump_clock):
    _, _, service = stack
    reply = await service.subscribe(KEY, body(platform="unifiedpush", key="http://127.0.0.1:8080/up/x"))
    assert reply.status == 400 and b"Bad endpoint" in reply.body
    reply = await service.subscribe(KEY, body(platform="unifiedpush", key="ftp://push.example/x"))
    assert reply.status == 400
    reply = await service.subscribe(KEY, body(platform="unifiedpush", key="https://push.example:8443/up/x"))
    assert reply.status == 200


async def test_subscriptions_per_source_answer_429(nursery, autojump_clock):
    from trio_dht.limits import Limits

    dht = MemoryDht()
    service = PushService(dht, Dispatcher({}), limits=Limits(subscriptions_per_source=2))
    await nursery.start(service.run)
    for client in ("a", "b"):
        assert (await service.subscribe(KEY, body(client_id=client), "192.0.2.1")).status == 200
    refused = await service.subscribe(KEY, body(client_id="c"), "192.0.2.1")
    assert refused.status == 429
    assert json.loads(refused.body) == {"err": "Too many push subscriptions from this address"}
    assert (await service.subscribe(KEY, body(client_id="a", refresh=True), "192.0.2.1")).status == 200
    assert (await service.subscribe(KEY, body(client_id="c"), "192.0.2.2")).status == 200
    assert service.unsubscribe(KEY, b'{"key":"tok","client_id":"a"}').status == 200
    assert (await service.subscribe(KEY, body(client_id="d"), "192.0.2.1")).status == 200
    assert service.book.refused_per_source == 1 and len(service.book) == 3


async def test_a_state_file_that_refuses_writes_changes_nothing(tmp_path, nursery, autojump_clock):
    import sqlite3

    from trio_dht.persist import StateStore

    path = tmp_path / "state.db"
    dht = MemoryDht()
    store = StateStore(path)
    service = PushService(dht, Dispatcher({}), store=store, wall_clock=lambda: WALL)
    await nursery.start(service.run)
    start = trio.current_time()
    assert (await service.subscribe(KEY, body(client_id="kept"), "192.0.2.1")).status == 200
    [before] = store.load_subscriptions()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock: every write fails
    await trio.sleep(H)
    new = await service.subscribe(InfoHash.get("other key"), body(client_id="new"), "192.0.2.1")
    refresh = await service.subscribe(KEY, body(client_id="kept", refresh=True, session_id="s9"), "192.0.2.9")
    gone = service.unsubscribe(KEY, b'{"key":"tok","client_id":"kept"}')
    for reply in (new, refresh, gone):
        assert reply.status == 503
        assert json.loads(reply.body) == {"err": "Cannot save the change: state file unavailable"}
    [sub] = service.book
    assert (sub.client_id, sub.session_id, sub.deadline) == ("kept", "s1", start + 6 * H)
    assert dht.listener_count(InfoHash.get("other key")) == 0 and service.watched_keys == 1
    assert service.stats["save-errors"] == 3 and store.write_errors == 3
    other.execute("ROLLBACK")
    other.close()
    assert store.load_subscriptions() == [before]  # memory and disk agree
    assert service.unsubscribe(KEY, b'{"key":"tok","client_id":"kept"}').status == 200
    assert store.load_subscriptions() == [] and len(service.book) == 0
