"""The node's local listens (trio_dht.node.local_listens): shared value cache, real changes only, expiry heap,
refresh schedule."""

from __future__ import annotations

from trio_dht.api import ValueEvent
from trio_dht.infohash import InfoHash
from trio_dht.node.local_listens import ListenTarget, LocalListens
from trio_dht.node.routing import Node
from trio_dht.value import FIELD_TYPE, Query, Value

KEY = InfoHash.get("listening")


def _collect(reg: LocalListens, query: Query | None = None):
    events: list[ValueEvent] = []
    return reg.add(KEY, query, events.append), events


def test_only_real_changes_reach_listeners() -> None:
    reg = LocalListens()
    _, events = _collect(reg)
    v = Value(data=b"a", id=1)
    reg.deliver(KEY, v, expires=100)
    reg.deliver(KEY, Value(data=b"a", id=1), expires=150)  # the same value from a second storing node
    assert [e.value.data for e in events] == [b"a"]
    reg.deliver(KEY, Value(data=b"b", id=1), expires=150)  # an edit
    assert [e.value.data for e in events] == [b"a", b"b"]
    reg.expire(KEY, 1)
    reg.expire(KEY, 1)  # a second exp from another node is not repeated
    assert [(e.value.data, e.expired) for e in events][-1] == (b"b", True)
    assert len(events) == 3


def test_late_listener_gets_cached_values_and_queries_filter() -> None:
    reg = LocalListens()
    _, first = _collect(reg)
    reg.deliver(KEY, Value(data=b"t0", id=1, type=0), expires=100)
    reg.deliver(KEY, Value(data=b"t7", id=2, type=7), expires=100)
    _, typed = _collect(reg, Query(where=((FIELD_TYPE, 7),)))
    assert [e.value.id for e in first] == [1, 2]
    assert [e.value.id for e in typed] == [2]


def test_values_expire_from_the_heap_unless_refreshed() -> None:
    reg = LocalListens()
    _, events = _collect(reg)
    reg.deliver(KEY, Value(data=b"a", id=1), expires=10)
    reg.deliver(KEY, Value(data=b"b", id=2), expires=10)
    reg.refresh(KEY, 2, expires=30)
    assert reg.next_wake() == 10
    reg.expire_due(10)
    assert [(e.value.id, e.expired) for e in events][2:] == [(1, True)]
    reg.expire_due(29)
    assert len(events) == 3
    reg.expire_due(30)
    assert [(e.value.id, e.expired) for e in events][3:] == [(2, True)]


def test_cancel_drops_the_key_and_its_sockets() -> None:
    reg = LocalListens()
    a, _ = _collect(reg)
    b, _ = _collect(reg)
    kl = reg.by_key[KEY]
    node = Node(InfoHash.random(), ("127.0.0.1", 4222))
    reg.set_targets(kl, False, [ListenTarget(node, 77, b"tok", False)])
    assert reg.by_socket[(node.id, 77)] is kl
    a.cancel()
    assert KEY in reg.by_key
    b.cancel()
    b.cancel()
    assert KEY not in reg.by_key and not reg.by_socket


def test_schedule_pops_each_due_key_once() -> None:
    reg = LocalListens()
    _collect(reg)
    kl = reg.by_key[KEY]
    reg.schedule(kl, 5)
    assert reg.pop_due(4) == []
    assert reg.pop_due(5) == [kl]
    assert reg.pop_due(100) == []
    reg.schedule(kl, 20)
    reg.by_key[KEY].listeners[0].cancel()
    assert reg.pop_due(100) == []
