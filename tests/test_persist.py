"""SQLite state: subscriptions and permanent puts survive a reopen, with absolute deadlines."""

import sqlite3

import pytest
import trio

from trio_dht.infohash import InfoHash
from trio_dht.persist import PersistError, StateStore, StoredPut, StoredSubscription
from trio_dht.push.dispatcher import Dispatcher
from trio_dht.push.gateway import Outcome
from trio_dht.push.payloads import Platform, PushKind
from trio_dht.push.service import PushService
from trio_dht.testing.memory_dht import MemoryDht

H = 3600.0
KEY = InfoHash.get("k")


def row(sid, deadline, state="active"):
    return StoredSubscription(
        sid, "current", "tok", bytes(KEY), f"c{sid}", "s", "android", "", deadline, state
    )


def test_rows_round_trip_and_survive_reopen(tmp_path):
    path = tmp_path / "state.db"
    with StateStore(path) as store:
        store.save_subscription(row(1, 1000.5))
        store.save_subscription(row(2, 2000.0))
        store.save_subscription(row(1, 3000.0, "timeout-push-sent"))  # replaces
        store.delete_subscriptions([2])
        store.save_put(StoredPut(bytes(KEY), 7, b"\x82packed", 5000.0, token="t", platform="ios"))
        store.save_put(StoredPut(bytes(KEY), 8, b"x", 6000.0))
        store.delete_put(bytes(KEY), 8)
    # Nothing is lost without a clean close either: each change is its own committed transaction.
    store = StateStore(path)
    assert store.load_subscriptions() == [row(1, 3000.0, "timeout-push-sent")]
    assert store.load_puts() == [StoredPut(bytes(KEY), 7, b"\x82packed", 5000.0, token="t", platform="ios")]
    raw = sqlite3.connect(path)
    raw.execute("INSERT INTO subscriptions VALUES (9, 'current', 't', x'00', '', '', '', '', 1.0, 'active')")
    raw.commit()
    raw.close()
    assert len(store.load_subscriptions()) == 1 and store.skipped == 1
    store.close()


def test_a_foreign_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(PersistError):
        StateStore(bad)


class Recorder:
    name = "rec"
    max_batch = 10

    def __init__(self):
        self.pushes = []

    def lane(self, push):
        return 0

    async def send(self, pushes):
        self.pushes.extend(pushes)
        return [Outcome.DELIVERED] * len(pushes)


async def test_service_restores_subscriptions_with_absolute_deadlines(tmp_path, autojump_clock):
    path = tmp_path / "state.db"
    wall = [1_800_000_000.0]
    body = b'{"key":"tok","client_id":"c","session_id":"s","platform":"android"}'
    async with trio.open_nursery() as nursery:
        store = StateStore(path)
        service = PushService(MemoryDht(), Dispatcher({}), store=store, wall_clock=lambda: wall[0])
        await nursery.start(service.run)
        assert (await service.subscribe(KEY, body)).status == 200
        await service.subscribe(InfoHash.get("gone"), body)
        service.unsubscribe(InfoHash.get("gone"), b'{"key":"tok","client_id":"c"}')
        nursery.cancel_scope.cancel()  # as abrupt as it gets: no save on shutdown exists
    [stored] = StateStore(path).load_subscriptions()
    assert stored.deadline == wall[0] + 6 * H
    # Restart 5 h later (wall clock): the subscription has 1 h left, its timeout push is due in 30 min.
    wall[0] += 5 * H
    dht, gateway = MemoryDht(), Recorder()
    async with trio.open_nursery() as nursery:
        dispatcher = Dispatcher({Platform.ANDROID: gateway})
        service = PushService(dht, dispatcher, store=StateStore(path), wall_clock=lambda: wall[0])
        await nursery.start(dispatcher.run)
        await nursery.start(service.run)
        assert len(service.book) == 1 and service.stats["restored"] == 1
        await trio.sleep(1)
        assert dht.listener_count(KEY) == 1
        await trio.sleep(0.5 * H - 10)
        assert gateway.pushes == []
        await trio.sleep(20)
        assert [p.kind for p in gateway.pushes] == [PushKind.TIMEOUT]
        assert gateway.pushes[0].data["s"] == "s"
        await trio.sleep(0.5 * H)
        assert len(service.book) == 0 and dht.listener_count(KEY) == 0
        nursery.cancel_scope.cancel()
    assert StateStore(path).load_subscriptions() == []


async def test_expired_rows_are_dropped_and_startup_is_spread(tmp_path, autojump_clock):
    path = tmp_path / "state.db"
    now_wall = 1_800_000_000.0
    with StateStore(path) as store:
        store.save_subscription(row(1, now_wall - 10))
        for sid in range(2, 12):
            key = InfoHash.get(str(sid))
            store.save_subscription(
                StoredSubscription(
                    sid, "current", "tok", bytes(key), "c", "", "android", "", now_wall + H, "active"
                )
            )
    dht = MemoryDht()
    async with trio.open_nursery() as nursery:
        service = PushService(
            dht, Dispatcher({}), store=StateStore(path), wall_clock=lambda: now_wall, startup_rate=2
        )
        await nursery.start(service.run)
        assert len(service.book) == 10
        await trio.sleep(0.1)
        assert 1 <= dht.listener_count() < 10  # 2 per second
        await trio.sleep(5)
        assert dht.listener_count() == 10
        nursery.cancel_scope.cancel()
    assert len(StateStore(path).load_subscriptions()) == 10
