"""SQLite state: subscriptions and permanent puts survive a reopen, with absolute deadlines."""

import logging
import os
import sqlite3

import pytest
import trio

from trio_dht.infohash import InfoHash
from trio_dht.node.saved_state import NodeState, SavedNode, SavedValue
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
    raw.execute(
        "INSERT INTO subscriptions (sid, dialect, token, key, client_id, session_id, platform, topic,"
        " deadline, state) VALUES (9, 'current', 't', x'00', '', '', '', '', 1.0, 'active')"
    )
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


SUB_COLUMNS = "sid, dialect, token, key, client_id, session_id, platform, topic, deadline, state, source"
PUT_COLUMNS = "key, value_id, value, deadline, token, client_id, session_id, platform, topic, source"


def test_rows_of_the_wrong_type_are_skipped_and_counted(tmp_path, caplog):
    path = tmp_path / "state.db"
    with StateStore(path) as store:
        store.save_subscription(row(1, 5000.0))
        store.save_put(StoredPut(bytes(KEY), 7, b"v", 5000.0))
    raw = sqlite3.connect(path)
    key = bytes(KEY)
    bad_subscriptions = [
        (2, "current", b"tok", key, "c", "s", "android", "", 5000.0, "active", ""),  # token a blob
        (3, "current", "t", "not bytes", "c", "s", "android", "", 5000.0, "active", ""),
        (4, "current", "t", key, "c", "s", "android", "", "soon", "active", ""),  # deadline text
        (5, "current", "t", key, b"\x00", "s", "android", "", 5000.0, "active", ""),  # client_id a blob
        (6, "current", "t", key, "c", "s", "android", "", 5000.0, "active", b"\x07"),  # source a blob
        (7, "current", "t", key, "c", "s", "android", "", float("inf"), "active", ""),
    ]
    raw.executemany(
        f"INSERT INTO subscriptions ({SUB_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", bad_subscriptions
    )
    bad_puts = [
        (key, "seven", b"v", 5000.0, "", "", "", "", "", ""),  # value id text
        (key, 8, "text", 5000.0, "", "", "", "", "", ""),  # value text
        (b"short", 9, b"v", 5000.0, "", "", "", "", "", ""),
        (key, 10, b"v", "later", "", "", "", "", "", ""),
        (key, 11, b"v", 5000.0, b"t", "", "", "", "", ""),  # token a blob
    ]
    raw.executemany(f"INSERT INTO permanent_puts ({PUT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)", bad_puts)
    raw.commit()
    raw.close()
    with StateStore(path) as store:
        assert store.load_subscriptions() == [row(1, 5000.0)]
        assert store.load_puts() == [StoredPut(bytes(KEY), 7, b"v", 5000.0)]
        assert store.skipped == len(bad_subscriptions) + len(bad_puts)
    assert sum("skipping a row" in r.message for r in caplog.records) == store.skipped


def test_every_64_bit_value_id_round_trips(tmp_path):
    path = tmp_path / "state.db"
    ids = [1, 2**31, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 1]
    with StateStore(path) as store:
        for vid in ids:
            store.save_put(StoredPut(bytes(KEY), vid, b"v", 5000.0))
        store.delete_put(bytes(KEY), 2**63 + 1)
    with StateStore(path) as store:
        assert sorted(p.value_id for p in store.load_puts()) == [i for i in ids if i != 2**63 + 1]


def test_a_schema_1_file_is_read_and_upgraded(tmp_path):
    path = tmp_path / "old.db"
    raw = sqlite3.connect(path)
    raw.executescript(
        """
        CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema', '1');
        CREATE TABLE subscriptions (sid INTEGER PRIMARY KEY, dialect TEXT NOT NULL, token TEXT NOT NULL,
            key BLOB NOT NULL, client_id TEXT NOT NULL, session_id TEXT NOT NULL, platform TEXT NOT NULL,
            topic TEXT NOT NULL, deadline REAL NOT NULL, state TEXT NOT NULL);
        CREATE TABLE permanent_puts (key BLOB NOT NULL, value_id INTEGER NOT NULL, value BLOB NOT NULL,
            deadline REAL NOT NULL, token TEXT NOT NULL DEFAULT '', client_id TEXT NOT NULL DEFAULT '',
            session_id TEXT NOT NULL DEFAULT '', platform TEXT NOT NULL DEFAULT '',
            topic TEXT NOT NULL DEFAULT '', PRIMARY KEY (key, value_id));
        """
    )
    raw.execute(
        "INSERT INTO subscriptions VALUES (1, 'current', 'tok', ?, 'c1', 's', 'android', '', 9.0, 'active')",
        (bytes(KEY),),
    )
    raw.execute(
        "INSERT INTO permanent_puts (key, value_id, value, deadline) VALUES (?, 42, x'01', 9.0)",
        (bytes(KEY),),
    )
    raw.commit()
    raw.close()
    with StateStore(path) as store:
        assert store.load_subscriptions() == [row(1, 9.0)]
        assert store.load_puts() == [StoredPut(bytes(KEY), 42, b"\x01", 9.0)]
        store.save_put(StoredPut(bytes(KEY), 2**64 - 1, b"v", 9.0, source="10.0.0.1"))
    with StateStore(path) as store:
        assert store.load_puts()[-1].source == "10.0.0.1"
        assert store.load_node_state() is None  # the node state's tables were added, empty
    newer = tmp_path / "newer.db"
    raw = sqlite3.connect(newer)
    raw.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
    raw.execute("INSERT INTO meta VALUES ('schema', '99')")
    raw.commit()
    raw.close()
    with pytest.raises(PersistError, match="schema version 99"):
        StateStore(newer)


def test_the_file_is_private(tmp_path, caplog):
    import stat

    path = tmp_path / "state.db"
    old_umask = os.umask(0o022)
    try:
        with StateStore(path) as store:
            store.save_subscription(row(1, 5000.0))  # the -wal and -shm files exist now
            siblings = [p for p in tmp_path.iterdir() if p.name.startswith("state.db")]
            assert {p.name for p in siblings} >= {"state.db", "state.db-wal", "state.db-shm"}
            for p in siblings:
                assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    finally:
        os.umask(old_umask)
    assert "others may read" not in caplog.text
    path.chmod(0o644)
    StateStore(path).close()
    assert "has mode 644: others may read" in caplog.text


def test_a_write_that_fails_is_a_counted_persist_error(tmp_path):
    path = tmp_path / "state.db"
    store = StateStore(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    with pytest.raises(PersistError, match="locked"):
        store.save_subscription(row(1, 5000.0))
    with pytest.raises(PersistError):
        store.save_put(StoredPut(bytes(KEY), 7, b"v", 5000.0))
    with pytest.raises(PersistError):
        store.delete_subscriptions([1])
    assert store.write_errors == 3
    other.execute("ROLLBACK")
    other.close()
    store.save_subscription(row(1, 5000.0))  # the file works again
    assert store.load_subscriptions() == [row(1, 5000.0)]
    store.close()


def test_a_read_only_file_refuses_writes(tmp_path, caplog, read_only):
    path = tmp_path / "state.db"
    StateStore(path).close()
    with read_only(path), StateStore(path) as store:
        assert "read-only" in caplog.text
        with pytest.raises(PersistError, match="readonly"):
            store.save_subscription(row(1, 5000.0))
        assert store.load_subscriptions() == []


def test_failed_writes_log_one_line_per_ten_seconds(tmp_path, caplog, monkeypatch):
    """A full disk or a dead file fails every stranger's write: the log gets a line per 10 s, not each."""
    now = [1000.0]
    monkeypatch.setattr("trio_dht.persist.monotonic", lambda: now[0])
    store = StateStore(tmp_path / "state.db")
    store._db.close()  # every write now fails at once
    for _ in range(100):
        with pytest.raises(PersistError):
            store.save_subscription(row(1, 5000.0))
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert store.write_errors == 100 and len(errors) == 1
    now[0] += 10
    with pytest.raises(PersistError):
        store.save_put(StoredPut(bytes(KEY), 7, b"v", 5000.0))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and "(100 such events since the last such line)" in errors[1]


def test_the_node_state_round_trips_and_replaces_the_last_one(tmp_path):
    path = tmp_path / "state.db"
    first = NodeState(
        bytes(KEY),
        (
            SavedNode(bytes(InfoHash.get("a")), "192.0.2.1", 4222),
            SavedNode(bytes(InfoHash.get("b")), "::1", 5),
        ),
        (SavedValue(bytes(KEY), b"packed", 1_000_000.5, "192.0.2.1"),),
    )
    with StateStore(path) as store:
        assert store.load_node_state() is None
        store.save_node_state(first)
        store.save_node_state(NodeState(bytes(KEY), first.nodes[:1], None))  # the values stay
    with StateStore(path) as store:
        assert store.load_node_state() == NodeState(bytes(KEY), first.nodes[:1], first.values)
        store.save_node_state(NodeState(bytes(KEY), (), ()))
        assert store.load_node_state() == NodeState(bytes(KEY), (), ())


def test_bad_node_state_rows_are_skipped(tmp_path, caplog):
    path = tmp_path / "state.db"
    with StateStore(path) as store:
        store.save_node_state(NodeState(bytes(KEY), (SavedNode(bytes(KEY), "192.0.2.1", 4222),)))
    raw = sqlite3.connect(path)
    raw.execute("INSERT INTO dht_nodes VALUES (x'01', '192.0.2.2', 4222)")  # a short id
    raw.execute("INSERT INTO dht_nodes VALUES (?, '192.0.2.3', 0)", (bytes(KEY),))  # no port
    raw.execute("INSERT INTO dht_values VALUES (?, x'00', 'soon', '')", (bytes(KEY),))  # not a number
    raw.commit()
    raw.close()
    with StateStore(path) as store:
        state = store.load_node_state()
        assert state is not None and [n.host for n in state.nodes] == ["192.0.2.1"] and state.values == ()
        assert store.skipped == 3
    raw = sqlite3.connect(path)
    raw.execute("UPDATE meta SET value = 'zz' WHERE name = 'node_id'")
    raw.commit()
    raw.close()
    with StateStore(path) as store:
        assert store.load_node_state() is None and store.skipped == 1
    assert "bad node id" in caplog.text
