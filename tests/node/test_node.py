"""The DHT node (trio_dht.node.dht) on loopback, with our nodes and hand-built raw peers only.

Two ways of driving it:
- real sockets on 127.0.0.1 and real time, for what crosses the network (put/get/listen between nodes, the
  exact replies a raw peer gets, fragments, the ``exp`` push of a value put with an old ``c``);
- a node without sockets fed through ``handle_datagram`` under MockClock (``autojump_clock``), for
  everything that takes minutes: value lifetimes, ``exp`` pushes after 60 s / 10 min, retransmissions.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import msgpack
import pytest
import trio

from trio_dht.infohash import InfoHash
from trio_dht.limits import Limits
from trio_dht.node import open_node
from trio_dht.value import Query, Value
from trio_dht.wire.message import Encoder, Kind, Message, decode
from trio_dht.wire.reassembly import Reassembler

LOCAL = "127.0.0.1"
SA = bytes([127, 0, 0, 1])


# -- helpers ----------------------------------------------------------------------------------------------


async def token_from(peer, node_addr, key: InfoHash) -> bytes:
    reply = await peer.ask(node_addr, "get", {"h": key})
    assert reply.kind is Kind.REPLY and reply.token is not None
    return reply.token


def node_addr(node) -> tuple[str, int]:
    return (LOCAL, node.bound_port)


async def next_request(peer, method: str, timeout: float = 5.0) -> tuple[Message, tuple[str, int]]:
    """The next request of ``method`` the raw peer receives (other datagrams are skipped)."""
    with trio.fail_after(timeout):
        while True:
            msg, addr = await peer.recv(timeout)
            if msg.kind is Kind.REQUEST and msg.method == method:
                return msg, addr


async def replies_to(peer, tid: int, count: int) -> list[Message]:
    """The next ``count`` replies (or errors) with this ``t``; other datagrams are skipped."""
    out = []
    with trio.fail_after(5):
        while len(out) < count:
            msg, _ = await peer.recv()
            if msg.tid == tid and msg.kind in (Kind.REPLY, Kind.ERROR):
                out.append(msg)
    return out


async def answer(peer, msg: Message, addr) -> None:
    await peer.send(peer.encoder.reply(msg.tid, {"sa": SA}), addr)


@pytest.fixture
async def lone_node():
    async with open_node(port=0, host=LOCAL, host6=None) as node:
        yield node


# -- between our nodes -----------------------------------------------------------------------------------


async def test_put_get_listen_across_nodes(open_network):
    async with open_network(4) as net:
        a, b, c, d = net.nodes
        key = InfoHash.get("across")
        with trio.fail_after(20):
            async with d.listen(key) as events:
                await trio.sleep(0.3)  # let the listen reach the storing nodes
                value = Value(b"hello across", utype="text/plain")
                assert await b.put(key, value)
                found = await c.get(key)
                assert [(v.id, v.data, v.utype) for v in found] == [(value.id, b"hello across", "text/plain")]
                event = await events.receive()
                assert not event.expired and event.value.id == value.id and event.value.data == value.data
        stored_on = [n for n in net.nodes if n.storage.get_value(key, value.id) is not None]
        assert len(stored_on) == 4  # fewer than 8 nodes: every node stores
        assert await a.get(InfoHash.get("nothing here")) == []


async def test_get_with_query_between_nodes(open_network):
    async with open_network(3) as net:
        key = InfoHash.get("typed")
        for t in (1, 3):
            await net.nodes[0].put(key, Value(b"t%d" % t, type=t))
        got = await net.nodes[2].get(key, Query((), ((2, 3),)))
        assert [v.data for v in got] == [b"t3"]


async def test_60_kb_value_between_nodes(open_network):
    async with open_network(3) as net:
        key = InfoHash.get("large")
        value = Value(os.urandom(60_000))
        with trio.fail_after(20):
            assert await net.nodes[0].put(key, value)
            assert net.nodes[1].storage.get_value(key, value.id).data == value.data
            got = await net.nodes[2].get(key)
        assert [v.data for v in got] == [value.data]


# -- one node and a raw peer (hand-made datagrams on a UDP socket) ------------------------------------------


async def test_ping_find_get_replies(lone_node, raw_peer):
    to = node_addr(lone_node)
    pong = await raw_peer.ask(to, "ping", {})
    assert (pong.kind, pong.sender, pong.requester_ip) == (Kind.REPLY, lone_node.node_id, SA)
    found = await raw_peer.ask(to, "find", {"target": InfoHash.random(), "w": [2, 10]})
    assert len(found.token) == 32 and found.nodes4 == [] and found.nodes6 == []
    got = await raw_peer.ask(to, "get", {"h": InfoHash.random()})
    assert got.token == found.token and not got.has_values  # unknown key: nodes and token, no values
    assert lone_node.counters.requests["ping"] == 1


async def test_node_lists_only_good_nodes_and_not_clients(open_network, open_raw_peer):
    async with open_network(2) as net, open_raw_peer() as client, open_raw_peer() as silent:
        a, b = net.nodes
        to = node_addr(a)
        # A peer that only sends requests (and never answers one) stays dubious: not listed.
        await silent.send(silent.encoder.request(1, "ping", {}), to)
        assert (await silent.sock.recvfrom(65536))[0]  # the pong (the node's ping to it goes unanswered)
        client.encoder = Encoder(client.id, is_client=True, agent="o2")
        assert (await client.ask(to, "ping", {})).kind is Kind.REPLY  # s: true is answered
        await client.expect_none(0.3)  # answers any ping it gets (it gets none: clients are not tabled)
        assert a.tables[False].get(client.id) is None
        reply = await client.ask(to, "find", {"target": InfoHash.random()})
        assert [nid for nid, _ in reply.nodes4] == [b.node_id]
        assert reply.nodes4[0][1] == (LOCAL, b.bound_port)
        # Once a peer answers one of the node's requests, it is listed.
        async with open_raw_peer() as plain:
            await plain.ask(to, "ping", {})
            with trio.move_on_after(5):
                while not a.tables[False].get(plain.id).is_good(trio.current_time()):
                    await plain.expect_none(0.05)  # answers the node's confirmation ping
            reply = await client.ask(to, "find", {"target": InfoHash.random()})
            assert {nid for nid, _ in reply.nodes4} == {b.node_id, plain.id}


async def test_duplicate_requests_are_answered_idempotently(lone_node, open_raw_peer):
    to = node_addr(lone_node)
    key = InfoHash.get("dup")
    async with open_raw_peer() as peer, open_raw_peer() as listener:
        # A listener, to see what the duplicate put triggers.
        ltok = await token_from(listener, to, key)
        await listener.ask(to, "listen", {"ve": 1, "h": key, "token": ltok, "sid": 5001})
        ping = peer.encoder.request(42, "ping", {})
        await peer.send(ping, to)
        await peer.send(ping, to)
        assert [m.kind for m in await replies_to(peer, 42, 2)] == [Kind.REPLY] * 2
        tok = await token_from(peer, to, key)
        value = Value(b"once", id=101)
        put = peer.encoder.request_with_values(43, "put", {"h": key, "token": tok}, [value])[0]
        await peer.send(put, to)
        update, addr = await next_request(listener, "update")
        assert [v.id for v in update.values] == [101] and update.sid == 5001
        await answer(listener, update, addr)
        await peer.send(put, to)
        assert [m.value_id for m in await replies_to(peer, 43, 2)] == [101, 101]
        refresh, addr = await next_request(listener, "update")  # the copy counts as a refresh
        assert refresh.refreshed == [101] and not refresh.has_values and refresh.info_hash is None
        await answer(listener, refresh, addr)
        assert lone_node.storage.value_count == 1 and lone_node.remote_listeners.count() == 1
        # A repeated listen with the same sid opens no second subscription and pushes nothing.
        await listener.ask(to, "listen", {"ve": 1, "h": key, "token": ltok, "sid": 5001})
        assert lone_node.remote_listeners.count() == 1
        await listener.expect_none(0.3)


async def test_errors(lone_node, open_raw_peer):
    to = node_addr(lone_node)
    key = InfoHash.get("errors")
    async with open_raw_peer() as peer, open_raw_peer() as other:
        tok = await token_from(peer, to, key)
        other_tok = await token_from(other, to, key)  # issued to another port
        v = Value(b"x", id=5).to_wire()
        cases = [
            ("put", {"h": key, "values": [v], "token": bytes(32)}, 401, "Put with incorrect token"),
            ("put", {"h": key, "values": [v]}, 401, "Put with incorrect token"),
            ("put", {"h": key, "values": [v], "token": other_tok}, 401, "Put with incorrect token"),
            ("put", {"h": key, "values": [{**v, "id": 0}], "token": tok}, 203, "Put with invalid ID"),
            ("put", {"values": [v], "token": tok}, 203, "Put with no info_hash"),
            ("get", {}, 203, "Get_values with no info_hash"),
            ("listen", {"ve": 1, "h": key, "sid": 1, "token": other_tok}, 401, "Listen with incorrect token"),
            ("listen", {"ve": 1, "sid": 1, "token": tok}, 203, "Listen with no info_hash"),
            ("refresh", {"h": key, "vid": 5, "token": tok}, 404, "Access operation for unknown storage"),
            ("refresh", {"h": key, "vid": 5, "token": b"bad"}, 401, "Put with incorrect token"),
        ]
        for method, args, code, text in cases:
            err = await peer.ask(to, method, args)
            assert (err.kind, err.error_code, err.error_text) == (Kind.ERROR, code, text), (method, args)
            assert err.sender == lone_node.node_id  # errors carry r: {id}
        assert lone_node.storage.value_count == 0
        raw = msgpack.unpackb(await send_and_read_raw(peer, to, "get", {}))
        assert list(raw) == ["e", "r", "t", "y", "v"] and list(raw["r"]) == ["id"]


async def send_and_read_raw(peer, to, method: str, args: dict[str, Any]) -> bytes:
    await peer.send(peer.encoder.request(peer.next_tid(), method, args), to)
    return await peer.recv_raw()


async def test_refresh(lone_node, raw_peer):
    to = node_addr(lone_node)
    key = InfoHash.get("refresh")
    tok = await token_from(raw_peer, to, key)
    value = Value(b"r", id=77)
    reply = await raw_peer.ask(to, "put", {"h": key, "values": [value.to_wire()], "token": tok})
    assert reply.value_id == 77
    reply = await raw_peer.ask(to, "refresh", {"h": key, "vid": 77, "token": tok})
    assert (reply.kind, reply.value_id, reply.requester_ip) == (Kind.REPLY, 77, SA)
    reply = await raw_peer.ask(to, "refresh", {"h": key, "vid": 999, "token": tok})
    assert (reply.kind, reply.value_id) == (Kind.REPLY, 999)  # unknown vid under a known key: answered


async def test_get_with_select_answers_fileds(lone_node, raw_peer):
    to = node_addr(lone_node)
    key = InfoHash.get("select")
    tok = await token_from(raw_peer, to, key)
    vid = 1234605616436508552
    await raw_peer.ask(
        to, "put", {"h": key, "values": [Value(b"hello from py", id=vid).to_wire()], "token": tok}
    )
    reply = await raw_peer.ask(to, "get", {"h": key, "q": {"s": [1], "w": []}})
    assert reply.fields == ((1,), [vid]) and not reply.has_values
    reply = await raw_peer.ask(to, "get", {"h": key, "q": {"s": [1, 4], "w": []}})
    assert reply.fields == ((1, 4), [vid, 0])
    reply = await raw_peer.ask(to, "get", {"h": key, "q": {"s": [1, 2, 3, 4, 5], "w": []}})
    assert reply.fields == ((1, 2, 3, 4, 5), [vid, 0, bytes(20), 0, ""])
    reply = await raw_peer.ask(to, "get", {"h": key, "q": {"s": [], "w": [{"f": 1, "v": vid}]}})
    assert [v.data for v in reply.values] == [b"hello from py"]
    reply = await raw_peer.ask(to, "get", {"h": key, "q": {"s": [], "w": [{"f": 1, "v": 5}]}})
    assert reply.kind is Kind.REPLY and not reply.has_values and reply.fields is None and reply.token


async def test_listen_then_put_pushes_update(lone_node, open_raw_peer):
    to = node_addr(lone_node)
    key = InfoHash.get("listen")
    async with open_raw_peer() as listener, open_raw_peer() as putter:
        await putter.ask(
            to,
            "put",
            {
                "h": key,
                "values": [Value(b"first", id=101).to_wire()],
                "token": await token_from(putter, to, key),
            },
        )
        ltok = await token_from(listener, to, key)
        tid = listener.next_tid()
        await listener.send(
            listener.encoder.request(tid, "listen", {"ve": 1, "h": key, "token": ltok, "sid": 5001}), to
        )
        # A new sid gets the stored values pushed, and the listen reply (with a token).
        got: dict[str, Message] = {}
        with trio.fail_after(5):
            while len(got) < 2:
                msg, addr = await listener.recv()
                if msg.kind is Kind.REQUEST and msg.method == "update":
                    await answer(listener, msg, addr)
                    got["update"] = msg
                elif msg.tid == tid:
                    got["reply"] = msg
        assert got["reply"].token == ltok and got["reply"].requester_ip == SA
        first = got["update"]
        assert (first.sid, first.info_hash, first.listen_version, first.token) == (5001, key, 1, ltok)
        assert [v.data for v in first.values] == [b"first"]
        # A Where that matches nothing stored: only the listen reply.
        reply = await listener.ask(
            to,
            "listen",
            {"ve": 1, "h": key, "token": ltok, "sid": 5002, "q": {"s": [], "w": [{"f": 2, "v": 7}]}},
        )
        assert reply.kind is Kind.REPLY
        await listener.expect_none(0.2)
        # A new value: pushed to sid 5001 only (5002's Where wants type 7).
        ptok = await token_from(putter, to, key)
        await putter.ask(to, "put", {"h": key, "values": [Value(b"second", id=102).to_wire()], "token": ptok})
        update, addr = await next_request(listener, "update")
        assert update.sid == 5001 and [v.id for v in update.values] == [102]
        raw = msgpack.unpackb(listener.last_raw)
        assert list(raw["a"]) == ["id", "ve", "h", "sid", "values", "token"]  # as OpenDHT packs it
        await answer(listener, update, addr)
        await listener.expect_none(0.2)
        # A value from the node's own API is pushed too, before its put search starts (which would time out
        # here: the raw peers are good nodes, as they answer pings, but never answer a find).
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lone_node.put, key, Value(b"third", id=103))
            update, addr = await next_request(listener, "update")
            assert [v.id for v in update.values] == [103]
            await answer(listener, update, addr)
            nursery.cancel_scope.cancel()


async def test_exp_pushed_when_a_short_lived_value_expires(lone_node, open_raw_peer):
    """Type 5 lives 60 s; put with ``c`` = now - 58 it expires ~2 s later and ``exp`` is pushed."""
    to = node_addr(lone_node)
    key = InfoHash.get("ice")
    async with open_raw_peer() as listener, open_raw_peer() as putter:
        ltok = await token_from(listener, to, key)
        await listener.ask(to, "listen", {"ve": 1, "h": key, "token": ltok, "sid": 5001})
        ptok = await token_from(putter, to, key)
        value = Value(b"ice", type=5, id=103)
        await putter.ask(
            to, "put", {"h": key, "values": [value.to_wire()], "token": ptok, "c": int(time.time()) - 58}
        )
        update, addr = await next_request(listener, "update")
        assert [v.id for v in update.values] == [103]
        await answer(listener, update, addr)
        with trio.fail_after(6):
            exp, addr = await next_request(listener, "update")
        await answer(listener, exp, addr)
        assert exp.expired == [103] and exp.sid == 5001 and exp.token == ltok
        assert exp.info_hash is None and exp.listen_version is None and not exp.has_values
        assert lone_node.storage.get(key) == []


async def test_60_kb_value_crosses_via_fragments(lone_node, raw_peer):
    to = node_addr(lone_node)
    key = InfoHash.get("fragments")
    tok = await token_from(raw_peer, to, key)
    value = Value(os.urandom(60_000), id=0xF00D)
    tid = raw_peer.next_tid()
    header, *frags = raw_peer.encoder.request_with_values(tid, "put", {"h": key, "token": tok}, [value])
    assert len(frags) == 47
    await raw_peer.send(header, to)
    for f in frags:
        await raw_peer.send(f, to)
    reply, _ = await raw_peer.recv()
    assert (reply.tid, reply.value_id) == (tid, 0xF00D)
    assert lone_node.storage.get_value(key, 0xF00D).data == value.data
    # And back: a get reply of header + 47 in-order fragments.
    tid = raw_peer.next_tid()
    await raw_peer.send(raw_peer.encoder.request(tid, "get", {"h": key}), to)
    datagrams = [await raw_peer.recv_raw() for _ in range(48)]
    header = decode(datagrams[0])
    assert header.value_sizes == [len(value.packed())] and header.token == tok
    assert [decode(d).parts[0][0] for d in datagrams[1:]] == list(range(0, 60_038, 1280))
    r = Reassembler()
    assert r.header(("x", tid), header, 0.0) is None
    done = [r.fragment(("x", tid), decode(d), 0.0) for d in datagrams[1:]][-1]
    assert [v.data for v in done.values] == [value.data]


async def test_fragments_out_of_order_are_accepted_after_their_header(lone_node, raw_peer):
    """A request's fragments that come before its header start nothing (counted); after it, any order."""
    to = node_addr(lone_node)
    key = InfoHash.get("reverse")
    tok = await token_from(raw_peer, to, key)
    value = Value(os.urandom(5_000), id=0xBEEF)
    tid = raw_peer.next_tid()
    header, *frags = raw_peer.encoder.request_with_values(tid, "put", {"h": key, "token": tok}, [value])
    for f in frags[::-1]:  # all before the header, in reverse: dropped
        await raw_peer.send(f, to)
    await raw_peer.send(header, to)
    for f in frags[::-1]:  # after it, in reverse
        await raw_peer.send(f, to)
    reply, _ = await raw_peer.recv()
    assert lone_node.info().extra["dropped_unsolicited_fragments"] == len(frags)
    assert reply.value_id == 0xBEEF and lone_node.storage.get_value(key, 0xBEEF).data == value.data


@pytest.mark.parametrize(
    "case",
    ["zero-id", "own-id", "network-5", "unknown-query", "no-valid-value", "value-too-large", "martian-s-int"],
)
async def test_silent_drops(lone_node, raw_peer, case):
    to = node_addr(lone_node)
    key = InfoHash.get("drops")
    tok = await token_from(raw_peer, to, key)
    ping = {"a": {"id": bytes(raw_peer.id)}, "q": "ping", "t": 9, "y": "q", "v": "o2"}
    before = lone_node.storage.value_count
    if case == "zero-id":
        await raw_peer.send({**ping, "a": {"id": bytes(20)}}, to)
    elif case == "own-id":
        await raw_peer.send({**ping, "a": {"id": bytes(lone_node.node_id)}}, to)
    elif case == "network-5":
        await raw_peer.send({**ping, "n": 5}, to)
    elif case == "unknown-query":
        await raw_peer.send({**ping, "q": "frobnicate"}, to)
    elif case == "no-valid-value":
        await raw_peer.send(
            raw_peer.encoder.request(
                9, "put", {"h": key, "token": tok, "values": [{"id": 81, "data": b"x"}]}
            ),
            to,
        )
    elif case == "value-too-large":
        big = Value(os.urandom(70_000), id=7)
        for d in raw_peer.encoder.request_with_values(9, "put", {"h": key, "token": tok}, [big]):
            await raw_peer.send(d, to)
    elif case == "martian-s-int":
        await raw_peer.send({**ping, "s": 1}, to)
    await raw_peer.expect_none(0.3)
    assert lone_node.storage.value_count == before
    assert (await raw_peer.ask(to, "ping", {})).kind is Kind.REPLY  # the node is fine


async def test_lenient_requests_are_answered(lone_node, raw_peer):
    to = node_addr(lone_node)
    ping = {"a": {"id": bytes(raw_peer.id)}, "q": "ping", "t": 9}
    await raw_peer.send(ping, to)  # no y, no v
    assert (await raw_peer.recv())[0].tid == 9
    await raw_peer.send({**ping, "t": "abcd", "zz": 1}, to)
    raw = msgpack.unpackb(await raw_peer.recv_raw())
    assert raw["t"] == 1633837924 and raw["y"] == "r"


# -- a node without sockets, under MockClock ---------------------------------------------------------------


class FakePeer:
    """A peer of a driven node: an id, an address and its encoder."""

    def __init__(self, port: int) -> None:
        self.id = InfoHash.random()
        self.addr = (LOCAL, port)
        self.encoder = Encoder(self.id, agent="o2")
        self.tid = 100

    def request(self, method: str, args: dict[str, Any]) -> bytes:
        self.tid += 1
        return self.encoder.request(self.tid, method, args)


async def known_storer(driven) -> FakePeer:
    """A peer the driven node knows (it pinged), as the one node of an IPv4-only network: where the node's
    listens look for storing nodes and send ``listen``. What the node sent so far is dropped."""
    driven.node.protocol.families.add(False)  # it searches and listens over IPv4 (the fixture captures sends)
    storer = FakePeer(5002)
    await driven.feed(storer.request("ping", {}), storer.addr)
    driven.take()
    return storer


async def driven_token(driven, peer: FakePeer, key: InfoHash) -> bytes:
    await driven.feed(peer.request("get", {"h": key}), peer.addr)
    (reply,) = [m for m, a in driven.take() if m.kind is Kind.REPLY and a == peer.addr]
    return reply.token


async def answer_updates(driven, peer: FakePeer) -> list[Message]:
    """Reply to every update the node sent to ``peer``; returns them."""
    updates = [m for m, a in driven.take("update") if a == peer.addr]
    for m in updates:
        await driven.feed(peer.encoder.reply(m.tid, {"sa": SA}), peer.addr)
    return updates


@pytest.mark.parametrize(("type_id", "lifetime"), [(0, 600.0), (5, 60.0)])
async def test_values_expire_on_time(open_driven_node, autojump_clock, type_id, lifetime):
    key = InfoHash.get("expiry")
    async with open_driven_node() as driven:
        node = driven.node
        putter, listener = FakePeer(5000), FakePeer(5001)
        ltok = await driven_token(driven, listener, key)
        await driven.feed(
            listener.request("listen", {"ve": 1, "h": key, "token": ltok, "sid": 9}), listener.addr
        )
        ptok = await driven_token(driven, putter, key)
        start = trio.current_time()
        value = Value(b"short", type=type_id, id=42)
        await driven.feed(
            putter.request("put", {"h": key, "values": [value.to_wire()], "token": ptok}), putter.addr
        )
        [pushed] = await answer_updates(driven, listener)
        assert [v.id for v in pushed.values] == [42]
        async with node.listen(key) as events:
            assert (await events.receive()).value.id == 42
            await trio.sleep_until(start + lifetime / 2)
            listen = {"ve": 1, "h": key, "token": ltok, "sid": 9}
            await driven.feed(listener.request("listen", listen), listener.addr)  # a listener refreshes
            await trio.sleep_until(start + lifetime - 1)
            assert node.storage.get_value(key, 42) is not None
            assert await answer_updates(driven, listener) == []
            with trio.fail_after(2):
                event = await events.receive()
                assert event.expired and event.value.id == 42
                assert trio.current_time() - start == pytest.approx(lifetime, abs=0.01)
                while not (exps := await answer_updates(driven, listener)):
                    await trio.sleep(0.01)
            assert trio.current_time() - start == pytest.approx(lifetime, abs=0.05)
            assert node.storage.get_value(key, 42) is None
            assert [(m.expired, m.sid) for m in exps] == [([42], 9)]


async def test_refresh_extends_life(open_driven_node, autojump_clock):
    key = InfoHash.get("extend")
    async with open_driven_node() as driven:
        node = driven.node
        peer = FakePeer(5000)
        tok = await driven_token(driven, peer, key)
        await driven.feed(
            peer.request("put", {"h": key, "values": [Value(b"x", type=5, id=1).to_wire()], "token": tok}),
            peer.addr,
        )
        await trio.sleep(50)
        await driven.feed(peer.request("refresh", {"h": key, "vid": 1, "token": tok}), peer.addr)
        await trio.sleep(50)
        assert node.storage.get_value(key, 1) is not None  # 100 s after the put, 50 s after the refresh
        await trio.sleep(11)
        assert node.storage.get_value(key, 1) is None


async def test_value_with_old_c_expires_early_and_expired_one_is_not_stored(open_driven_node, autojump_clock):
    key = InfoHash.get("created")
    async with open_driven_node() as driven:
        node = driven.node
        peer = FakePeer(5000)
        tok = await driven_token(driven, peer, key)
        now = int(time.time())
        for vid, age in [(1, 30), (2, 61)]:
            args = {"h": key, "values": [Value(b"x", type=5, id=vid).to_wire()], "token": tok, "c": now - age}
            await driven.feed(peer.request("put", args), peer.addr)
        replies = [m.value_id for m, _ in driven.take() if m.kind is Kind.REPLY]
        assert replies == [1, 2]  # both answered, even the one not stored
        assert node.storage.get_value(key, 2) is None
        await trio.sleep(28)
        assert node.storage.get_value(key, 1) is not None
        await trio.sleep(4)
        assert node.storage.get_value(key, 1) is None


async def test_unanswered_update_is_retransmitted_then_listener_dropped(open_driven_node, autojump_clock):
    key = InfoHash.get("silent listener")
    async with open_driven_node() as driven:
        node = driven.node
        putter, listener = FakePeer(5000), FakePeer(5001)
        ltok = await driven_token(driven, listener, key)
        await driven.feed(
            listener.request("listen", {"ve": 1, "h": key, "token": ltok, "sid": 6001}), listener.addr
        )
        ptok = await driven_token(driven, putter, key)
        await driven.feed(
            putter.request("put", {"h": key, "values": [Value(b"v", id=5).to_wire()], "token": ptok}),
            putter.addr,
        )
        times = []
        start = trio.current_time()
        with trio.move_on_after(12):
            while True:
                sent = driven.take("update")
                times += [trio.current_time() - start for _ in sent]
                if node.remote_listeners.count() == 0:
                    break
                await trio.sleep(0.05)
        assert len(times) == 3  # 0, ~1, ~3 s: byte-identical resends
        assert times[0] < 0.1 and 1.0 <= times[1] <= 1.35 and 3.0 <= times[2] <= 3.35
        assert node.remote_listeners.count() == 0


async def test_remote_listener_expires_after_10_minutes(open_driven_node, autojump_clock):
    key = InfoHash.get("listener expiry")
    async with open_driven_node() as driven:
        node = driven.node
        listener = FakePeer(5001)
        ltok = await driven_token(driven, listener, key)
        await driven.feed(
            listener.request("listen", {"ve": 1, "h": key, "token": ltok, "sid": 1}), listener.addr
        )
        assert node.remote_listeners.count() == 1
        await trio.sleep(9 * 60)
        assert node.remote_listeners.count() == 1
        await trio.sleep(8 * 60)  # removed by an expiry pass 10-16 min after the last listen
        assert node.remote_listeners.count() == 0


async def test_a_silent_peer_gets_one_confirmation_ping_at_a_time(open_driven_node, autojump_clock):
    """Every request from a node that never answered queues a confirmation ping, but only one is in flight."""
    async with open_driven_node() as driven:
        peer = FakePeer(5001)
        for _ in range(5):
            await driven.feed(peer.request("ping", {}), peer.addr)
        first = {m.tid for m, _ in driven.take("ping")}
        assert len(first) == 1
        await trio.sleep(10)  # unanswered (with its retransmissions): it failed
        await driven.feed(peer.request("ping", {}), peer.addr)
        assert len({m.tid for m, _ in driven.take("ping")} - first) == 1  # the next one


# -- concurrent gets share one round of requests (as OpenDHT's node shares a search's pending requests) -----


async def test_concurrent_gets_share_one_request_round(lone_node, raw_peer):
    to = node_addr(lone_node)
    await raw_peer.ask(to, "ping", {})  # the node now knows the peer
    key = InfoHash.get("shared round")
    value = Value(b"from the peer")
    results: dict[str, list[Value]] = {}

    async def get(name: str) -> None:
        results[name] = await lone_node.get(key)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(get, "first")
            request, addr = await next_request(raw_peer, "get")
            nursery.start_soon(get, "joined")
            await trio.sleep(0.05)
            reply = raw_peer.encoder.reply_with_values(request.tid, {"sa": SA, "token": b"t" * 32}, [value])
            for datagram in reply:
                await raw_peer.send(datagram, addr)
        await raw_peer.expect_none(0.2)  # the joined get sent nothing of its own
    assert [v.data for v in results["first"]] == [v.data for v in results["joined"]] == [b"from the peer"]


async def test_a_cancelled_get_leaves_the_shared_round_to_the_others(lone_node, raw_peer):
    to = node_addr(lone_node)
    await raw_peer.ask(to, "ping", {})
    key = InfoHash.get("one caller leaves")
    got: list[Value] = []

    async def stay() -> None:
        got.extend(await lone_node.get(key))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as leaving:
                nursery.start_soon(stay)
                request, addr = await next_request(raw_peer, "get")
                nursery.start_soon(lambda: lone_node.get(key))
                await trio.sleep(0.05)
                leaving.cancel()
            body = {"sa": SA, "token": b"t" * 32}
            reply = raw_peer.encoder.reply_with_values(request.tid, body, [Value(b"v")])
            for datagram in reply:
                await raw_peer.send(datagram, addr)
    assert [v.data for v in got] == [b"v"]

    # When every caller has gone, the round ends; the next get asks again.
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: lone_node.get(key))
            await next_request(raw_peer, "get")
            nursery.cancel_scope.cancel()
        assert not lone_node.searches.rounds
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: lone_node.get(key))
            await next_request(raw_peer, "get")
            nursery.cancel_scope.cancel()


async def test_listen_refresh_resends_every_20_s_and_searches_only_when_needed(
    open_driven_node, autojump_clock
):
    """The listening side of a listen: the same ``sid`` every 20 s; a ``find`` for the storing
    nodes first, then only when one is lost (or at the 10 min re-sync), not at each refresh of a network of
    fewer than 4 nodes."""
    key = InfoHash.get("refreshed listen")
    async with open_driven_node() as driven:
        node = driven.node
        storer = await known_storer(driven)

        def of_key(method: str) -> list[Message]:
            """Take the node's ``method`` requests about ``key`` to the storer."""
            sent = [(m, a) for m, a in driven.take() if a == storer.addr]
            driven.sent += [(m, a) for m, a in sent if m.method != method]
            return [m for m, a in sent if m.method == method and key in (m.target, m.info_hash)]

        async def answer(method: str, within: float = 1, **extra: Any) -> Message:
            """Answer the one ``method`` request about ``key`` the node sent to the storer; returns it."""
            with trio.fail_after(within):
                while not (sent := of_key(method)):
                    await trio.sleep(0.01)
            (request,) = sent
            await driven.feed(storer.encoder.reply(request.tid, {"sa": SA, **extra}), storer.addr)
            return request

        listener = node.add_listener(key, lambda event: None)
        await answer("find", token=b"tok1", n4=b"")
        first = await answer("listen")
        assert (first.info_hash, first.token) == (key, b"tok1")
        sids = [first.sid]
        for _ in range(3):  # the steady state: listen again, same sid, and nothing else
            await trio.sleep(15)
            assert not of_key("listen")
            await trio.sleep(6)
            sids.append((await answer("listen")).sid)
            assert not of_key("find")
        assert sids == [first.sid] * 4
        # The storer stops answering: the listen fails and is dropped. Once the storer is heard from again,
        # the next attempt looks for storing nodes first.
        with trio.fail_after(30):
            while not of_key("listen"):
                await trio.sleep(0.5)
        await trio.sleep(20)  # unanswered, with its resends
        assert len(of_key("listen")) == 2  # the resends: same request
        await driven.feed(storer.request("ping", {}), storer.addr)
        await answer("find", token=b"tok2", n4=b"", within=60)
        assert (await answer("listen")).token == b"tok2"
        listener.cancel()


async def test_new_listens_on_a_slow_network_look_for_their_nodes_at_once(open_driven_node, autojump_clock):
    """New listens look for their storing nodes concurrently, each on callbacks: 1,000 new keys on a network
    with a 100 ms round trip all send their ``listen`` within 2 s."""
    async with open_driven_node() as driven:
        node = driven.node
        storer = await known_storer(driven)
        keys = [InfoHash.get(f"slow network {i}") for i in range(1000)]
        listened: set[InfoHash] = set()

        async def answer_later(request: Message) -> None:
            await trio.sleep(0.1)  # the round trip
            extra = {"token": b"tok", "n4": b""} if request.method == "find" else {}
            await node.handle_datagram(storer.encoder.reply(request.tid, {"sa": SA, **extra}), storer.addr)

        async with trio.open_nursery() as nursery:

            async def storer_serves() -> None:
                while True:
                    for m, a in driven.take():
                        if a == storer.addr and m.kind is Kind.REQUEST and m.method in ("find", "listen"):
                            if m.method == "listen":
                                listened.add(m.info_hash)
                            nursery.start_soon(answer_later, m)
                    await trio.sleep(0.01)

            nursery.start_soon(storer_serves)
            start = trio.current_time()
            for key in keys:
                node.add_listener(key, lambda event: None)
            with trio.fail_after(60):
                while len(listened) < len(keys):
                    await trio.sleep(0.01)
            elapsed = trio.current_time() - start
            nursery.cancel_scope.cancel()
        assert elapsed < 2.0, elapsed


async def test_a_listen_ended_while_it_searches_does_not_listen_for_its_successor(
    open_driven_node, autojump_clock
):
    """Unsubscribed then subscribed again while the first listen still looked for its nodes: only the new
    listen sends ``listen`` (the old one's search ends quietly), and values reach the new listener."""
    key = InfoHash.get("listen again")
    async with open_driven_node() as driven:
        node = driven.node
        storer = await known_storer(driven)

        async def sent(method: str) -> list[Message]:
            await trio.sleep(0.5)
            return [m for m, a in driven.take(method) if a == storer.addr and key in (m.target, m.info_hash)]

        first = node.add_listener(key, lambda event: None)
        finds = await sent("find")  # the first listen looks for its nodes...
        first.cancel()  # ... and ends before it found them
        got: list[bytes] = []
        node.add_listener(key, lambda event: got.append(event.value.data))
        finds += await sent("find")
        assert len(finds) == 2
        for find in finds:
            await driven.feed(
                storer.encoder.reply(find.tid, {"sa": SA, "token": b"tok", "n4": b""}), storer.addr
            )
        (listen,) = await sent("listen")
        await driven.feed(storer.encoder.reply(listen.tid, {"sa": SA}), storer.addr)
        update = {"ve": 1, "h": key, "sid": listen.sid, "values": [Value(b"new", id=7).to_wire()]}
        await driven.feed(storer.request("update", update), storer.addr)
        assert got == [b"new"]
        assert len(node.listens.by_socket) == 1


# -- bounds on what a stranger's datagrams cost --------------------------------------------------------------


def count_bytes(driven) -> list[tuple[int, tuple[str, int]]]:
    """Record the size and destination of every datagram the driven node sends from now on."""
    sizes: list[tuple[int, tuple[str, int]]] = []
    send = driven.node.protocol.send

    def counting(data: bytes, addr) -> None:
        sizes.append((len(data), addr))
        send(data, addr)

    driven.node.protocol.send = counting
    return sizes


async def test_an_unsolicited_fragmented_reply_is_dropped_before_any_buffer(open_driven_node):
    async with open_driven_node() as driven:
        node, peer = driven.node, FakePeer(5000)
        header = msgpack.packb(
            {"r": {"id": bytes(peer.id), "values": [60_000] * 3000}, "t": 99, "y": "r", "v": "o2"}
        )
        for _ in range(3):
            await driven.feed(header, peer.addr)
        assert node.counters.dropped_unsolicited == 3
        assert len(node.protocol.reassembler) == 0 and node.protocol.reassembler.held == 0
        assert node.info().extra["dropped_unsolicited_fragments"] == 3


async def test_unsolicited_fragments_start_nothing_and_replies_still_get_through(open_driven_node):
    async with open_driven_node() as driven:
        node, peer = driven.node, FakePeer(5000)
        value = Value(os.urandom(20_000), id=5)
        other = FakePeer(5001).encoder.reply_with_values(1, {"sa": SA}, [value])
        for i, datagram in enumerate(other[1:] * 100):  # a flood of fragments under guessed ids
            fragment = msgpack.unpackb(datagram, strict_map_key=False)
            fragment["t"] = i
            await driven.feed(msgpack.packb(fragment), ("127.0.0.1", 6000 + i % 50))
        assert len(node.protocol.reassembler) == 0 and node.protocol.reassembler.held == 0
        assert node.info().extra["dropped_unsolicited_fragments"] == len(other[1:]) * 100
        got: list[Message | None] = []
        tid = node.start_request(peer.addr, "get", {"h": InfoHash.get("k")}, got.append, node_id=peer.id)
        reply = peer.encoder.reply_with_values(tid, {"sa": SA, "token": b"t" * 32}, [value])
        for datagram in reversed(reply):  # a reply's fragments may come before its header
            await driven.feed(datagram, peer.addr)
        assert [v.data for v in got[0].values] == [value.data]
        assert node.protocol.reassembler.held == 0


async def test_spoofed_ids_keep_the_confirm_queue_bounded(open_driven_node, autojump_clock):
    limits = Limits(udp_confirm_queue=50, udp_confirm_in_flight=4)
    async with open_driven_node(limits=limits) as driven:
        node = driven.node
        autojump_clock.autojump_threshold = math.inf  # no time passes while the flood is fed
        for i in range(500):
            await driven.feed(FakePeer(6000 + i).request("ping", {}), ("127.0.0.1", 6000 + i))
        autojump_clock.autojump_threshold = 0
        first = {m.tid for m, _ in driven.take("ping")}
        assert len(first) == 4  # the rest wait for a free slot
        extra = node.info().extra
        assert extra["confirm_queued"] == 50 and extra["confirm_in_flight"] == 4
        assert extra["confirm_dropped_full"] == 500 - 54
        await trio.sleep(9)  # the 4 pings failed: the next 4 go out
        assert len({m.tid for m, _ in driven.take("ping")} - first) == 4  # (and the first 4 resent)
        await trio.sleep(120)  # the rest waited over a minute: dropped unpinged
        assert node.info().extra["confirm_dropped_stale"] > 0 and len(node.protocol.confirms) == 0


async def test_an_unvalidated_address_gets_at_most_three_times_its_bytes(open_driven_node):
    async with open_driven_node() as driven:
        node, peer = driven.node, FakePeer(5000)
        key = InfoHash.get("amplified")
        node.storage.put(key, Value(os.urandom(60_000), id=7), trio.current_time(), local=True)
        sent = count_bytes(driven)
        received = 0

        async def get() -> list[Message]:
            nonlocal received
            request = peer.request("get", {"h": key})
            received += len(request)
            await driven.feed(request, peer.addr)
            return [m for m, a in driven.take() if a == peer.addr]

        (ping,) = await get()  # the first is not answered, while a ping validates the address
        assert ping.method == "ping"
        (reply,) = await get()  # the resend, the ping unanswered: nodes and token, no values
        assert reply.token and not reply.values and not reply.value_sizes
        assert sum(size for size, addr in sent if addr == peer.addr) <= 3 * received
        extra = node.info().extra
        assert extra["amplification_limited"] == 2 and extra["amplification_deferred"] == 1
        await driven.feed(peer.encoder.reply(ping.tid, {"sa": SA}), peer.addr)  # it answers our ping
        answer = await get()
        assert answer[0].value_sizes and len(answer) == 48  # validated: the header and 47 fragments


async def test_listens_past_the_per_source_bound_are_refused_with_an_error(open_raw_peer):
    async with open_node(port=0, host=LOCAL, host6=None, limits=Limits(udp_listeners_per_source=1)) as node:
        to = node_addr(node)
        first, second = InfoHash.get("first"), InfoHash.get("second")
        async with open_raw_peer() as listener:
            tok = await token_from(listener, to, first)
            ok = await listener.ask(to, "listen", {"ve": 1, "h": first, "token": tok, "sid": 1})
            assert ok.kind is Kind.REPLY
            err = await listener.ask(to, "listen", {"ve": 1, "h": second, "token": tok, "sid": 2})
            assert (err.kind, err.error_code) == (Kind.ERROR, 203)
            assert err.error_text == "Listen refused: too many listeners"
            again = await listener.ask(to, "listen", {"ve": 1, "h": first, "token": tok, "sid": 1})
            assert again.kind is Kind.REPLY  # a refresh of the one it holds
            assert node.remote_listeners.count() == 1 and node.info().extra["listeners_refused"] == 1
