"""Interop with real OpenDHT nodes on loopback: PyPI ``opendht`` 4.4.2 and Debian ``dhtnode`` 2.4.12.

Each real node bootstraps from ours; values cross both ways (1 KB inline-ish and 60 KB fragmented), listens
see the other side's puts, and a mixed network of 20 of our nodes and 3 real ones finds 100 random keys.
With ``CI=true`` a missing peer fails these tests instead of skipping them.
"""

from __future__ import annotations

import os
import random
from contextlib import AsyncExitStack

import pytest
import trio
from peers import (
    needs_dhtnode,
    needs_opendht,
    open_dhtnode_peer,
    open_opendht_peer,
    poll_until,
    require_dhtnode,
    require_opendht,
)

from trio_dht import InfoHash, Value, open_node

pytestmark = [pytest.mark.interop, needs_opendht, needs_dhtnode]

LOOPBACK = "127.0.0.1"


async def _open_real(stack: AsyncExitStack, kind: str, bootstrap: tuple[str, int]):
    opener = open_opendht_peer if kind == "opendht" else open_dhtnode_peer
    peer = await stack.enter_async_context(opener(port=0, bootstrap=bootstrap))
    await peer.wait_for_nodes(1, timeout=15)
    return peer


@pytest.mark.parametrize("kind", ["opendht", "dhtnode"])
@pytest.mark.parametrize("size", [1000, 60_000], ids=["1KB", "60KB"])
async def test_values_cross_both_ways(kind: str, size: int) -> None:
    require_opendht()
    require_dhtnode()
    async with AsyncExitStack() as stack:
        ours = await stack.enter_async_context(open_node(port=0, host=LOOPBACK, host6=None))
        real = await _open_real(stack, kind, (LOOPBACK, ours.bound_port))

        theirs_key = InfoHash.get(f"from-{kind}-{size}")
        theirs_data = os.urandom(size)
        assert await real.put(theirs_key, theirs_data)
        got = await poll_until(lambda: ours.get(theirs_key), timeout=10)
        assert [v.data for v in got] == [theirs_data]
        # It was stored on our node, not only found: the real node announced it to us.
        assert ours.storage.get(theirs_key)

        ours_key = InfoHash.get(f"from-ours-to-{kind}-{size}")
        ours_data = os.urandom(size)
        assert await ours.put(ours_key, Value(data=ours_data, utype="application/octet-stream"))
        values = await poll_until(lambda: real.get(ours_key), timeout=10)
        assert [v["data"] for v in values] == [ours_data]


@pytest.mark.parametrize("kind", ["opendht", "dhtnode"])
async def test_listens_both_ways(kind: str) -> None:
    require_opendht()
    require_dhtnode()
    async with AsyncExitStack() as stack:
        ours = await stack.enter_async_context(open_node(port=0, host=LOOPBACK, host6=None))
        real = await _open_real(stack, kind, (LOOPBACK, ours.bound_port))

        # A listen on our node sees the real node's new value within 2 s of the put.
        key = InfoHash.get(f"listen-ours-{kind}")
        async with ours.listen(key) as events:
            await trio.sleep(0.5)
            started = trio.current_time()
            assert await real.put(key, b"hello from the real node")
            with trio.fail_at(started + 2.0):
                event = await events.receive()
        assert event.value.data == b"hello from the real node" and not event.expired

        # A real node's listen sees our put.
        key = InfoHash.get(f"listen-real-{kind}")
        async with real.listen(key) as real_events:
            await trio.sleep(1.0)
            assert await ours.put(key, Value(data=b"hello from trio_dht"))
            with trio.fail_after(5):
                async for ev in real_events:
                    if not ev["expired"]:
                        assert ev["data"] == b"hello from trio_dht"
                        break


@pytest.mark.slow
async def test_mixed_network_finds_every_key() -> None:
    """20 of our nodes and 3 real ones: 100 random keys put from random nodes, got from random nodes."""
    require_opendht()
    require_dhtnode()
    rng = random.Random(20261125)
    async with AsyncExitStack() as stack:
        ours = []
        boot: list[tuple[str, int]] = []
        for i in range(20):
            node = await stack.enter_async_context(
                open_node(port=0, host=LOOPBACK, host6=None, bootstrap=boot)
            )
            ours.append(node)
            if i < 2:
                boot.append((LOOPBACK, node.bound_port))
        reals = [
            await _open_real(stack, "opendht", boot[0]),
            await _open_real(stack, "opendht", boot[1]),
            await _open_real(stack, "dhtnode", boot[0]),
        ]
        with trio.fail_after(30):
            while not all(n.info().ipv4.good >= 8 for n in ours):
                await trio.sleep(0.2)

        members: list[tuple[str, object]] = [("ours", n) for n in ours] + [("real", r) for r in reals]
        expected: dict[InfoHash, bytes] = {}

        async def put_one(i: int) -> None:
            key = InfoHash.random()
            data = f"value {i}".encode()
            kind, who = members[rng.randrange(len(members))]
            ok = await who.put(key, Value(data=data)) if kind == "ours" else await who.put(key, data)
            assert ok, f"put {i} from a {kind} node failed"
            expected[key] = data

        with trio.fail_after(120):
            for start in range(0, 100, 10):  # 10 puts in flight at a time
                async with trio.open_nursery() as nursery:
                    for i in range(start, start + 10):
                        nursery.start_soon(put_one, i)

        missing = []

        async def get_one(key: InfoHash, data: bytes) -> None:
            kind, who = members[rng.randrange(len(members))]
            if kind == "ours":
                found = [v.data for v in await who.get(key)]
            else:
                found = [v["data"] for v in await who.get(key)]
            if data not in found:
                missing.append((key.hex(), kind))

        with trio.fail_after(120):
            items = list(expected.items())
            for start in range(0, len(items), 10):
                async with trio.open_nursery() as nursery:
                    for key, data in items[start : start + 10]:
                        nursery.start_soon(get_one, key, data)
        assert len(expected) == 100
        assert missing == []
