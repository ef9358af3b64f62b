"""The real-peer harness (tests/peers) proven with real peers only: PyPI opendht and Debian dhtnode.

Interop tests skip when a peer is missing (``needs_*`` markers), and fail instead when ``CI=true``
(the ``require_*`` calls).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from peers import (
    DhtnodePeer,
    OpenDhtPeer,
    PeerError,
    free_port,
    needs_dhtnode,
    needs_opendht,
    open_dhtnode_peer,
    open_dhtnode_proxy_client,
    open_opendht_peer,
    parse_value_line,
    require_dhtnode,
    require_opendht,
    skip_or_fail,
)

from trio_dht.infohash import InfoHash

#: Bound on each interop test (they take 1-4 s when healthy).
TEST_DEADLINE = 45.0


async def _first_event(events: Any, want: bytes, timeout: float = 15.0) -> dict[str, Any]:
    """The first non-expired listen event carrying ``want`` (bounded in time and count)."""
    with trio.fail_after(timeout):
        seen = 0
        async for event in events:
            seen += 1
            assert seen < 100, "too many unrelated events"
            if not event["expired"] and event["data"] == want:
                return event
    raise AssertionError(f"listen ended before {want[:20]!r} arrived")


# -- harness units (no peers) ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["udp", "tcp", "both"])
def test_free_port_is_bindable(kind: str) -> None:
    port = free_port(kind)  # type: ignore[arg-type]
    assert 0 < port < 65536
    types = {"udp": [socket.SOCK_DGRAM], "tcp": [socket.SOCK_STREAM]}.get(
        kind, [socket.SOCK_DGRAM, socket.SOCK_STREAM]
    )
    for sock_type in types:
        with socket.socket(socket.AF_INET, sock_type) as sock:
            sock.bind(("127.0.0.1", port))


def test_skip_or_fail_follows_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        skip_or_fail("peer missing")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="peer missing"):
        skip_or_fail("peer missing")


def test_parse_value_line() -> None:
    text = parse_value_line('\tValue[id:2bff9afd69b5d221 data(text/plain):"world"]')
    assert text is not None
    assert (text["id"], text["data"], text["utype"]) == (0x2BFF9AFD69B5D221, b"world", "text/plain")
    binary = parse_value_line("\tValue[id:2 data:6e6577]")
    assert binary is not None
    assert (binary["id"], binary["data"], binary["utype"]) == (2, b"new", "")
    big = parse_value_line("Value[id:d056e8d270a054b7 data:60000 bytes]")
    assert big is not None
    assert (big["data"], big["size"]) == (None, 60000)
    assert parse_value_line("Get: completed, took 2.23 ms (total 1)") is None


# -- single real peers ------------------------------------------------------------------------


@pytest.mark.interop
@needs_opendht
async def test_opendht_peer_reports_errors_and_propagates_body_errors() -> None:
    require_opendht()
    with trio.fail_after(TEST_DEADLINE):
        with pytest.raises(KeyError):
            async with open_opendht_peer() as peer:
                assert peer.port > 0
                assert len(await peer.node_id()) == 20
                with pytest.raises(ValueError):
                    await peer.get(b"short")
                raise KeyError("from the body")  # reaches the caller as itself, not in a group
        # The C++ node aborts when it cannot bind; the error carries the worker's last output.
        with pytest.raises(PeerError, match="Can't bind socket"):
            async with open_opendht_peer(host="203.0.113.1"):
                pass


@pytest.mark.interop
@needs_dhtnode
async def test_dhtnode_proxy_client_against_dhtnode_proxy() -> None:
    require_dhtnode()
    key = InfoHash.random()
    with trio.fail_after(TEST_DEADLINE):
        async with (
            open_dhtnode_peer() as server,
            open_dhtnode_peer(bootstrap=server.address) as other,
        ):
            await other.wait_for_nodes()
            async with open_dhtnode_proxy_client(server.proxy_url) as client:
                assert await client.put(key, "first")
                assert [value["data"] for value in await client.get(key)] == [b"first"]
                async with client.listen(key) as events:
                    assert await other.put(key, b"second")
                    event = await _first_event(events, b"second")
                    assert event["utype"] == ""
                info = await client.node_info()
                assert info["node_id"] == (await server.node_id()).hex()
                lines = await client.command("h")
                assert any("Put string value at <key>" in line for line in lines)


# -- opendht <-> dhtnode on loopback -----------------------------------------------------------


@pytest.fixture
async def pair() -> AsyncIterator[tuple[OpenDhtPeer, DhtnodePeer]]:
    """A dhtnode peer and an opendht peer bootstrapped to each other, each seeing the other as good."""
    require_opendht()
    require_dhtnode()
    async with open_dhtnode_peer() as dhtnode, open_opendht_peer(bootstrap=dhtnode.address) as opendht:
        await dhtnode.bootstrap(*opendht.address)
        await opendht.wait_for_nodes()
        await dhtnode.wait_for_nodes()
        yield opendht, dhtnode


@pytest.mark.interop
@needs_opendht
@needs_dhtnode
async def test_put_by_each_is_got_by_the_other(pair: tuple[OpenDhtPeer, DhtnodePeer]) -> None:
    opendht, dhtnode = pair
    key = InfoHash.random()
    with trio.fail_after(TEST_DEADLINE):
        assert await opendht.put(key, b"from-opendht", value_id=11, utype="text/plain")
        assert await dhtnode.put(key, b"from-dhtnode", value_type=5, value_id=22)
        from_dhtnode = {value["id"]: value for value in await dhtnode.get(key)}
        from_opendht = {value["id"]: value for value in await opendht.get(key)}
    assert from_dhtnode[11]["data"] == b"from-opendht"
    assert from_dhtnode[11]["utype"] == "text/plain"
    assert from_opendht[22]["data"] == b"from-dhtnode"
    assert [value["id"] for value in await opendht.get(key, value_type=5)] == [22]


@pytest.mark.interop
@needs_opendht
@needs_dhtnode
async def test_listen_on_one_sees_put_of_other(pair: tuple[OpenDhtPeer, DhtnodePeer]) -> None:
    opendht, dhtnode = pair
    key = InfoHash.random()
    with trio.fail_after(TEST_DEADLINE):
        async with opendht.listen(key) as events:
            assert await dhtnode.put(key, b"to-opendht", value_id=33)
            assert (await _first_event(events, b"to-opendht"))["id"] == 33
        async with dhtnode.listen(key) as events:
            event = await _first_event(events, b"to-opendht")  # existing values come first
            assert event["id"] == 33
            assert await opendht.put(key, b"to-dhtnode", value_type=4)
            assert (await _first_event(events, b"to-dhtnode"))["type"] == 4


@pytest.mark.interop
@needs_opendht
@needs_dhtnode
async def test_60kb_value_crosses_both_ways(pair: tuple[OpenDhtPeer, DhtnodePeer]) -> None:
    opendht, dhtnode = pair
    big = bytes(range(256)) * 234 + b"end"  # 59 907 bytes, every byte value
    with trio.fail_after(TEST_DEADLINE):
        key_a, key_b = InfoHash.random(), InfoHash.random()
        assert await opendht.put(key_a, big, value_id=1)
        assert [value["data"] for value in await dhtnode.get(key_a)] == [big]
        assert await dhtnode.put(key_b, big, value_id=2)
        assert [value["data"] for value in await opendht.get(key_b)] == [big]
