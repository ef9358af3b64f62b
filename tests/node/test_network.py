"""A loopback network of 20 of our nodes: values put from random members are found from other members.

Other peers (real OpenDHT nodes, from the harness of tests/peers/) join such a network through ``add_peers=``
of ``open_network``: they bootstrap from ``net.bootstrap``, are appended to ``net.members``, and the same
``check_puts_found`` runs over every member.
"""

from __future__ import annotations

import random
from contextlib import AsyncExitStack, asynccontextmanager

import trio

from trio_dht.node import open_node

NODES = 20
KEYS = 100


async def test_100_keys_on_20_nodes(open_network, check_puts_found):
    with trio.fail_after(120):
        async with open_network(NODES, bootstrap_count=2, min_good=8) as net:
            assert net.members == net.nodes and len(net.bootstrap) == 2
            puts = await check_puts_found(net.members, KEYS, random.Random(20))
            # Each key sits on the 8 nodes closest to it (plus the putter's own copy).
            for key, value in puts:
                closest = sorted(net.nodes, key=lambda n: n.node_id.distance(key))[:8]
                assert all(n.storage.get_value(key, value.id) is not None for n in closest)
            assert sum(n.storage.value_count for n in net.nodes) <= KEYS * 9


async def test_added_peers_become_members(open_network, check_puts_found):
    """The ``add_peers`` hook, with two more of our nodes standing in for real peers."""
    seen_bootstrap = []

    @asynccontextmanager
    async def two_more(bootstrap):
        seen_bootstrap.extend(bootstrap)
        async with AsyncExitStack() as stack:
            yield [
                await stack.enter_async_context(
                    open_node(port=0, host="127.0.0.1", host6=None, bootstrap=bootstrap)
                )
                for _ in range(2)
            ]

    with trio.fail_after(60):
        async with open_network(4, add_peers=two_more) as net:
            assert seen_bootstrap == net.bootstrap and len(net.members) == 6
            extra = net.members[4:]
            with trio.fail_after(10):
                while not all(p.is_connected() for p in extra):
                    await trio.sleep(0.02)
            await check_puts_found(net.members, 10, random.Random(4))


async def test_a_permanent_put_reaches_a_node_that_joins_later(monkeypatch):
    """Not only once per lifetime: when the routing table shows a new node among the closest of the key,
    the permanent value is put to it within a table watch (OpenDHT announces to each new search node)."""
    from trio_dht.infohash import InfoHash
    from trio_dht.node import dht
    from trio_dht.value import Value

    monkeypatch.setattr(dht, "TABLE_WATCH", 0.2)
    local = "127.0.0.1"
    key = InfoHash.get("permanent, then a newcomer")
    with trio.fail_after(30):
        async with AsyncExitStack() as stack:
            first = await stack.enter_async_context(open_node(port=0, host=local, host6=None))
            boot = [(local, first.bound_port)]
            putter = await stack.enter_async_context(
                open_node(port=0, host=local, host6=None, bootstrap=boot)
            )
            while not putter.is_connected():
                await trio.sleep(0.02)
            announce, announces = putter._announce, []

            async def counted(*args):
                announces.append(trio.current_time())
                return await announce(*args)

            putter._announce = counted
            assert await putter.put(key, Value(b"kept", id=11), permanent=True)
            assert first.storage.get_value(key, 11) is not None
            late = await stack.enter_async_context(open_node(port=0, host=local, host6=None, bootstrap=boot))
            while late.storage.get_value(key, 11) is None:  # the value's lifetime is 10 min
                await trio.sleep(0.05)
            assert len(announces) == 2  # the put's, then one for the newcomer


def test_only_nodes_closer_than_those_that_stored_a_put_call_for_an_announce(monkeypatch):
    """A table knows few of the nodes near a key far from its own id: those it knows are not the key's
    closest, so they do not call for an announce; a node closer than the farthest that stored it does."""
    from types import SimpleNamespace

    from trio_dht.infohash import InfoHash
    from trio_dht.node.dht import DhtNode
    from trio_dht.node.routing import K, RoutingTable

    rnd = random.Random(7)
    monkeypatch.setattr(trio, "current_time", lambda: 1000.0)
    network = [InfoHash(rnd.randbytes(20)) for _ in range(3000)]
    table = RoutingTable(InfoHash(rnd.randbytes(20)))
    for i, node_id in enumerate(network):
        table.heard(node_id, (f"192.0.2.{i % 250 + 1}", 4000 + i), 1000.0, replied=True)
    fake = SimpleNamespace(protocol=SimpleNamespace(families={False}), tables={False: table})
    keys = [InfoHash(rnd.randbytes(20)) for _ in range(100)]
    for key in keys:
        closest = sorted(network, key=lambda n: n.distance(key))
        reached = set(closest[:K])  # what a search finds and puts to
        assert not DhtNode._closer_node_known(fake, key, reached)
        # The closest node went away: the ninth stored it instead; the first coming back calls for one.
        assert DhtNode._closer_node_known(fake, key, set(closest[1 : K + 1])) == (
            closest[0] in {n.id for n in table.closest(key, K, now=1000.0)}
        )
        # Asked once and did not store it (refused, or the answer lost): no more announces for it.
        assert not DhtNode._closer_node_known(fake, key, set(closest[1 : K + 1]), {closest[0]})
    assert DhtNode._closer_node_known(fake, keys[0], set())  # nobody stored it yet
