"""Remote listeners (trio_dht.node.remote_listeners), the storing side of a listen, with explicit ``now``."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_dht.infohash import InfoHash
from trio_dht.limits import Limits
from trio_dht.node.remote_listeners import LISTENER_EXPIRE_TIME, ListenerBook, TooManyListeners
from trio_dht.value import Query, Value

K = InfoHash.get("key")
K2 = InfoHash.get("other key")
N1 = bytes(InfoHash.get("node 1"))
N2 = bytes(InfoHash.get("node 2"))
ADDR = ("127.0.0.1", 4222)
T0 = 1000.0
ONLY_TYPE_7 = Query(where=((2, 7),))


def test_new_listener_then_refresh() -> None:
    book = ListenerBook()
    assert book.listen(K, N1, 1, ADDR, None, T0) is True
    assert book.listen(K, N1, 1, ("127.0.0.1", 5000), ONLY_TYPE_7, T0 + 20) is False  # same sid: refresh
    [listener] = book.listeners(K)
    assert (listener.key, listener.node_id, listener.sid) == (K, N1, 1)
    assert listener.addr == ("127.0.0.1", 5000)
    assert listener.query == ONLY_TYPE_7 and listener.last_refresh == T0 + 20
    assert book.get(K, N1, 1) is listener and book.get(K, N1, 2) is None and book.get(K2, N1, 1) is None
    assert book.count() == len(book) == 1


def test_listeners_are_keyed_by_node_sid_and_key() -> None:
    book = ListenerBook()
    assert book.listen(K, N1, 1, ADDR, None, T0)
    assert book.listen(K, N1, 2, ADDR, None, T0)  # another socket of the same node
    assert book.listen(K, N2, 1, ADDR, None, T0)  # same sid, other node
    assert book.listen(K2, N1, 1, ADDR, None, T0)  # same node and sid, other key
    assert book.count() == 4
    assert {(li.node_id, li.sid) for li in book.listeners(K)} == {(N1, 1), (N1, 2), (N2, 1)}
    assert sorted(book.keys()) == sorted([K, K2])
    assert book.listeners(InfoHash.get("nobody")) == []


def test_new_values_honour_the_where_but_re_and_exp_do_not() -> None:
    book = ListenerBook()
    book.listen(K, N1, 1, ADDR, ONLY_TYPE_7, T0)
    book.listen(K, N2, 1, ADDR, None, T0)
    book.listen(K, N2, 2, ADDR, Query(select=(1,)), T0)  # a Select alone filters nothing
    type0 = Value(data=b"x", type=0, id=1)
    type7 = Value(data=b"x", type=7, id=2)
    assert {(li.node_id, li.sid) for li in book.for_new_value(K, type0)} == {(N2, 1), (N2, 2)}
    assert len(book.for_new_value(K, type7)) == 3
    assert len(book.for_key(K)) == 3
    assert book.for_new_value(K2, type7) == [] and book.for_key(K2) == []


def test_expire_after_ten_minutes_without_listen() -> None:
    book = ListenerBook()
    book.listen(K, N1, 1, ADDR, None, T0)
    book.listen(K, N2, 1, ADDR, None, T0)
    book.listen(K2, N1, 7, ADDR, None, T0)
    book.listen(K, N2, 1, ADDR, None, T0 + 300)  # refreshed
    assert LISTENER_EXPIRE_TIME == 600
    assert book.expire(T0 + 600) == 0
    assert book.expire(T0 + 600.5) == 2
    assert [(li.node_id, li.sid) for li in book.for_key(K)] == [(N2, 1)]
    assert book.keys() == [K] and book.count() == 1
    assert book.expire(T0 + 3600) == 1
    assert book.count() == 0 and book.keys() == []
    # an expired listener that listens again is new: it gets the values pushed again
    assert book.listen(K, N2, 1, ADDR, None, T0 + 3600) is True


def test_expire_with_custom_age() -> None:
    book = ListenerBook()
    book.listen(K, N1, 1, ADDR, None, T0)
    assert book.expire(T0 + 31, max_age=30) == 1


def test_remove_node_and_remove() -> None:
    book = ListenerBook()
    book.listen(K, N1, 1, ADDR, None, T0)
    book.listen(K, N1, 2, ADDR, None, T0)
    book.listen(K2, N1, 1, ADDR, None, T0)
    book.listen(K, N2, 1, ADDR, None, T0)
    assert book.remove_node(N1) == 3
    assert book.remove_node(N1) == 0
    assert book.keys() == [K] and book.count() == 1
    assert book.remove(K, N2, 2) is False
    assert book.remove(K, N2, 1) is True and book.remove(K, N2, 1) is False
    assert book.count() == 0 and book.keys() == []
    assert book.remove_node(N2) == 0


KEYS = [InfoHash.get(f"k{i}") for i in range(3)]
NODES = [bytes(InfoHash.get(f"n{i}")) for i in range(3)]
op = st.one_of(
    st.tuples(st.just("listen"), st.sampled_from(KEYS), st.sampled_from(NODES), st.integers(0, 2)),
    st.tuples(st.just("remove"), st.sampled_from(KEYS), st.sampled_from(NODES), st.integers(0, 2)),
    st.tuples(st.just("remove_node"), st.sampled_from(NODES)),
    st.tuples(st.just("expire")),
    st.tuples(st.just("wait"), st.floats(0, 400)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=60))
def test_book_matches_a_model(ops) -> None:
    """The book behaves as a plain dict {(key, node, sid): last listen}."""
    book = ListenerBook()
    model: dict[tuple[InfoHash, bytes, int], float] = {}
    now = T0
    for o in ops:
        if o[0] == "listen":
            _, key, node, sid = o
            assert book.listen(key, node, sid, ADDR, None, now) is ((key, node, sid) not in model)
            model[(key, node, sid)] = now
        elif o[0] == "remove":
            _, key, node, sid = o
            assert book.remove(key, node, sid) is ((key, node, sid) in model)
            model.pop((key, node, sid), None)
        elif o[0] == "remove_node":
            gone = [k for k in model if k[1] == o[1]]
            assert book.remove_node(o[1]) == len(gone)
            for k in gone:
                del model[k]
        elif o[0] == "expire":
            gone = [k for k, t in model.items() if now - t > LISTENER_EXPIRE_TIME]
            assert book.expire(now) == len(gone)
            for k in gone:
                del model[k]
        else:
            now += o[1]
        assert book.count() == len(model)
        assert sorted(book.keys()) == sorted({k for k, _, _ in model})
        for key in KEYS:
            got = {(key, li.node_id, li.sid): li.last_refresh for li in book.listeners(key)}
            assert got == {k: t for k, t in model.items() if k[0] == key}


def test_new_listeners_past_the_per_source_bound_are_refused_until_one_expires() -> None:
    book = ListenerBook(Limits(udp_listeners_per_source=2))
    assert book.listen(K, N1, 1, ("10.0.0.1", 4222), None, T0)
    assert book.listen(K, N1, 2, ("10.0.0.1", 4223), None, T0 + 1)  # another port of the same IPv4 source
    with pytest.raises(TooManyListeners):
        book.listen(K2, N2, 1, ("10.0.0.1", 9999), None, T0 + 2)
    assert book.refused == 1
    assert book.listen(K, N1, 1, ("10.0.0.1", 4222), None, T0 + 3) is False  # a refresh is not new
    assert book.listen(K2, N2, 1, ("10.0.0.2", 4222), None, T0 + 3)  # another source has its own budget
    assert book.expire(T0 + 2 + LISTENER_EXPIRE_TIME) == 1  # (N1, 2), not refreshed since T0 + 1
    assert book.listen(K2, N2, 2, ("10.0.0.1", 9999), None, T0 + 4)  # its slot came back


def test_new_listeners_past_the_total_bound_are_refused_and_slots_follow_address_changes() -> None:
    book = ListenerBook(Limits(udp_listeners=2, udp_listeners_per_source=1))
    assert book.listen(K, N1, 1, ("10.0.0.1", 4222), None, T0)
    assert book.listen(K, N2, 1, ("10.0.0.2", 4222), None, T0)
    with pytest.raises(TooManyListeners):
        book.listen(K, N2, 2, ("10.0.0.3", 4222), None, T0)
    book.listen(K, N1, 1, ("10.0.0.3", 4222), None, T0)  # N1 moved: its slot moves with it
    assert book.remove_node(N2) == 1
    assert book.listen(K2, N2, 1, ("10.0.0.1", 4222), None, T0)  # 10.0.0.1 is free again
    assert len(book) == 2


def test_a_known_listener_cannot_move_to_a_full_source() -> None:
    book = ListenerBook(Limits(udp_listeners_per_source=1))
    assert book.listen(K, N1, 1, ("10.0.0.1", 4222), None, T0)
    assert book.listen(K, N2, 1, ("10.0.0.2", 4222), None, T0)
    with pytest.raises(TooManyListeners):
        book.listen(K, N1, 1, ("10.0.0.2", 5000), None, T0 + 1)  # 10.0.0.2 holds its one listener
    assert book.refused == 1
    assert book.get(K, N1, 1).addr == ("10.0.0.1", 4222)  # the old address is kept
    assert book.listen(K, N1, 1, ("10.0.0.1", 5000), None, T0 + 2) is False  # same source, other port
    assert book.get(K, N1, 1).addr == ("10.0.0.1", 5000)
    assert book.remove_node(N2) == 1
    assert book.listen(K, N1, 1, ("10.0.0.2", 5000), None, T0 + 3) is False  # room now: it moves
    assert book.listen(K2, N2, 1, ("10.0.0.1", 4222), None, T0 + 3)  # and 10.0.0.1 is free again
    with pytest.raises(TooManyListeners):
        book.listen(K2, N2, 2, ("10.0.0.2", 4222), None, T0 + 3)
