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
