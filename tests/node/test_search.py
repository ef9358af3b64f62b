"""Search state (trio_dht.node.search): 14 kept, 4 in flight, slow nodes, synced, token rules."""

from __future__ import annotations

from trio_dht.infohash import InfoHash
from trio_dht.node.routing import K, Node
from trio_dht.node.search import MAX_IN_FLIGHT, SEARCH_NODES, SearchState, Status

TARGET = InfoHash(bytes(20))


def node(distance: int) -> Node:
    """A node at exactly ``distance`` from TARGET (0)."""
    return Node(InfoHash.from_int(distance), ("127.0.0.1", 1000 + distance % 60000))


def search_with(distances) -> tuple[SearchState, dict[int, Node]]:
    state = SearchState(TARGET)
    nodes = {d: node(d) for d in distances}
    for n in nodes.values():
        state.add(n)
    return state, nodes


def ids(sns) -> list[int]:
    return [sn.distance for sn in sns]


def test_keeps_the_14_closest():
    state, _ = search_with(range(100, 130))
    assert ids(state.nodes) == list(range(100, 100 + SEARCH_NODES))
    assert not state.add(node(200))  # farther than the 14th
    assert state.add(node(1))  # closer: kept, and the 14th is pushed out
    assert ids(state.nodes) == [1, *range(100, 100 + SEARCH_NODES - 1)]
    assert not state.add(node(1))  # known already
    assert state.get(InfoHash.from_int(113)) is None


def test_at_most_4_in_flight_closest_first():
    state, nodes = search_with(range(1, 21))
    first = state.next_nodes()
    assert ids(first) == [1, 2, 3, 4] and all(sn.status is Status.PENDING for sn in first)
    assert state.in_flight == MAX_IN_FLIGHT and state.next_nodes() == []
    state.on_reply(nodes[2].id, b"tok")
    assert ids(state.next_nodes()) == [5]
    assert state.next_nodes() == []


def test_slow_nodes_free_a_slot_and_may_still_answer():
    state, nodes = search_with(range(1, 21))
    state.next_nodes()
    state.on_slow(nodes[1].id)
    assert state.get(nodes[1].id).status is Status.SLOW and state.in_flight == 3
    assert ids(state.next_nodes()) == [5]
    assert state.waiting
    state.on_reply(nodes[1].id, b"tok")  # a late answer still counts
    assert state.get(nodes[1].id).status is Status.SYNCED
    state.on_slow(nodes[1].id)  # not pending any more: no effect
    assert state.get(nodes[1].id).status is Status.SYNCED


def test_slow_and_failed_nodes_do_not_count_among_the_14():
    state, _ = search_with(range(1, 15))
    for sn in state.next_nodes():
        state.on_failure(sn.node.id)
    assert state.add(node(100))  # 4 failed: room for more usable nodes
    assert len([sn for sn in state.nodes if sn.usable]) == SEARCH_NODES - 4 + 1


def test_done_when_first_8_synced():
    state, nodes = search_with(range(1, 15))
    while not state.done:
        batch = state.next_nodes()
        assert batch
        for sn in batch:
            state.on_reply(sn.node.id, b"t" * 32)
    assert ids(state.synced()) == list(range(1, K + 1))
    assert state.get(nodes[9].id).status is Status.NEW  # nodes beyond the first 8 were never asked
    assert [sn.token for sn in state.synced()] == [b"t" * 32] * K


def test_a_slow_node_leaves_the_first_8():
    state, nodes = search_with(range(1, 15))
    first = state.next_nodes()
    state.on_slow(nodes[1].id)
    for sn in first[1:]:
        state.on_reply(sn.node.id, b"tok")
    assert not state.done
    for _ in range(10):
        for sn in state.next_nodes():
            state.on_reply(sn.node.id, b"tok")
    # The slow node is no longer among the first 8 usable, so once 2..9 are synced the search is done.
    assert state.done and ids(state.first()) == list(range(2, 10))
    assert state.waiting  # the slow request is still out


def test_token_of_65_bytes_fails_the_node():
    state, nodes = search_with(range(1, 10))
    state.next_nodes()
    state.on_reply(nodes[1].id, b"x" * 65)
    state.on_reply(nodes[2].id, None)
    state.on_reply(nodes[3].id, b"")
    state.on_reply(nodes[4].id, b"x" * 64)
    assert [state.get(nodes[d].id).status for d in (1, 2, 3, 4)] == [
        Status.FAILED,
        Status.FAILED,
        Status.FAILED,
        Status.SYNCED,
    ]
    assert ids(state.first(3)) == [4, 5, 6]


def test_done_when_nobody_is_left():
    state, _ = search_with([1, 2])
    assert not state.done
    for sn in state.next_nodes():
        state.on_failure(sn.node.id)
    assert state.done and not state.waiting and state.synced() == []
    assert SearchState(TARGET).done  # an empty search has nothing to do


def test_expired_nodes_are_not_asked():
    state, nodes = search_with([1, 2, 3])
    nodes[1].request_failed()
    assert ids(state.next_nodes()) == [2, 3]


def test_unknown_ids_are_ignored():
    state, _ = search_with([1])
    other = InfoHash.from_int(999)
    state.on_reply(other, b"t")
    state.on_slow(other)
    state.on_failure(other)
    assert state.get(other) is None
