"""The proxy client's sans-IO core: value cache, listen book (both dialects), notifications, health, backoff,
NDJSON lines. No sockets, no clock: times are plain numbers."""

from __future__ import annotations

import json
import math

import pytest

from trio_dht.api import ValueEvent
from trio_dht.client.health import ProxyStatus, health_from_info
from trio_dht.client.ndjson import LineSplitter, LineTooLong, parse_line
from trio_dht.client.push_state import (
    InvalidPushNotification,
    ListenBook,
    Listener,
    PushResult,
    SubscriptionState,
    new_session_id,
    parse_notification,
)
from trio_dht.client.value_cache import ValueCache
from trio_dht.infohash import InfoHash
from trio_dht.push.payloads import Dialect
from trio_dht.rest.value_json import ValueJsonError, value_line
from trio_dht.value import FIELD_TYPE, Query, Value

KEY = InfoHash.get("alice")
OTHER = InfoHash.get("bob")


def v(vid: int, data: bytes = b"x", **kw) -> Value:
    return Value(data=data, id=vid, **kw)


def ids(events: list[ValueEvent]) -> list[tuple[int, bool]]:
    return [(e.value.id, e.expired) for e in events]


# -- value cache ---------------------------------------------------------------------------------------------


def test_cache_delivers_only_real_changes():
    cache = ValueCache()
    assert ids(cache.reconcile([v(1), v(2)])) == [(1, False), (2, False)]
    assert cache.reconcile([v(1), v(2)]) == []  # the same listing again: nothing
    edited = cache.reconcile([v(1, b"new"), v(2)])  # same id, new content: an edit
    assert ids(edited) == [(1, False)] and edited[0].value.data == b"new"
    assert ids(cache.reconcile([v(1, b"new"), v(3)])) == [(3, False), (2, True)]  # new, then vanished
    assert sorted(cache.values(), key=lambda x: x.id) == [cache.values()[0], cache.values()[1]]
    assert len(cache) == 2 and 1 in cache and 2 not in cache


def test_cache_refuses_older_edits():
    cache = ValueCache()
    owner = b"\x30" * 10
    cache.update(v(1, b"v5", owner=owner, seq=5))
    assert cache.update(v(1, b"v4", owner=owner, seq=4)) is None
    assert cache.update(v(1, b"v6", owner=owner, seq=6)).value.seq == 6


def test_cache_expire_and_stream_events():
    cache = ValueCache()
    assert cache.apply(ValueEvent(v(1))) is not None
    assert cache.apply(ValueEvent(v(1))) is None  # a replayed line
    assert cache.apply(ValueEvent(v(9), expired=True)) is None  # never held
    assert ids([cache.apply(ValueEvent(v(1), expired=True))]) == [(1, True)]
    assert cache.expire_ids([1]) == []


def test_cache_timestamps_stop_older_pushes():
    cache = ValueCache()
    cache.reconcile([v(1), v(2)], t=2000)  # a GET after the push of t=2000
    assert cache.expire_ids([1], t=1000) == []  # a late push from before: ignored
    assert ids(cache.expire_ids([1], t=3000)) == [(1, True)]
    assert cache.reconcile([], t=1500) == []  # a listing older than what confirmed value 2
    assert ids(cache.reconcile([], t=2500)) == [(2, True)]


def test_cache_resync_expires_what_vanished_while_down():
    cache = ValueCache()
    cache.reconcile([v(1), v(2), v(3)])
    cache.begin_resync()
    assert cache.apply(ValueEvent(v(1))) is None  # replayed on the new stream: confirmed, not repeated
    assert ids([cache.apply(ValueEvent(v(4)))]) == [(4, False)]  # new while down
    assert cache.update(v(2)) is None  # in the resync GET
    assert ids(cache.end_resync()) == [(3, True)]
    assert cache.end_resync() == []


# -- NDJSON --------------------------------------------------------------------------------------------------


def test_lines_across_chunks_and_big_values():
    big = value_line(v(7, b"z" * 40_000))
    body = value_line(v(1)) + b"\n" + big
    splitter = LineSplitter()
    lines = []
    for i in range(0, len(body), 1000):
        lines += splitter.feed(body[i : i + 1000])
    lines += splitter.end()
    assert [parse_line(line).value.id for line in lines] == [1, 7]
    assert parse_line(lines[1]).value.data == b"z" * 40_000
    assert LineSplitter().end() == []
    tail = LineSplitter()
    assert tail.feed(b'{"id":"3","data":""}') == [] and len(tail.end()) == 1


def test_line_parsing():
    assert parse_line(b"{}") is None
    event = parse_line(b'{"data":"eA==","expired":true,"id":"5","type":0}')
    assert event.expired and event.value.id == 5
    for bad in (b"nope", b"[1]", b'{"data":"!!"}'):
        with pytest.raises(ValueJsonError):
            parse_line(bad)
    splitter = LineSplitter(max_line=10)
    with pytest.raises(LineTooLong):
        splitter.feed(b"x" * 11)


# -- health --------------------------------------------------------------------------------------------------

NODE = "a" * 40


@pytest.mark.parametrize(
    ("doc", "status"),
    [
        ({"node_id": NODE, "ipv4": {"good": 3, "dubious": 1}, "ipv6": {"good": 0}}, ProxyStatus.CONNECTED),
        ({"node_id": NODE, "ipv4": {"good": 0}, "ipv6": {"good": 2}}, ProxyStatus.CONNECTED),
        ({"node_id": NODE, "ipv4": {"good": 0, "dubious": 4}}, ProxyStatus.CONNECTING),
        ({"node_id": NODE, "ipv4": {"good": 0, "dubious": 0}, "ipv6": {}}, ProxyStatus.ISOLATED),
        ({"node_id": NODE}, ProxyStatus.ISOLATED),
        ({"ipv4": {"good": 9}}, ProxyStatus.DISCONNECTED),
        ({"node_id": "zz", "ipv4": {"good": 9}}, ProxyStatus.DISCONNECTED),
        ([1, 2], ProxyStatus.DISCONNECTED),
        ({"node_id": NODE, "ipv4": {"good": "many"}}, ProxyStatus.ISOLATED),
    ],
)
def test_health_from_info(doc, status):
    health = health_from_info(doc)
    assert health.status is status
    assert health.connected == (status is ProxyStatus.CONNECTED)
    assert health.to_json()["status"] == status.value


def test_health_node_info():
    health = health_from_info({"node_id": NODE, "ipv4": {"good": 5}, "public_ip": "::ffff:127.0.0.1"})
    info = health.node_info()
    assert info.node_id.hex() == NODE and info.good == 5 and health.public_ip == "::ffff:127.0.0.1"


# -- notifications -------------------------------------------------------------------------------------------


def test_parse_notification_forms():
    data = {"key": KEY.hex(), "to": "c", "t": 1717171717171, "s": "S"}
    as_strings = parse_notification(json.dumps(data))
    assert as_strings == {"key": KEY.hex(), "to": "c", "t": "1717171717171", "s": "S"}
    assert parse_notification(json.dumps(data).encode()) == as_strings
    assert parse_notification({k: str(x) for k, x in data.items()}) == as_strings
    assert parse_notification({"data": data, "platform": 2}) == as_strings  # a gateway envelope
    assert parse_notification({"data": json.dumps(data)}) == as_strings
    for bad in ("not json", "[1]", b"\xff", 42):
        with pytest.raises(InvalidPushNotification):
            parse_notification(bad)


def book_with(*keys: InfoHash, dialect=Dialect.CURRENT, **kw) -> tuple[ListenBook, list[ValueEvent]]:
    got: list[ValueEvent] = []
    book = ListenBook(dialect=dialect, client_id="c", session_id="S", **kw)
    for key in keys:
        book.add_listener(key, Listener(None, got.append))
    return book, got


def subscribe(book: ListenBook, key: InfoHash, now: float = 0.0, reply: bytes = b"{}\n", token="tok"):
    return book.subscribed(book.watches[key], token, reply, now)


def test_current_dialect_decisions():
    book, _ = book_with(KEY)
    subscribe(book, KEY)
    push = {"key": KEY.hex(), "to": "c", "t": "5000", "s": "S"}
    d = book.interpret(push, 1.0)
    assert (d.result, d.fetch, d.t) == (PushResult.VALUES, (KEY,), 5000)
    d = book.interpret(push | {"exp": "12,13"}, 1.0)
    assert (d.result, d.expire, d.fetch) == (PushResult.VALUES_EXPIRED, (KEY, (12, 13)), ())
    d = book.interpret(push | {"exp": ""}, 1.0)  # no usable id: a full fetch
    assert d.result is PushResult.VALUES
    d = book.interpret({"timeout": KEY.hex(), "to": "c", "s": "S"}, 1.0)
    assert (d.result, d.resubscribe) == (PushResult.LISTEN_REFRESH, (KEY,))
    nothing = [
        {"key": OTHER.hex(), "to": "c", "s": "S"},  # not listened to
        {"timeout": OTHER.hex(), "to": "c", "s": "S"},
        {"key": KEY.hex(), "to": "another-app", "s": "S"},  # another client id on the device
        {"key": "not a hash", "s": "S"},
        {"to": "c", "pong": "true"},  # a ping
        {"message": "hello"},  # not a DHT push at all
        {"timeout": KEY.hex(), "vid": "77", "s": "S"},  # a put we do not hold
    ]
    for data in nothing:
        assert book.interpret(data, 1.0).result is PushResult.IGNORED_NO_OP, data
    assert book.interpret(push, 1.0, stopped=True).result is PushResult.IGNORED_STOPPED
    assert book.interpret(push, 1.0, push_mode=False).result is PushResult.IGNORED_NO_OP
    assert book.interpret({"key": KEY.hex()}, 1.0).result is PushResult.VALUES  # no "s": accepted
    assert book.interpret({"key": KEY.hex(), "t": "soon"}, 1.0).t is None


def test_put_refresh_push():
    book, _ = book_with()
    book.hold_put(KEY, v(77), now=0.0)
    d = book.interpret({"timeout": KEY.hex(), "vid": "77", "to": "c", "s": "S"}, 1.0)
    assert (d.result, d.refresh_put) == (PushResult.PUT_REFRESH, (KEY, 77))
    d = book.interpret({"timeout": KEY.hex(), "vid": "77", "to": "c", "s": "old"}, 1.0)
    assert (d.result, d.refresh_put) == (PushResult.IGNORED_WRONG_SESSION, (KEY, 77))
    assert book.drop_put(KEY, 77) and not book.drop_put(KEY, 77)


def test_push_for_another_session_fetches_and_resubscribes():
    book, _ = book_with(KEY, resubscribe_guard=30.0)
    subscribe(book, KEY, now=0.0)
    push = {"key": KEY.hex(), "to": "c", "t": "1", "s": "extension"}
    d = book.interpret(push, 100.0)
    assert (d.result, d.fetch, d.resubscribe) == (PushResult.IGNORED_WRONG_SESSION, (KEY,), (KEY,))
    subscribe(book, KEY, now=100.0)
    d = book.interpret(push, 110.0)  # re-subscribed 10 s ago: fetch only, no ping-pong of SUBSCRIBEs
    assert (d.fetch, d.resubscribe) == ((KEY,), ())
    d = book.interpret({"timeout": KEY.hex(), "to": "c", "s": "extension"}, 110.0)
    assert (d.result, d.fetch, d.resubscribe) == (PushResult.IGNORED_WRONG_SESSION, (), (KEY,))
    d = book.interpret({"key": OTHER.hex(), "to": "c", "s": "extension"}, 110.0)
    assert (d.result, d.fetch, d.resubscribe) == (PushResult.IGNORED_WRONG_SESSION, (), ())


def test_current_dialect_bodies():
    book, _ = book_with(KEY)
    watch = book.watches[KEY]
    first = book.subscribe_body(watch, "tok", platform="android", topic="", refresh=False)
    assert first == {"client_id": "c", "key": "tok", "platform": "android", "session_id": "S", "topic": ""}
    again = book.subscribe_body(watch, "tok", platform="ios", topic="com.x", refresh=True)
    assert again["refresh"] is True and again["topic"] == "com.x"
    assert book.unsubscribe_body(watch) is None  # never subscribed
    subscribe(book, KEY)
    assert book.unsubscribe_body(watch) == {"client_id": "c", "key": "tok"}


def test_subscribe_replies_current_dialect():
    book, _ = book_with(KEY)
    assert subscribe(book, KEY, reply=b"{}\n") is None
    listing = value_line(v(1)) + value_line(v(2))
    assert [x.id for x in subscribe(book, KEY, reply=listing)] == [1, 2]
    assert subscribe(book, KEY, reply=b"") == []  # an existing subscription, no values
    with pytest.raises(ValueError):
        subscribe(book, KEY, reply=b"garbage\n")


def test_seed_dialect():
    book, _ = book_with(KEY, OTHER, dialect=Dialect.SEED, resubscribe_guard=30.0)
    watch = book.watches[KEY]
    body = book.subscribe_body(watch, "devtok", platform="android", topic="", refresh=False)
    assert body == {"callback_id": "c", "key": "devtok", "platform": "android"}
    assert subscribe(book, KEY, reply=b'{"token": 4242}\n', token="devtok") is None
    subscribe(book, OTHER, reply=b'{"token": "99"}', token="devtok")
    assert book.unsubscribe_body(watch) == {"callback_id": "c", "key": "devtok", "token": 4242}
    with pytest.raises(ValueError):
        subscribe(book, KEY, reply=b"{}")
    # values as strings, as mobile push libraries hand them over
    d = book.interpret({"token": "4242", "callback_id": "c"}, 1.0)
    assert (d.result, d.fetch) == (PushResult.VALUES, (KEY,))
    d = book.interpret(parse_notification({"token": 99, "callback_id": "c"}), 1.0)
    assert (d.result, d.fetch) == (PushResult.VALUES, (OTHER,))
    d = book.interpret({"token": "4242", "callback_id": "c", "timeout": KEY.hex()}, 1.0)
    assert (d.result, d.resubscribe) == (PushResult.LISTEN_REFRESH, (KEY,))
    assert (
        book.interpret({"token": "4242", "callback_id": "other-app"}, 1.0).result is PushResult.IGNORED_NO_OP
    )
    assert book.interpret({"callback_id": "c"}, 1.0).result is PushResult.IGNORED_NO_OP
    # a subscription token we do not hold: another session's (or a previous run's)
    d = book.interpret({"token": "1", "callback_id": "c", "timeout": KEY.hex()}, 1.0)
    assert (d.result, d.resubscribe) == (PushResult.IGNORED_WRONG_SESSION, (KEY,))
    d = book.interpret({"token": "1", "callback_id": "c"}, 100.0)
    assert d.result is PushResult.IGNORED_WRONG_SESSION
    assert set(d.fetch) == {KEY, OTHER} and set(d.resubscribe) == {KEY, OTHER}
    d = book.interpret({"token": "1", "callback_id": "c"}, 10.0)  # all subscribed < 30 s ago
    assert set(d.fetch) == {KEY, OTHER} and d.resubscribe == ()


def test_subscription_deadlines_and_retries():
    book, _ = book_with(KEY, subscription_refresh=5 * 3600.0)
    watch = book.watches[KEY]
    assert book.subscription_due(watch, "tok", 0.0) and book.next_subscription_action(watch) == -math.inf
    subscribe(book, KEY, now=100.0)
    assert watch.state is SubscriptionState.SUBSCRIBED
    assert book.next_subscription_action(watch) == 100.0 + 5 * 3600
    assert not book.subscription_due(watch, "tok", 100.0 + 5 * 3600 - 1)
    assert book.subscription_due(watch, "tok", 100.0 + 5 * 3600)
    assert book.subscription_due(watch, "new-token", 200.0)  # a new token: re-subscribe now
    retry = book.subscribe_failed(watch, 1000.0)
    assert watch.state is SubscriptionState.FAILED and 1000.0 < retry < 1002.0
    assert not book.subscription_due(watch, "tok", 1000.0) and book.subscription_due(watch, "tok", retry)
    second = book.subscribe_failed(watch, retry) - retry
    assert second > retry - 1000.0  # backing off
    book.retry_now(watch, 1500.0)
    assert book.subscription_due(watch, "tok", 1500.0)


def test_listeners_share_a_watch_and_see_held_values_first():
    book, first = book_with(KEY)
    watch = book.watches[KEY]
    watch.publish(watch.cache.reconcile([v(1), v(2, type=3)]))
    typed: list[ValueEvent] = []
    second = Listener(Query(where=((FIELD_TYPE, 3),)), typed.append)
    assert book.add_listener(KEY, second) == (watch, False)
    assert ids(typed) == [(2, False)] and ids(first) == [(1, False), (2, False)]
    assert book.remove_listener(KEY, second) is None
    assert book.remove_listener(KEY, watch.listeners[0]) is watch and KEY not in book.watches
    assert book.remove_listener(KEY, second) is None


def test_held_puts_refresh_deadlines():
    book, _ = book_with(put_refresh=22 * 3600.0)
    assert book.next_put_refresh() == math.inf
    held = book.hold_put(KEY, v(5), now=0.0)
    assert book.next_put_refresh() == 22 * 3600 and book.puts_due(22 * 3600 - 1) == []
    assert book.puts_due(22 * 3600) == [held]
    book.put_refreshed(held, 22 * 3600)
    assert book.next_put_refresh() == 44 * 3600


def test_session_ids():
    a, b = new_session_id(), new_session_id()
    assert len(a) == 8 and a != b
