"""The UDP node's sans-IO bounds: the confirmation queue (trio_dht.node.confirm) and anti-amplification
(trio_dht.node.validation), driven synchronously with explicit times."""

from __future__ import annotations

import socket

import trio

from trio_dht.infohash import InfoHash
from trio_dht.limits import Limits
from trio_dht.node import udp
from trio_dht.node.confirm import MAX_WAIT, ConfirmQueue, Pushed
from trio_dht.node.routing import Node
from trio_dht.node.validation import AddressValidation, smaller_answers
from trio_dht.wire.message import Encoder, decode


def node(port: int = 4222) -> Node:
    return Node(InfoHash.random(), ("127.0.0.1", port))


# -- confirmation queue --------------------------------------------------------------------------------------


def test_confirm_queue_is_bounded_and_counts_drops():
    q = ConfirmQueue(Limits(udp_confirm_queue=10, udp_confirm_in_flight=3))
    nodes = [node(i) for i in range(25)]
    assert [q.push(n, 0.0) for n in nodes] == [Pushed.SEND] * 10 + [Pushed.FULL] * 15
    assert not Pushed.FULL and Pushed.SEND and Pushed.QUEUED and Pushed.HELD
    assert len(q) == 10 and q.dropped_full == 15


def test_confirm_queue_pings_a_bounded_number_at_once():
    q = ConfirmQueue(Limits(udp_confirm_queue=10, udp_confirm_in_flight=3))
    nodes = [node(i) for i in range(5)]
    for n in nodes:
        q.push(n, 0.0)
    first = q.ready(0.0)
    assert first == nodes[:3] and q.in_flight == 3 and q.ready(0.0) == []
    q.done(first[0])
    assert q.ready(0.1) == [nodes[3]]  # one slot freed: one more, in arrival order
    for n in first[1:]:
        q.done(n)
    assert q.ready(0.2) == [nodes[4]] and len(q) == 0


def test_confirm_queue_holds_a_node_once():
    q = ConfirmQueue(Limits(udp_confirm_queue=10, udp_confirm_in_flight=1))
    n = node()
    assert q.push(n, 0.0) and q.push(n, 0.0) and len(q) == 1 and n.id in q.held
    assert q.ready(0.0) == [n]
    assert q.push(n, 1.0) and len(q) == 0 and n.id in q.held  # being pinged: not queued again
    q.done(n)
    assert n.id not in q.held
    assert q.push(n, 2.0) and len(q) == 1


def test_confirm_queue_forgets_a_stale_node():
    q = ConfirmQueue(Limits(udp_confirm_queue=10, udp_confirm_in_flight=1))
    n = node()
    q.push(n, 0.0)
    assert q.ready(MAX_WAIT + 1) == [] and n.id not in q.held and q.dropped_stale == 1


def test_confirm_queue_asks_for_a_send_only_when_a_new_node_has_a_free_slot():
    q = ConfirmQueue(Limits(udp_confirm_queue=10, udp_confirm_in_flight=1))
    a, b = node(1), node(2)
    assert q.push(a, 0.0) is Pushed.SEND
    assert q.push(a, 0.0) is Pushed.HELD  # queued already: no new wake-up
    assert q.ready(0.0) == [a]
    assert q.push(a, 0.1) is Pushed.HELD  # in flight
    assert q.push(b, 0.1) is Pushed.QUEUED  # no free slot: the end of a's ping sends it
    q.done(a)
    assert q.ready(0.2) == [b]


def test_confirm_queue_drops_nodes_that_waited_too_long():
    q = ConfirmQueue(Limits(udp_confirm_queue=10, udp_confirm_in_flight=1))
    old, new = node(1), node(2)
    q.push(old, 0.0)
    q.push(new, MAX_WAIT)
    assert q.ready(MAX_WAIT + 1) == [new] and q.dropped_stale == 1


# -- anti-amplification --------------------------------------------------------------------------------------

A = ("192.0.2.1", 4222)
B = ("192.0.2.2", 4222)


def test_an_unvalidated_address_gets_three_times_what_it_sent():
    v = AddressValidation(Limits(udp_amplification=3.0))
    assert not v.is_validated(A) and v.credit(A) == 0
    assert v.received(A, 66) == 198
    v.spend(A, 150)
    assert v.credit(A) == 48
    assert v.received(A, 10) == 78  # credit accumulates over datagrams
    assert v.credit(B) == 0


def test_validated_addresses_are_unlimited():
    v = AddressValidation()
    v.received(A, 66)
    v.validate(A)
    assert v.is_validated(A) and v.credit(A) == float("inf")
    assert v.received(A, 66) == float("inf")  # and counts nothing
    assert v.within_credit(A, "get", [b"x" * 10_000], 0.0, False, lambda: []) == [b"x" * 10_000]


def test_both_tables_are_capped_with_lru_eviction():
    v = AddressValidation(Limits(udp_validated_addresses=3))
    for i in range(3):
        v.validate(("192.0.2.1", i))
    assert v.is_validated(("192.0.2.1", 0))  # used: now the most recent
    v.validate(("192.0.2.1", 3))
    assert len(v) == 3 and v.evicted == 1
    assert v.is_validated(("192.0.2.1", 0)) and not v.is_validated(("192.0.2.1", 1))
    for i in range(10):
        v.received(("198.51.100.1", i), 100)
    assert len(v._credit) == 3 and v.evicted == 8
    assert v.credit(("198.51.100.1", 0)) == 0  # evicted: no credit left (it may only send less)
    assert v.credit(("198.51.100.1", 9)) == 300


def test_an_answer_is_deferred_once_per_address():
    v = AddressValidation()
    assert not v.defer(A)  # nothing received from it
    v.received(A, 60)
    assert v.defer(A) and not v.defer(A) and v.deferred == 1
    v.received(A, 60)
    assert not v.defer(A)


def test_an_answer_past_the_credit_is_deferred_once_then_cut_down_then_withheld():
    v = AddressValidation(Limits(udp_amplification=3.0))
    big, mid, small = [b"v" * 900, b"v" * 900], b"n" * 250, b"t" * 100
    credit = v.received(A, 100)  # 300 bytes
    assert v.within_credit(A, "get", big, credit, True, lambda: [mid, small]) == []  # deferred (pinging)
    assert v.deferred == 1 and v.withheld_bytes == 1800
    assert v.within_credit(A, "get", big, credit, True, lambda: [mid, small]) == [mid]  # the largest fitting
    assert v.credit(A) == 50 and v.limited == 2 and v.withheld_bytes == 1800 + 1550
    assert v.within_credit(A, "get", big, v.credit(A), False, lambda: [mid, small]) == []  # none fits
    assert v.within_credit(A, "ping", [b"p" * 40], v.credit(A), False, list) == [b"p" * 40]
    assert v.credit(A) == 10 and v.limited == 3


def test_smaller_answers_shrink_a_get_to_nodes_then_half_then_the_token():
    nodes = [(InfoHash.random(), (f"192.0.2.{i}", 4222)) for i in range(1, 9)]
    answers = list(
        smaller_answers(Encoder(InfoHash.random()), 7, "get", b"\x7f\0\0\1", b"t" * 32, nodes, [], 4)
    )
    assert [len(decode(a).nodes4) for a in answers] == [8, 4, 0]
    assert all(decode(a).token == b"t" * 32 and decode(a).tid == 7 for a in answers)
    assert len(list(smaller_answers(Encoder(InfoHash.random()), 7, "find", b"", b"", nodes, [], 4))) == 2


# -- the send queue ------------------------------------------------------------------------------------------


async def test_send_queue_is_bounded_and_drops_what_waited_too_long(monkeypatch, autojump_clock):
    monkeypatch.setattr(udp, "MAX_QUEUED", 3)
    endpoint = udp.UdpEndpoint(socket.AF_INET, "127.0.0.1", 0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.setblocking(False)
        to = receiver.getsockname()
        for i in range(5):  # as if the socket buffer were full: queued, the last two past the bound
            endpoint._enqueue(b"old %d" % i, to)
        assert endpoint.queue_drops == 2
        async with trio.open_nursery() as nursery:
            await trio.sleep(udp.MAX_QUEUE_AGE + 1)  # the flusher has not run yet: all three are stale
            nursery.start_soon(endpoint._flush)
            await trio.sleep(0.1)
            endpoint._enqueue(b"fresh", to)
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
        assert endpoint.queue_drops == 5 and endpoint.sent == 1
        assert receiver.recv(100) == b"fresh"
    endpoint.close()


def test_confirm_queue_sends_as_slots_free():
    q = ConfirmQueue(Limits(udp_confirm_queue=10, udp_confirm_in_flight=2))
    nodes = [node(i) for i in range(4)]
    for n in nodes:
        q.push(n, 0.0)
    sent = q.ready(1.0)
    assert sent == nodes[:2] and q.in_flight == 2
    q.done(sent[0])  # the first ping ends (unanswered): the third goes out
    sent += q.ready(1.0)
    assert sent == nodes[:3] and q.in_flight == 2
    q.done(sent[1])
    q.done(sent[2])
    sent += q.ready(1.0)
    assert sent == nodes and q.in_flight == 1 and len(q) == 0
