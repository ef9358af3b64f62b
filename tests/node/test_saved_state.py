"""A node's saved state (sans-IO): what is captured, and what a restart restores, with what lifetimes."""

from __future__ import annotations

import math

import pytest
import trio

from trio_dht.infohash import InfoHash
from trio_dht.node.routing import RoutingTable
from trio_dht.node.saved_state import (
    MAX_NODES,
    SavedValue,
    bootstrap_addresses,
    capture,
    restore_values,
)
from trio_dht.node.storage import Storage
from trio_dht.value import Value, type_expiration

KEY = InfoHash.get("kept")
OWN = InfoHash.get("me")


def stored_storage(now: float) -> Storage:
    storage = Storage()
    assert storage.put(KEY, Value(data=b"theirs", id=7), now, source="192.0.2.1").accepted
    assert storage.put(KEY, Value(data=b"ours", id=8), now, local=True).accepted
    return storage


def test_capture_keeps_others_values_with_their_unix_deadline() -> None:
    storage = stored_storage(now=100.0)
    state = capture(OWN, {False: RoutingTable(OWN), True: RoutingTable(OWN)}, storage, 160.0, 1_000_000.0)
    assert state.node_id == bytes(OWN) and state.nodes == ()
    assert len(state.values) == 1  # the node's own value is its owner's to put again
    saved = state.values[0]
    lifetime = type_expiration(0)
    assert saved.key == bytes(KEY) and saved.bucket == "192.0.2.1"
    assert saved.expires == pytest.approx(1_000_000.0 + (100.0 + lifetime - 160.0))
    assert Value.unpack(saved.packed).data == b"theirs"


def test_a_restored_value_lives_what_remained_of_its_life() -> None:
    storage = stored_storage(now=100.0)
    state = capture(OWN, {False: RoutingTable(OWN)}, storage, 160.0, 1_000_000.0)
    remaining = state.values[0].expires - 1_000_100.0  # the node was down for 100 s
    fresh = Storage()
    assert restore_values(fresh.put, state.values, 5.0, 1_000_100.0) == 1
    stored = fresh.stored(KEY, 7)
    assert stored is not None and stored.bucket == "192.0.2.1"
    assert stored.expiration == pytest.approx(5.0 + remaining)


def test_dead_or_broken_values_are_not_restored() -> None:
    lifetime = type_expiration(0)
    good = Value(data=b"x", id=1).packed()
    values = (
        SavedValue(bytes(KEY), good, 999.0, "192.0.2.1"),  # its life ended while the node was down
        SavedValue(bytes(KEY), b"\xc1 not msgpack", 2000.0, "192.0.2.1"),
        SavedValue(b"short", good, 2000.0, "192.0.2.1"),
        SavedValue(bytes(KEY), good, 1000.0 + 10 * lifetime, "192.0.2.1"),  # longer than its type allows
    )
    fresh = Storage()
    assert restore_values(fresh.put, values, 0.0, 1000.0) == 1
    stored = fresh.stored(KEY, 1)
    assert stored is not None and stored.expiration <= lifetime  # never longer than a fresh put's


def test_capture_keeps_the_good_nodes_most_recently_answering_first() -> None:
    table = RoutingTable(OWN)
    now = 1000.0
    for i in range(3):
        table.heard(InfoHash.get(f"peer{i}"), ("192.0.2.1", 4000 + i), now - i, replied=True)
    table.heard(InfoHash.get("silent"), ("192.0.2.9", 4222), now, replied=False)  # never answered: not good
    state = capture(OWN, {False: table}, Storage(), now, 0.0)
    assert [n.port for n in state.nodes] == [4000, 4001, 4002]
    assert bootstrap_addresses(state) == [("192.0.2.1", 4000), ("192.0.2.1", 4001), ("192.0.2.1", 4002)]
    assert MAX_NODES >= 8 and all(math.isfinite(v.expires) for v in state.values or ())
    assert capture(OWN, {False: table}, None, now, 0.0).values is None  # the id and nodes alone


async def test_a_restored_value_expires_in_the_running_node(open_driven_node, autojump_clock) -> None:
    """Restored through the node's store path: its expiry is scheduled like any stored value's."""
    saved = SavedValue(bytes(KEY), Value(data=b"theirs", id=7).packed(), 1_000_030.0, "192.0.2.1")
    async with open_driven_node() as driven:
        node = driven.node
        await trio.sleep(1)  # the expiry loop waits, with nothing stored
        start = trio.current_time()
        assert restore_values(node.protocol.store, (saved,), start, 1_000_000.0) == 1
        await trio.sleep(29)
        assert node.storage.get_value(KEY, 7) is not None
        await trio.sleep(2)
        assert node.storage.get_value(KEY, 7) is None  # 30 s were left of its life
