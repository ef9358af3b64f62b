"""Sans-IO parts of the proxy: the {hash} rule, path matching, value JSON, rate limits, permanent puts."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import NoReturn

import pytest

from trio_dht.infohash import InfoHash
from trio_dht.proxy.permanent import LIFETIME, REFRESH_MARGIN, PermanentPuts
from trio_dht.proxy.ratelimit import HttpRateLimiter
from trio_dht.proxy.settings import ProxyConfig, RateLimit
from trio_dht.proxy.streams import ListenFeed, ListenRegistry, ListenStream
from trio_dht.rest.keys import decode_unreserved, hash_from_segment
from trio_dht.rest.paths import canonical_path
from trio_dht.rest.value_json import (
    PushTarget,
    ValueJsonError,
    owner_pem,
    put_request_from_json,
    value_from_json,
    value_line,
    value_to_json,
)
from trio_dht.testing.memory_dht import MemoryDht
from trio_dht.value import Value

HEX = "03b4fb47d3a9e3a5c6fa8e9b6e2b9d4c1a2f3e4d"


def sha1(data: bytes) -> InfoHash:
    return InfoHash(hashlib.sha1(data).digest())


# -- {hash} --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("segment", "key"),
    [
        (HEX.encode(), InfoHash.from_hex(HEX)),
        (HEX.upper().encode(), InfoHash.from_hex(HEX)),
        (HEX.encode() + b"zzz", InfoHash.from_hex(HEX)),  # first 40 used
        (HEX.encode() + b"0", InfoHash.from_hex(HEX)),
        (HEX[:39].encode(), sha1(HEX[:39].encode())),  # too short: hashed
        (b"hello", sha1(b"hello")),
        (b"hello%20world", sha1(b"hello%20world")),  # reserved escapes stay
        (b"0" * 40, sha1(b"0" * 40)),  # all zeroes: hashed
        (b"g" + HEX[1:].encode(), sha1(b"g" + HEX[1:].encode())),
    ],
)
def test_hash_rule(segment: bytes, key: InfoHash) -> None:
    assert hash_from_segment(segment) == key


def test_hello_is_sha1_of_hello() -> None:
    assert hash_from_segment(b"hello").hex() == "aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d"


def test_decode_unreserved_only() -> None:
    assert decode_unreserved(b"a%7Eb%7ec%20d%2Fe%41") == b"a~b~c%20d%2FeA"
    assert decode_unreserved(b"%zz%4") == b"%zz%4"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"/", "/"),
        (b"/node/info", "/node/info"),
        (b"/NODE/Info/", "/node/info"),
        (b"/node/stats", "/node/stats"),
        (b"/node/pingpush", "/node/pingPush"),
        (b"/key/hello", "/key/aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d"),
        (b"/KEY/hello/?where=x", "/key/aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d"),
        (b"/key/hello/Listen", "/key/aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d/listen"),
        (b"/key/hello/options", "/key/aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d/options"),
        (b"/hello", "/aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d"),
        (b"/h%65llo", "/aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d"),
        (b"/key", "/" + sha1(b"key").hex()),  # legacy route on "key", as RESTinio
        (b"/key/", "/" + sha1(b"key").hex()),
        (b"/stats", "/" + sha1(b"stats").hex()),
        (b"/node/unknown", None),
        (b"/key/h/unknown", None),
        (b"/h/listen", None),
        (b"//x", None),
        (b"/a/b/c/d", None),
        (b"relative", None),
    ],
)
def test_canonical_path(raw: bytes, expected: str | None) -> None:
    match = canonical_path(raw)
    assert (match[0] if match else None) == expected


# -- value JSON ----------------------------------------------------------------------------------------------


def test_value_json_matches_opendht() -> None:
    v = Value(data=b"hello", id=12345)
    assert value_line(v) == b'{"data":"aGVsbG8=","id":"12345","type":0}\n'
    v = Value(data=b"x", id=42, prio=1, utype="text/plain")
    assert value_line(v) == b'{"data":"eA==","id":"42","prio":1,"type":0,"utype":"text/plain"}\n'
    assert value_line(Value(data=b"exp", id=900), expired=True) == (
        b'{"data":"ZXhw","expired":true,"id":"900","type":0}\n'
    )


KEY = InfoHash.get("feed")


def test_value_lines_are_cached_on_the_value() -> None:
    v = Value(data=b"hello", id=5)
    line, expired = value_line(v), value_line(v, expired=True)
    assert value_line(v) is line and value_line(v, expired=True) is expired and b'"expired"' in expired
    assert line == b'{"data":"aGVsbG8=","id":"5","type":0}\n'
    assert value_line(dataclasses.replace(v, data=b"x")) == b'{"data":"eA==","id":"5","type":0}\n'
    unset = Value(data=b"x")  # an id about to be assigned: not cached
    assert value_line(unset) == b'{"data":"eA==","id":"0","type":0}\n'
    unset.id = 9
    assert value_line(unset) == b'{"data":"eA==","id":"9","type":0}\n'


async def test_listen_feed_lines_close_and_registry() -> None:
    dht = MemoryDht()
    await dht.put(KEY, Value(data=b"a", id=1))
    registry = ListenRegistry()
    calls: list[int] = []
    feed = ListenFeed(dht, KEY, registry, lambda: calls.append(1))
    assert feed in registry and feed.ready and dht.listener_count(KEY) == 1
    assert feed.take() == b'{"data":"YQ==","id":"1","type":0}\n' and not feed.ready
    await dht.put(KEY, Value(data=b"b", id=2))
    await dht.put(KEY, Value(data=b"c", id=3))
    assert feed.take() == value_line(Value(data=b"b", id=2)) + value_line(Value(data=b"c", id=3))
    assert len(calls) == 3  # one per value
    feed.close()  # the shutdown: the writer sends what waits, then the last chunk
    assert feed.ended and not feed.overflowed and not registry and dht.listener_count(KEY) == 0
    assert len(calls) == 4 and feed.ready and feed.take() == b""
    feed.close()
    feed.cancel()
    await dht.put(KEY, Value(data=b"d", id=4))
    assert len(calls) == 4 and feed.take() == b""


async def test_listen_feed_overflow() -> None:
    dht = MemoryDht()
    registry = ListenRegistry(max_backlog=10_000)
    feed = ListenFeed(dht, KEY, registry, lambda: None)
    for vid in range(1, 4):
        await dht.put(KEY, Value(data=b"x" * 2000, id=vid))
    assert not feed.ended
    await dht.put(KEY, Value(data=b"x" * 2000, id=4))  # past 10 000 bytes waiting: the client does not read
    assert feed.ended and feed.overflowed and feed.take() == b""
    assert not registry and dht.listener_count(KEY) == 0 and registry.overflows == 1


async def test_listen_registry_counts_streams_per_address() -> None:
    dht = MemoryDht()
    registry = ListenRegistry(per_address=2)
    assert registry.reserve("2001:db8::1") and registry.reserve("2001:db8::1")
    feeds = [ListenFeed(dht, KEY, registry, lambda: None, "2001:db8::1") for _ in range(2)]
    assert not registry.reserve("2001:db8::2")  # the same /64
    assert registry.reserve("2001:db8:0:1::1") and registry.reserve("127.0.0.1") and registry.reserve(None)
    assert registry.refused == 1 and len(registry) == 2
    feeds[0].cancel()
    feeds[0].cancel()  # idempotent: released once
    assert registry.held("2001:db8::2") == 1 and len(registry) == 1
    assert registry.reserve("2001:db8::2") and registry.held("2001:db8::2") == 2
    feeds[1].cancel()
    assert len(registry) == 0 and registry.held("2001:db8::2") == 1


async def test_listen_stream_holds_its_slot_once() -> None:
    dht = MemoryDht()
    registry = ListenRegistry(per_address=1)
    assert registry.reserve("192.0.2.1")
    stream = ListenStream(dht, KEY, registry, "192.0.2.1")
    assert not registry.reserve("192.0.2.1")  # reserved at admission, before the body is entered
    async with stream:
        assert registry.held("192.0.2.1") == 1 and len(registry) == 1
        stream.release()  # nothing once entered
        assert registry.held("192.0.2.1") == 1
    assert registry.held("192.0.2.1") == 0 and len(registry) == 0
    assert registry.reserve("192.0.2.1")
    never = ListenStream(dht, KEY, registry, "192.0.2.1")  # its response never started
    never.release()
    never.release()
    assert registry.held("192.0.2.1") == 0
    assert registry.reserve("192.0.2.1")
    dropped = ListenStream(dht, KEY, registry, "192.0.2.1")
    del dropped  # collected without being entered: the slot comes back
    assert registry.held("192.0.2.1") == 0


async def test_listen_feed_of_a_failing_dht() -> None:
    class Failing(MemoryDht):
        def add_listener(self, *args: object, **kwargs: object) -> NoReturn:
            raise RuntimeError("no")

    registry = ListenRegistry()
    feed = ListenFeed(Failing(), KEY, registry, lambda: None)
    assert feed.ended and not feed.overflowed and not registry


def test_encrypted_value_carries_only_cypher() -> None:
    v = Value(cypher=b"\x01\x02", id=7, type=3, prio=1, push_type="audioCall")
    assert value_to_json(v) == {"cypher": "AQI=", "id": "7", "prio": 1, "pt": "audioCall"}
    back = value_from_json(json.loads(value_line(v)))
    assert back.cypher == b"\x01\x02" and back.id == 7 and back.prio == 1 and back.push_type == "audioCall"


def test_signed_value_round_trip() -> None:
    owner = bytes(range(200))
    v = Value(data=b"d", type=4, id=1, seq=3, owner=owner, signature=b"s" * 64, recipient=b"\x09" * 20)
    obj = value_to_json(v)
    assert obj["owner"].startswith("-----BEGIN PUBLIC KEY-----\n") and obj["owner"].endswith("-----\n")
    assert obj["to"] == "09" * 20 and obj["seq"] == 3
    back = value_from_json(obj)
    assert back.same_content(v) and back.signed_bytes() == v.signed_bytes()
    assert owner_pem(back.owner or b"") == obj["owner"]


@pytest.mark.parametrize(
    ("obj", "vid"),
    [
        ({"id": "12345"}, 12345),
        ({"id": 42}, 42),
        ({}, 0),
        ({"id": "abc"}, 0),
        ({"id": -1}, 0),
        ({"id": 2**64}, 0),
    ],
)
def test_value_id_forms(obj: dict, vid: int) -> None:
    assert value_from_json(obj).id == vid


def test_base64_padding_optional() -> None:
    assert value_from_json({"data": "aGVsbG8"}).data == b"hello"


@pytest.mark.parametrize(
    "obj",
    [
        [],
        "x",
        {"data": "!!!not base64***"},
        {"data": 5},
        {"type": "0"},
        {"type": 1.5},
        {"type": True},
        {"type": 70000},
        {"owner": "not pem"},
        {"owner": "-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n"},
        {"owner": owner_pem(b"k"), "to": "zz"},
        {"prio": -1},
        {"utype": {}},
    ],
)
def test_bad_values_refused(obj: object) -> None:
    with pytest.raises(ValueJsonError):
        put_request_from_json(obj)


def test_permanent_member() -> None:
    assert not put_request_from_json({"data": ""}).permanent
    assert not put_request_from_json({"data": "", "permanent": False}).permanent  # unlike OpenDHT
    plain = put_request_from_json({"data": "", "permanent": True})
    assert plain.permanent and plain.push is None
    pushed = put_request_from_json(
        {"permanent": {"key": 123, "client_id": "c", "platform": "android", "session_id": "s"}}
    )
    assert pushed.push == PushTarget("123", "c", "android", "s", "")
    assert put_request_from_json({"permanent": {"key": ""}}).push is None


# -- rate limit ----------------------------------------------------------------------------------------------


def test_rate_limit_bucket() -> None:
    limiter = HttpRateLimiter(RateLimit(per_second=10, burst=3))
    assert [limiter.allow("192.0.2.1", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("192.0.2.2", 0.0)  # another client
    assert not limiter.allow("::ffff:192.0.2.1", 0.0)  # same client, mapped
    assert limiter.allow("192.0.2.1", 0.1)  # refilled one token
    assert limiter.refused == 2


def test_rate_limit_loopback_and_prefixes() -> None:
    limiter = HttpRateLimiter(RateLimit(per_second=1, burst=1))
    assert all(limiter.allow("127.0.0.1", 0.0) for _ in range(10))
    assert all(limiter.allow("::1", 0.0) for _ in range(10))
    assert limiter.allow("2001:db8::1", 0.0)
    assert not limiter.allow("2001:db8::2", 0.0)  # same /64
    assert limiter.allow("not-an-ip", 0.0)
    strict = HttpRateLimiter(RateLimit(per_second=1, burst=1, loopback=True))
    assert strict.allow("127.0.0.1", 0.0) and not strict.allow("127.0.0.1", 0.0)


def test_rate_limit_table_is_bounded() -> None:
    limiter = HttpRateLimiter(RateLimit(per_second=1, burst=1), max_clients=10)
    for i in range(100):
        limiter.allow(f"10.0.0.{i}", float(i) * 0.01)
    assert len(limiter._buckets) <= 10


# -- config --------------------------------------------------------------------------------------------------


def test_config_binds() -> None:
    assert ProxyConfig().binds() == (["[::]:8000"], [])
    cfg = ProxyConfig(host="127.0.0.1", port=1, tls_port=2, certificate="c", private_key="k")
    assert cfg.binds() == (["127.0.0.1:1"], ["127.0.0.1:2"])
    with pytest.raises(ValueError):
        ProxyConfig(tls_port=2)
    with pytest.raises(ValueError):
        ProxyConfig(port=None)


# -- permanent puts ------------------------------------------------------------------------------------------


def test_permanent_puts_merge_renew_and_expire() -> None:
    book = PermanentPuts()
    key = InfoHash.get("k")
    push = PushTarget("tok", "cid", "android", "s1")
    held = book.record(key, Value(data=b"v"), push, now=0.0)
    assert held.value.id and book.total == 1 and book.key_count == 1
    # an id-less POST of the same content, token and client renews it
    same = book.find_same(key, Value(data=b"v"), PushTarget("tok", "cid", session_id="s2"))
    assert same is held
    assert book.find_same(key, Value(data=b"v"), PushTarget("other", "cid")) is None
    assert book.find_same(key, Value(data=b"w"), push) is None
    book.renew(held, PushTarget("tok", "cid", session_id="s2"), now=100.0)
    assert held.expires_at == 100.0 + LIFETIME and held.push and held.push.session_id == "s2"
    # the refresh warning keeps its first time (as OpenDHT's merge path)
    expired, warn = book.due(LIFETIME - REFRESH_MARGIN)
    assert expired == [] and warn == [held]
    expired, warn = book.due(LIFETIME)  # the first expiry time is stale after the renewal
    assert expired == [] and warn == []
    expired, warn = book.due(100.0 + LIFETIME)
    assert expired == [held] and book.total == 0 and book.key_count == 0


def test_permanent_put_without_push_has_no_warning() -> None:
    book = PermanentPuts()
    held = book.record(InfoHash.get("k"), Value(data=b"v", id=5), None, now=0.0)
    assert held.value.id == 5 and held.refresh_at is None
    assert book.due(LIFETIME) == ([held], [])


def test_permanent_heap_stays_compact() -> None:
    book = PermanentPuts()
    key = InfoHash.get("k")
    for i in range(1000):
        book.record(key, Value(data=b"v", id=1), PushTarget("t"), now=float(i))
    assert len(book._heap) <= 64 + 4 * book.total + 2


class _Journal:
    """A journal that records what it is asked to write, or refuses every write."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.saved_rows: list[tuple[int, float]] = []

    def saved(self, held) -> None:
        from trio_dht.persist import PersistError

        if self.fail:
            raise PersistError("disk full")
        self.saved_rows.append((held.value.id, held.expires_at))

    def removed(self, key: InfoHash, value_id: int) -> None:
        pass

    def load(self) -> list:
        return []

    def stats(self) -> dict[str, int]:
        return {}


def test_permanent_puts_per_source_are_capped_and_counted_down() -> None:
    from trio_dht.proxy.permanent import TooManyPuts

    book = PermanentPuts(per_source=2)
    key = InfoHash.get("k")
    book.record(key, Value(data=b"a", id=1), None, 0.0, "10.0.0.1")
    book.record(key, Value(data=b"b", id=2), None, 0.0, "10.0.0.1")
    with pytest.raises(TooManyPuts):
        book.record(key, Value(data=b"c", id=3), None, 0.0, "10.0.0.1")
    assert book.refused == 1 and book.total == 2 and book.held_by("10.0.0.1") == 2
    # Re-POSTing a held id is a refresh, whoever sends it: no new slot, the creator keeps it.
    again = book.record(key, Value(data=b"a2", id=1), None, 5.0, "10.0.0.2")
    assert again.source == "10.0.0.1" and book.held_by("10.0.0.2") == 0 and again.expires_at == 5.0 + LIFETIME
    book.record(key, Value(data=b"c", id=3), None, 0.0, "10.0.0.2")  # another source, its own cap
    for i in range(5):
        book.record(key, Value(data=b"x", id=10 + i), None, 0.0, "")  # unknown source: not capped
    assert book.source_count == 3
    # Expiry gives the slots back.
    book.due(LIFETIME + 1.0)
    assert book.held_by("10.0.0.1") == 1 and book.held_by("10.0.0.2") == 0
    book.record(key, Value(data=b"d", id=4), None, 10.0, "10.0.0.1")
    assert book.held_by("10.0.0.1") == 2


def test_a_permanent_put_the_journal_refuses_changes_nothing() -> None:
    from trio_dht.persist import PersistError

    journal = _Journal()
    book = PermanentPuts(journal)
    key = InfoHash.get("k")
    push = PushTarget("tok", "cid", "android", "s1")
    held = book.record(key, Value(data=b"v", id=1), push, 0.0, "10.0.0.1")
    assert journal.saved_rows == [(1, LIFETIME)]
    journal.fail = True
    with pytest.raises(PersistError):
        book.record(key, Value(data=b"new", id=2), None, 0.0, "10.0.0.1")
    with pytest.raises(PersistError):
        book.record(key, Value(data=b"v2", id=1), PushTarget("tok", "cid", session_id="s2"), 50.0)
    with pytest.raises(PersistError):
        book.renew(held, PushTarget("tok", "cid", session_id="s3"), 60.0)
    assert book.total == 1 and book.held_by("10.0.0.1") == 1
    assert (held.value.data, held.expires_at, held.push, held.refresh_at) == (
        b"v",
        LIFETIME,
        push,
        LIFETIME - REFRESH_MARGIN,
    )
    assert book.due(LIFETIME - REFRESH_MARGIN) == ([], [held])  # its deadlines did not move either
    assert book.due(LIFETIME) == ([held], [])


def test_client_source_buckets() -> None:
    from trio_dht.proxy.routes import client_source

    assert client_source("192.0.2.7") == "192.0.2.7"
    assert client_source("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_source("2001:db8:1:2:aaaa::1") == client_source("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::"
    assert client_source("2001:db8:1:3::1") != client_source("2001:db8:1:2::1")
    assert client_source(None) == client_source("") == client_source("not-an-ip") == ""


def test_permanent_puts_bytes_in_all_are_capped() -> None:
    from trio_dht.proxy.permanent import TooManyPuts

    key = InfoHash.get("k")
    size = len(Value(data=b"x" * 1000, id=1).packed())
    book = PermanentPuts(max_bytes=3 * size)
    for vid in (1, 2, 3):
        book.record(key, Value(data=b"x" * 1000, id=vid), None, 0.0, f"10.0.0.{vid}")
    assert book.bytes == 3 * size
    with pytest.raises(TooManyPuts) as refused:
        book.record(key, Value(data=b"y" * 1000, id=4), None, 0.0, "10.0.0.9")
    assert refused.value.status == 503 and book.refused_full == 1 and book.total == 3
    with pytest.raises(TooManyPuts):  # a refresh that grows is refused too; one that does not, is not
        book.record(key, Value(data=b"x" * 1001, id=1), None, 1.0)
    book.record(key, Value(data=b"z" * 10, id=1), None, 1.0)
    assert book.bytes == 2 * size + len(Value(data=b"z" * 10, id=1).packed())
    book.record(key, Value(data=b"y" * 500, id=4), None, 1.0, "10.0.0.9")  # room again
    book.due(LIFETIME + 2.0)
    assert book.bytes == 0 and book.total == 0


def test_permanent_puts_bytes_per_source_are_capped() -> None:
    from trio_dht.proxy.permanent import TooManyPuts

    key = InfoHash.get("k")
    size = len(Value(data=b"x" * 1000, id=1).packed())
    book = PermanentPuts(bytes_per_source=2 * size)
    book.record(key, Value(data=b"x" * 1000, id=1), None, 0.0, "10.0.0.1")
    book.record(key, Value(data=b"x" * 1000, id=2), None, 0.0, "10.0.0.1")
    with pytest.raises(TooManyPuts) as refused:
        book.record(key, Value(data=b"x" * 10, id=3), None, 0.0, "10.0.0.1")
    assert refused.value.status == 429 and book.refused == 1
    with pytest.raises(TooManyPuts):  # a refresh that grows counts for the source that made the put
        book.record(key, Value(data=b"x" * 1001, id=1), None, 0.0, "10.0.0.2")
    book.record(key, Value(data=b"x" * 10, id=3), None, 0.0, "10.0.0.2")  # another source
    book.record(key, Value(data=b"x", id=1), None, 1.0)  # shrinking makes room
    book.record(key, Value(data=b"x" * 500, id=4), None, 1.0, "10.0.0.1")
    assert book.held_by("10.0.0.1") == 3
    book.due(LIFETIME + 2.0)
    assert book.bytes == 0 and book.source_count == 0


def test_rate_limit_table_frees_a_quarter_at_once() -> None:
    """A full table of busy clients frees a quarter in one pass (oldest first): the next new clients find room
    without a scan each; clients whose buckets refilled go before busy ones."""
    limiter = HttpRateLimiter(RateLimit(per_second=1, burst=2), max_clients=100)
    for i in range(100):
        assert limiter.allow(f"10.0.0.{i}", 0.0) and limiter.allow(f"10.0.0.{i}", 0.0)
    assert limiter.allow("10.0.1.0", 0.5)  # full, all busy: the oldest 25 go in one pass
    assert len(limiter) == 76 and limiter.evicted == 25
    calls = 0
    original = limiter._prune

    def counting(now: float) -> None:
        nonlocal calls
        calls += 1
        original(now)

    limiter._prune = counting  # type: ignore[method-assign]
    for i in range(24):
        assert limiter.allow(f"10.0.2.{i}", 0.5)
    assert calls == 0 and len(limiter) == 100
    assert not limiter.allow("10.0.0.99", 0.5)  # a busy client kept its bucket
    # idle ones (refilled after 2 s) go first, even when newer than busy ones
    limiter = HttpRateLimiter(RateLimit(per_second=1, burst=2), max_clients=8)
    for i in range(8):
        limiter.allow(f"10.0.0.{i}", 0.0 if i < 4 else 5.0)
    for i in range(4):
        limiter.allow(f"10.0.0.{i}", 11.0)  # the oldest four are busy again
    limiter.allow("10.0.3.0", 11.5)
    assert all(f"10.0.0.{i}" in limiter._buckets for i in range(4))


def test_rate_limit_clients_from_limits() -> None:
    from trio_dht.limits import Limits
    from trio_dht.proxy.state import ProxyState
    from trio_dht.testing.memory_dht import MemoryDht

    state = ProxyState(MemoryDht(), ProxyConfig(limits=Limits(http_rate_clients=7)))
    assert state.limiter is not None and state.limiter.max_clients == 7
