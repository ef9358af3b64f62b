"""The routing table (trio_dht.node.routing), sans-IO with explicit ``now``: buckets of 8, good, dubious and
expired nodes."""

from __future__ import annotations

import random

from trio_dht.infohash import InfoHash
from trio_dht.node.routing import GOOD_HEARD_WINDOW, GOOD_REPLY_WINDOW, MAX_AUTH_ERRORS, K, Node, RoutingTable

OWN = InfoHash(bytes(20))  # our id: 0x00...
ADDR = ("127.0.0.1", 4000)


def nid(top: int, rest: int) -> InfoHash:
    """An id whose first byte is ``top`` and last two bytes ``rest``."""
    return InfoHash(bytes([top]) + bytes(17) + rest.to_bytes(2, "big"))


def fill(table: RoutingTable, ids, now: float = 0.0, *, replied: bool = True) -> list[Node]:
    out = []
    for i in ids:
        node, to_ping = table.heard(i, ("127.0.0.1", 5000 + len(out)), now, replied=replied)
        assert to_ping is None
        out.append(node)
    return out


def test_good_and_dubious_windows():
    n = Node(nid(1, 1), ADDR)
    assert not n.is_good(0.0)  # never heard
    n.heard(ADDR, 100.0, replied=False)
    assert not n.is_good(100.0)  # heard, never replied: dubious
    n.heard(ADDR, 100.0, replied=True)
    assert n.is_good(100.0)
    assert n.is_good(100.0 + GOOD_HEARD_WINDOW - 1)
    assert not n.is_good(100.0 + GOOD_HEARD_WINDOW + 1)  # silent for 10 min
    n.heard(ADDR, 5000.0, replied=False)  # it keeps sending requests: heard, but its reply ages
    assert n.is_good(5000.0)
    n.heard(ADDR, 100.0 + GOOD_REPLY_WINDOW + 1, replied=False)
    assert not n.is_good(100.0 + GOOD_REPLY_WINDOW + 1)  # replied more than 2 h ago
    n.heard(ADDR, 8000.0, replied=True)
    n.request_failed()
    assert n.expired and not n.is_good(8000.0)
    n.heard(("127.0.0.1", 4001), 8001.0, replied=False)  # any packet clears "expired" and updates the address
    assert not n.expired and n.addr == ("127.0.0.1", 4001) and n.is_good(8001.0)


def test_auth_errors_expire_after_three():
    n = Node(nid(1, 1), ADDR)
    n.heard(ADDR, 0.0, replied=True)
    for _ in range(MAX_AUTH_ERRORS):
        n.auth_error()
    assert not n.expired
    n.auth_error()
    assert n.expired
    n.heard(ADDR, 1.0, replied=True)
    assert not n.expired and n.auth_errors == 0


def test_first_bucket_holds_k_then_splits():
    table = RoutingTable(OWN)
    fill(table, [nid(0x80, i) for i in range(K)])  # far half
    assert len(table.buckets) == 1 and len(table) == K
    newcomer = nid(0x80, 100)
    node, to_ping = table.heard(newcomer, ADDR, 0.0, replied=True)
    # One bucket: it splits at 2^159; the far half is not ours and full of good nodes: the newcomer waits.
    assert len(table.buckets) == 2 and table.buckets[1].first == 1 << 159
    assert to_ping is None and table.get(newcomer) is None and table.buckets[1].cached is node
    assert len(table.buckets[1].nodes) == K and table.buckets[0].nodes == []


def test_only_our_bucket_splits():
    table = RoutingTable(OWN)
    fill(table, [nid(0x80, i) for i in range(K)])
    table.heard(nid(0x80, 100), ADDR, 0.0, replied=True)  # split once
    # Nodes close to us keep splitting our own bucket, never the far one.
    close = [nid(top, 1) for top in (0x40, 0x41, 0x20, 0x21, 0x10, 0x11, 0x08, 0x09, 0x04, 0x05, 0x02, 0x03)]
    fill(table, close)
    assert all(table.get(i) is not None for i in close)
    assert len(table) == K + len(close)
    for i, b in enumerate(table.buckets):
        end = table.buckets[i + 1].first if i + 1 < len(table.buckets) else 1 << 160
        assert len(b.nodes) <= K
        assert all(b.first <= n.id_int < end for n in b.nodes)
    assert table.buckets[-1].first == 1 << 159 and len(table.buckets[-1].nodes) == K  # never split
    own_bucket = table.buckets[0]
    assert own_bucket.first == 0


def test_full_foreign_bucket_with_dubious_node_asks_for_a_ping():
    table = RoutingTable(OWN)
    nodes = fill(table, [nid(0x80, i) for i in range(K)])
    table.heard(nid(0x80, 100), ADDR, 0.0, replied=True)  # split
    later = GOOD_HEARD_WINDOW + 10  # every node is now dubious (silent 10 min)
    for n in nodes[1:]:
        table.heard(n.id, n.addr, later, replied=True)
    node, to_ping = table.heard(nid(0x80, 200), ADDR, later, replied=False)
    assert to_ping is nodes[0]  # the dubious one
    assert table.buckets[-1].cached is node and table.get(node.id) is None


def test_own_bucket_with_dubious_node_does_not_split():
    table = RoutingTable(OWN)
    fill(table, [nid(0x80, i) for i in range(K)])
    table.heard(nid(0x80, 100), ADDR, 0.0, replied=True)  # two buckets: ours is [0, 2^159)
    close = fill(table, [nid(0x40, i) for i in range(K - 1)])
    fill(table, [nid(0x40, 50)], replied=False)  # a dubious node in our bucket
    node, to_ping = table.heard(nid(0x40, 99), ADDR, 1.0, replied=True)
    assert len(table.buckets) == 2 and to_ping is not None and not to_ping.is_good(1.0)
    assert table.buckets[0].cached is node
    del close


def test_expired_node_is_replaced_at_once():
    table = RoutingTable(OWN)
    nodes = fill(table, [nid(0x80, i) for i in range(K)])
    table.heard(nid(0x80, 100), ADDR, 0.0, replied=True)
    table.request_failed(nodes[3].id)
    assert nodes[3].expired
    node, to_ping = table.heard(nid(0x80, 300), ADDR, 1.0, replied=True)
    assert to_ping is None and table.get(node.id) is node and table.get(nodes[3].id) is None
    assert node in table.buckets[-1].nodes


def test_remove_expired_promotes_cached_candidate():
    table = RoutingTable(OWN)
    nodes = fill(table, [nid(0x80, i) for i in range(K)])
    cached, _ = table.heard(nid(0x80, 100), ADDR, 0.0, replied=True)
    assert table.buckets[-1].cached is cached
    nodes[0].request_failed()
    to_ping = table.remove_expired()
    assert to_ping == [cached] and table.get(cached.id) is cached and table.get(nodes[0].id) is None
    assert table.buckets[-1].cached is None and len(table.buckets[-1].nodes) == K


def test_closest_ordering_and_good_only():
    table = RoutingTable(OWN)
    rng = random.Random(7)
    ids = [InfoHash(rng.randbytes(20)) for _ in range(60)]
    nodes = fill(table, ids)
    target = InfoHash(rng.randbytes(20))
    every = sorted(table, key=lambda n: n.id.distance(target))
    got = table.closest(target, K, now=0.0)
    assert got == every[:K]
    assert [n.id.distance(target) for n in got] == sorted(n.id.distance(target) for n in got)
    assert table.closest(target, 100, now=0.0) == every
    # Dubious and expired nodes are left out unless asked for.
    every[0].request_failed()
    table.heard(every[1].id, every[1].addr, 0.0, replied=False)
    assert every[0] not in table.closest(target, K, now=0.0)
    assert table.closest(target, K, now=0.0)[0] is every[1]  # heard at 0 and replied at 0: still good
    assert every[0] in table.closest(target, K, now=0.0, good_only=False)
    assert table.closest(target, K, now=GOOD_HEARD_WINDOW + 1) == []
    assert len(table.closest(target, K, now=GOOD_HEARD_WINDOW + 1, good_only=False)) == K
    del nodes


def test_closest_walks_the_buckets_to_the_same_answer_as_a_full_sort():
    """closest() reads the nearest buckets first and stops early; it must equal sorting the whole table."""
    rng = random.Random(11)
    for _ in range(10):
        own = InfoHash(rng.randbytes(20))
        table = RoutingTable(own)
        near = [InfoHash.from_int(own.to_int() ^ rng.getrandbits(rng.randrange(1, 161))) for _ in range(400)]
        for i in near:  # ids at every distance from ours, so that our bucket splits deep
            table.heard(i, ADDR, 0.0, replied=True)
        for node in rng.sample(list(table), len(table) * 2 // 3):
            table.heard(node.id, ADDR, GOOD_HEARD_WINDOW, replied=True)  # the others are dubious by then
        assert len(table.buckets) > 10
        now = GOOD_HEARD_WINDOW + 10
        for target in [own, *rng.sample(near, 10), *(InfoHash(rng.randbytes(20)) for _ in range(10))]:
            for count, good_only in ((1, True), (K, True), (14, True), (2 * K, False), (1000, False)):
                pool = [n for n in table if n.is_good(now) or not good_only]
                every = sorted(pool, key=lambda n: n.id.distance(target))
                assert table.closest(target, count, now=now, good_only=good_only) == every[:count]


def test_counts_and_connected():
    table = RoutingTable(OWN)
    assert not table.is_connected(0.0) and table.counts(0.0) == (0, 0)
    fill(table, [nid(0x80, 1)], replied=False)
    assert not table.is_connected(0.0) and table.counts(0.0) == (0, 1)
    fill(table, [nid(0x80, 2)], replied=True)
    assert table.is_connected(0.0) and table.counts(0.0) == (1, 1)
    assert table.counts(GOOD_HEARD_WINDOW + 1) == (0, 2)


def test_stale_buckets_and_random_ids():
    table = RoutingTable(OWN)
    fill(table, [nid(0x80, i) for i in range(K)])
    table.heard(nid(0x80, 100), ADDR, 0.0, replied=True)
    stale = table.stale_buckets(1.0)
    # Our (empty) bucket asks a neighbour's node; the far bucket changed just now.
    assert len(stale) == 1
    target, node = stale[0]
    assert target.to_int() < 1 << 159 and node is not None and node.id_int >= 1 << 159
    stale = table.stale_buckets(10 * 60 + 1.0)
    assert len(stale) == 2
    for i in range(len(table.buckets)):
        x = table.random_id_in(i).to_int()
        assert (
            table.buckets[i].first
            <= x
            < (table.buckets[i + 1].first if i + 1 < len(table.buckets) else 1 << 160)
        )


def test_split_when_our_id_is_at_the_top():
    """Ids compare as big-endian integers: with our id 0xff.., the low half is the foreign bucket."""
    table = RoutingTable(InfoHash(b"\xff" * 20))
    fill(table, [nid(0x00, i) for i in range(K)])
    table.heard(nid(0x00, 99), ADDR, 0.0, replied=True)
    assert len(table.buckets) == 2
    assert all(n.id_int < 1 << 159 for n in table.buckets[0].nodes)


def test_cached_candidate_follows_its_half_when_a_bucket_splits():
    table = RoutingTable(OWN)
    fill(table, [nid(0x80, i) for i in range(K)])
    table.heard(nid(0x80, 100), ADDR, 0.0, replied=True)  # buckets [0, 2^159) (ours), [2^159, 2^160)
    close = fill(table, [nid(0x10, i) for i in range(K - 1)])
    fill(table, [nid(0x10, 50)], replied=False)  # our bucket is full, with a dubious node: no split
    waiting, _ = table.heard(nid(0x50, 1), ADDR, 0.0, replied=True)  # in [2^158, 2^159)
    assert table.buckets[0].cached is waiting
    table.heard(nid(0x10, 50), ADDR, 0.0, replied=True)  # the dubious node answers: good
    table.heard(nid(0x10, 99), ADDR, 0.0, replied=True)  # our bucket splits at 2^158 (and again)
    assert len(table.buckets) > 2
    close[0].request_failed()
    table.remove_expired()
    for i, b in enumerate(table.buckets):
        end = table.buckets[i + 1].first if i + 1 < len(table.buckets) else 1 << 160
        assert all(b.first <= n.id_int < end for n in b.nodes), i
        assert b.cached is None or b.first <= b.cached.id_int < end, i
