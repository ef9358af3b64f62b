"""The node's sans-IO protocol (trio_dht.node.protocol), driven synchronously: datagrams and times in, the
datagrams it sends out. No sockets, no tasks, no clock."""

from __future__ import annotations

import os

from trio_dht.infohash import InfoHash
from trio_dht.limits import Limits
from trio_dht.node.protocol import ERROR_TEXTS, NodeProtocol
from trio_dht.node.ratelimit import UdpRateLimiter
from trio_dht.node.transactions import FAIL_AFTER
from trio_dht.value import Value
from trio_dht.wire.compact import Address
from trio_dht.wire.message import Encoder, ErrorCode, Kind, Message, decode, fragments

T0 = 1000.0
WALL = 1_700_000_000.0
SA = bytes([192, 0, 2, 1])


class Peer:
    """A remote node: an id, an address, its encoder."""

    def __init__(self, port: int = 5000) -> None:
        self.id = InfoHash.random()
        self.addr: Address = ("192.0.2.1", port)
        self.encoder = Encoder(self.id, agent="o2")
        self.tid = 100

    def request(self, method: str, args: dict) -> bytes:
        self.tid += 1
        return self.encoder.request(self.tid, method, args)


class Driven:
    """A protocol whose sent datagrams are decoded into :attr:`sent`."""

    def __init__(self, **kwargs) -> None:
        self.protocol = NodeProtocol(InfoHash.random(), now=T0, wall_clock=lambda: WALL, **kwargs)
        self.protocol.families.add(False)
        self.protocol.send = lambda data, addr: self.sent.append((decode(data), addr))
        self.sent: list[tuple[Message, Address]] = []

    def feed(self, data: bytes, addr: Address, now: float = T0) -> list[tuple[Message, Address]]:
        """Feed one datagram; returns (and forgets) what was sent since the last call."""
        self.protocol.datagram_received(data, addr, now)
        out, self.sent = self.sent, []
        return out

    def replies(self, data: bytes, peer: Peer, now: float = T0) -> list[Message]:
        """What answers ``data`` from ``peer`` (its confirmation pings left out)."""
        return [
            m for m, a in self.feed(data, peer.addr, now) if a == peer.addr and m.kind is not Kind.REQUEST
        ]

    def validated(self, peer: Peer) -> None:
        self.protocol.validation.validate(peer.addr)


def test_a_ping_is_answered_and_its_sender_queued_for_confirmation():
    driven, peer = Driven(), Peer()
    wakes: list[None] = []
    driven.protocol.wake_confirms = lambda: wakes.append(None)
    sent = driven.feed(peer.request("ping", {}), peer.addr)
    [(pong, to)] = sent
    assert (pong.kind, pong.tid, pong.sender, pong.requester_ip, to) == (
        Kind.REPLY,
        peer.tid,
        driven.protocol.id,
        SA,
        peer.addr,
    )
    assert driven.protocol.counters.requests["ping"] == 1 and wakes == [None]
    driven.protocol.send_confirmations(T0)
    [(ping, to)] = driven.sent
    assert (ping.kind, ping.method, to) == (Kind.REQUEST, "ping", peer.addr)


def test_a_confirmation_ping_that_ends_frees_its_slot_for_the_next():
    driven = Driven(limits=Limits(udp_confirm_in_flight=1))
    peers = [Peer(5000 + i) for i in range(2)]
    for peer in peers:
        driven.feed(peer.request("ping", {}), peer.addr)
    driven.protocol.send_confirmations(T0)
    [(ping, to)] = driven.sent
    assert to == peers[0].addr
    driven.sent = []
    wakes: list[None] = []
    driven.protocol.wake_confirms = lambda: wakes.append(None)
    driven.feed(peers[0].encoder.reply(ping.tid, {"sa": SA}), peers[0].addr, T0 + 0.1)
    assert wakes == [None]  # the reply ended the ping: the next one may go
    driven.protocol.send_confirmations(T0 + 0.1)
    assert [to for _, to in driven.sent] == [peers[1].addr]
    assert driven.protocol.tables[False].get(peers[0].id).is_good(T0 + 0.1)


def test_a_get_is_answered_with_the_stored_values():
    driven, peer = Driven(), Peer()
    driven.validated(peer)
    key = InfoHash.get("k")
    driven.protocol.store(key, Value(b"one", id=1), T0, local=True)
    driven.protocol.store(key, Value(b"two", id=2), T0, local=True)
    [reply] = driven.replies(peer.request("get", {"h": key}), peer)
    assert reply.tid == peer.tid and len(reply.token) == 32
    assert sorted((v.id, v.data) for v in reply.values) == [(1, b"one"), (2, b"two")]


def test_a_put_with_a_bad_token_is_refused():
    driven, peer = Driven(), Peer()
    key = InfoHash.get("k")
    put = peer.request("put", {"h": key, "values": [Value(b"x", id=5).to_wire()], "token": bytes(32)})
    [error] = driven.replies(put, peer)
    assert (error.kind, error.error_code, error.error_text) == (
        Kind.ERROR,
        ErrorCode.UNAUTHORIZED,
        ERROR_TEXTS["put_token"],
    )
    assert driven.protocol.storage.value_count == 0
    assert not driven.protocol.validation.is_validated(peer.addr)


def test_a_put_with_its_token_is_stored_and_pushed_to_a_remote_listener():
    driven, putter, listener = Driven(), Peer(5000), Peer(5001)
    key = InfoHash.get("k")
    [got] = driven.replies(listener.request("get", {"h": key}), listener)
    driven.replies(listener.request("listen", {"ve": 1, "h": key, "token": got.token, "sid": 7}), listener)
    [got] = driven.replies(putter.request("get", {"h": key}), putter)
    created = int(WALL) - 30
    put = {"h": key, "values": [Value(b"x", id=5).to_wire()], "token": got.token, "c": created}
    sent = driven.feed(putter.request("put", put), putter.addr)
    assert [(m.value_id, a) for m, a in sent if m.kind is Kind.REPLY] == [(5, putter.addr)]
    [update] = [m for m, a in sent if m.method == "update" and a == listener.addr]
    assert update.sid == 7 and [v.id for v in update.values] == [5]
    stored = driven.protocol.storage.stored(key, 5)
    assert stored is not None and stored.expiration == T0 - 30 + 600  # aged by its wall-clock ``c``


def test_a_fragment_without_a_pending_request_is_dropped():
    driven, peer = Driven(), Peer()
    frag = fragments(7, [os.urandom(2000)])[0]
    assert driven.feed(frag, peer.addr) == []
    assert len(driven.protocol.reassembler) == 0 and driven.protocol.reassembler.unsolicited == 1


def test_a_request_is_resent_then_fails_on_the_timer():
    driven, peer = Driven(), Peer()
    done: list[Message | None] = []
    tid = driven.protocol.start_request(peer.addr, "ping", {}, done.append, T0, node_id=peer.id)
    assert [(m.tid, a) for m, a in driven.sent] == [(tid, peer.addr)]
    driven.protocol.timer(T0 + 4)  # both resends are due
    assert [m.tid for m, _ in driven.sent] == [tid] * 3 and done == []
    driven.protocol.timer(T0 + FAIL_AFTER + 0.1)
    assert done == [None] and len(driven.protocol.transactions) == 0


def test_a_reply_from_another_node_id_is_ignored():
    driven, peer = Driven(), Peer()
    done: list[Message | None] = []
    tid = driven.protocol.start_request(peer.addr, "ping", {}, done.append, T0, node_id=peer.id)
    impostor = Encoder(InfoHash.random())
    driven.feed(impostor.reply(tid, {"sa": SA}), peer.addr)
    assert done == []
    driven.feed(peer.encoder.reply(tid, {"sa": SA}), peer.addr)
    assert [m.tid for m in done] == [tid] and driven.protocol.validation.is_validated(peer.addr)


def test_rate_limited_and_martian_requests_get_nothing():
    driven, peer = Driven(rate_limiter=UdpRateLimiter(per_ip=1, total=-1)), Peer()
    assert driven.replies(peer.request("ping", {}), peer)
    assert driven.feed(peer.request("ping", {}), peer.addr) == []
    assert driven.feed(peer.request("ping", {}), ("0.0.0.1", 5)) == []
    counters = driven.protocol.counters
    assert (counters.received, counters.dropped_rate, counters.dropped_martian) == (3, 1, 1)


def test_a_value_expires_at_its_time_and_remote_listeners_hear_of_it():
    driven, listener = Driven(), Peer()
    key = InfoHash.get("k")
    wakes: list[None] = []
    driven.protocol.wake_expiry = lambda: wakes.append(None)
    [got] = driven.replies(listener.request("get", {"h": key}), listener)
    driven.replies(listener.request("listen", {"ve": 1, "h": key, "token": got.token, "sid": 3}), listener)
    driven.protocol.store(key, Value(b"x", type=5, id=9), T0, local=True)  # lives 60 s
    assert wakes == [None]
    driven.sent = []
    driven.protocol.expire(T0 + 59)
    assert driven.sent == [] and driven.protocol.storage.get_value(key, 9) is not None
    driven.protocol.expire(T0 + 60)
    [(update, to)] = driven.sent
    assert (update.method, update.expired, update.sid, to) == ("update", [9], 3, listener.addr)


# -- what a datagram costs, and who may start a reassembly ---------------------------------------------------


def token(driven: Driven, peer: Peer, key: InfoHash) -> bytes:
    [reply] = driven.replies(peer.request("get", {"h": key}), peer)
    return reply.token


def test_inline_puts_are_rate_limited():
    driven, peer = Driven(rate_limiter=UdpRateLimiter(per_ip=3, total=-1)), Peer()
    key = InfoHash.get("rate")
    tok = token(driven, peer, key)  # request 1
    replies = []
    for i in range(5):  # requests 2..6: only 2 and 3 pass
        args = {"h": key, "values": [Value(b"x", id=i + 1).to_wire()], "token": tok}
        replies += [m for m, _ in driven.feed(peer.request("put", args), peer.addr) if m.kind is Kind.REPLY]
    assert [m.value_id for m in replies] == [1, 2]
    assert driven.protocol.counters.dropped_rate == 3


def test_a_fragmented_put_counts_once_for_the_rate_limiter():
    driven, peer = Driven(rate_limiter=UdpRateLimiter(per_ip=2, total=-1)), Peer()
    key = InfoHash.get("rate fragments")
    tok = token(driven, peer, key)
    peer.tid += 1
    sent = []
    for d in peer.encoder.request_with_values(
        peer.tid, "put", {"h": key, "token": tok}, [Value(os.urandom(5000), id=9)]
    ):
        sent += driven.feed(d, peer.addr)
    assert [m.value_id for m, _ in sent if m.kind is Kind.REPLY] == [9]
    assert driven.protocol.counters.dropped_rate == 0


def test_drops_are_counted():
    driven, peer = Driven(), Peer()
    counters = driven.protocol.counters
    assert driven.feed(b"\xc1garbage", peer.addr) == []
    assert driven.feed(peer.request("ping", {}), ("0.0.0.1", 5)) == []
    assert driven.feed(Encoder(peer.id, network=3).request(1, "ping", {}), peer.addr) == []
    assert driven.feed(Encoder(driven.protocol.id).request(1, "ping", {}), peer.addr) == []
    assert (counters.dropped_malformed, counters.dropped_martian) == (1, 1)
    assert (counters.dropped_network, counters.dropped_self) == (1, 1)
    frag = fragments(7, [b"lonely"])[0]
    assert driven.feed(frag, peer.addr) == []  # a fragment without header: no reply


def test_a_fragmented_reply_is_reassembled_only_from_the_address_asked():
    driven, peer = Driven(), Peer()
    protocol = driven.protocol
    value = Value(os.urandom(20_000), id=5)
    got: list[Message | None] = []
    tid = protocol.start_request(peer.addr, "get", {"h": InfoHash.get("k")}, got.append, T0, node_id=peer.id)
    reply = peer.encoder.reply_with_values(tid, {"sa": SA, "token": b"t" * 32}, [value])
    for datagram in reply:
        driven.feed(datagram, (peer.addr[0], 5999))  # another port: not the address asked
    assert got == [] and protocol.counters.dropped_unsolicited == 1
    for datagram in reply:
        driven.feed(datagram, peer.addr)
    assert [v.data for v in got[0].values] == [value.data]
    assert protocol.reassembler.held == 0  # the stray fragments started nothing
    assert protocol.validation.is_validated(peer.addr)


def test_a_write_token_validates_the_address():
    driven, peer = Driven(), Peer()
    key = InfoHash.get("token")
    tok = token(driven, peer, key)
    assert not driven.protocol.validation.is_validated(peer.addr)
    put = peer.request("put", {"h": key, "values": [Value(b"x", id=3).to_wire()], "token": tok})
    driven.feed(put, peer.addr)
    assert driven.protocol.validation.is_validated(peer.addr)
