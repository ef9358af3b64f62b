"""The wire codec (trio_dht.wire.message, .compact) and values (trio_dht.value) against OpenDHT's wire format.

The exact bytes are those OpenDHT nodes send (requests, replies, errors, updates, fragments); the silent drops
are the datagrams an OpenDHT node drops without an answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import os

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_dht.infohash import InfoHash
from trio_dht.value import (
    FIELD_ID,
    FIELD_OWNER,
    FIELD_TYPE,
    FIELD_UTYPE,
    InvalidValue,
    Query,
    Value,
)
from trio_dht.wire.compact import (
    MalformedRecords,
    is_martian,
    normalize,
    pack_ip,
    pack_nodes,
    unpack_ip,
    unpack_nodes,
    want_families,
)
from trio_dht.wire.message import (
    FRAGMENT_SIZE,
    Encoder,
    Kind,
    MalformedMessage,
    decode,
    fragments,
    pack_values,
)
from trio_dht.wire.msgpack_codec import packb

ID_D = InfoHash(bytes(range(1, 21)))
KEY = InfoHash(bytes(range(100, 120)))
TOKEN = bytes(range(32))
SA = b"\x7f\x00\x00\x01"
T = 0x12345678


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def s(text: str) -> bytes:
    """msgpack fixstr."""
    raw = text.encode()
    assert len(raw) < 32
    return bytes([0xA0 | len(raw)]) + raw


# -- exact bytes, as OpenDHT nodes send them --------------------------------------------------------------


def test_ping_is_the_52_byte_layout():
    data = Encoder(ID_D, agent="o2").request(T, "ping", {})
    expected = (
        bytes.fromhex("85 a1 61 81 a2 69 64 c4 14")
        + ID_D
        + bytes.fromhex("a1 71 a4 70 69 6e 67 a1 74 ce 12 34 56 78 a1 79 a1 71 a1 76 a2 6f 32")
    )
    assert data == expected
    assert len(data) == 52
    assert len(Encoder(ID_D, agent="RNG1").request(T, "ping", {})) == 54


@pytest.mark.parametrize(("agent", "size"), [("RNG1", 56), ("o2", 54)])
def test_ping_reply_bytes(agent, size):
    data = Encoder(ID_D, agent=agent).reply(T, {"sa": SA})
    expected = (
        bytes.fromhex("84 a1 72 82 a2 69 64 c4 14")
        + ID_D
        + bytes.fromhex("a2 73 61 c4 04 7f 00 00 01 a1 74 ce 12 34 56 78 a1 79 a1 72 a1 76")
        + s(agent)
    )
    assert data == expected
    assert len(data) == size


@pytest.mark.parametrize(
    ("agent", "text", "size"), [("RNG1", "Put with wrong token", 74), ("o2", "Put with incorrect token", 76)]
)
def test_error_packet_bytes(agent, text, size):
    data = Encoder(ID_D, agent=agent).error(T, 401, text)
    expected = (
        bytes.fromhex("85 a1 65 92 cd 01 91")
        + s(text)
        + bytes.fromhex("a1 72 81 a2 69 64 c4 14")
        + ID_D
        + bytes.fromhex("a1 74 ce 12 34 56 78 a1 79 a1 65 a1 76")
        + s(agent)
    )
    assert data == expected
    assert len(data) == size
    msg = decode(data)
    assert (msg.kind, msg.error_code, msg.error_text, msg.sender, msg.tid) == (Kind.ERROR, 401, text, ID_D, T)


@pytest.mark.parametrize(("agent", "size"), [("RNG1", 167), ("o2", 165)])
def test_update_pushing_one_value_bytes(agent, size):
    enc = Encoder(ID_D, agent=agent)
    datagrams = enc.request_with_values(
        T, "update", {"ve": 1, "h": KEY, "sid": 77, "token": TOKEN}, [Value(b"x", id=1)]
    )
    assert len(datagrams) == 1  # inline
    expected = (
        bytes.fromhex("85 a1 61 86 a2 69 64 c4 14")
        + ID_D
        + bytes.fromhex("a2 76 65 01 a1 68 c4 14")
        + KEY
        + bytes.fromhex("a3 73 69 64 4d")
        + bytes.fromhex("a6 76 61 6c 75 65 73 91 82 a2 69 64 01 a3 64 61 74 81 a4 62 6f 64 79")
        + bytes.fromhex("82 a4 74 79 70 65 00 a4 64 61 74 61 c4 01 78")
        + bytes.fromhex("a5 74 6f 6b 65 6e c4 20")
        + TOKEN
        + bytes.fromhex("a1 71 a6 75 70 64 61 74 65 a1 74 ce 12 34 56 78 a1 79 a1 71 a1 76")
        + s(agent)
    )
    assert datagrams[0] == expected
    assert len(expected) == size


def big_value(size: int = 60_000) -> Value:
    return Value(os.urandom(size), id=0xF123456789ABCDEF)


def test_fragment_framing_60000_bytes():
    value = big_value()
    packed = value.packed()
    assert len(packed) == 60_038
    assert packed[:5] == bytes.fromhex("82 a2 69 64 cf")
    field_, blobs = pack_values([value])
    assert field_ == [60_038] and blobs == [packed]
    frags = fragments(T, blobs)
    assert len(frags) == 47
    assert [len(f) for f in frags] == [1305] + [1307] * 45 + [1185]
    head = bytes.fromhex("83 a1 79 a1 70 a1 74 ce 12 34 56 78 a1 70 81 00")
    assert frags[0] == head + bytes.fromhex("82 a1 6f 00 a1 64 c5 05 00") + packed[:1280]
    assert frags[1] == head + bytes.fromhex("82 a1 6f cd 05 00 a1 64 c5 05 00") + packed[1280:2560]
    assert frags[-1].endswith(packed[58_880:])
    raw = msgpack.unpackb(frags[-1], strict_map_key=False)
    assert list(raw) == ["y", "t", "p"] and list(raw["p"]) == [0]  # integer key, no id, no v
    assert raw["p"][0]["o"] == 58_880 and len(raw["p"][0]["d"]) == 1158
    msg = decode(frags[5])
    assert msg.kind is Kind.FRAGMENT and msg.tid == T and msg.parts == {0: (6400, packed[6400:7680])}


@pytest.mark.parametrize(("agent", "size"), [("RNG1", 135), ("o2", 133)])
def test_fragmented_put_header(agent, size):
    enc = Encoder(ID_D, agent=agent)
    datagrams = enc.request_with_values(T, "put", {"h": KEY, "c": 1795627909, "token": TOKEN}, [big_value()])
    assert len(datagrams[0]) == size
    raw = msgpack.unpackb(datagrams[0])
    assert list(raw) == ["a", "q", "t", "y", "v"]
    assert list(raw["a"]) == ["id", "h", "values", "c", "token"]  # the real nodes' order
    assert raw["a"]["values"] == [60_038]
    assert len(datagrams) == 48
    header = decode(datagrams[0])
    assert header.fragmented and header.value_sizes == [60_038] and header.values == []


def test_fragmented_get_reply_header_138_bytes():
    enc = Encoder(ID_D, agent="RNG1")
    body = Encoder.nodes_body(SA, [(KEY, ("127.0.0.1", 4222))], [], TOKEN)
    datagrams = enc.reply_with_values(T, body, [big_value()])
    assert len(datagrams[0]) == 138
    assert list(msgpack.unpackb(datagrams[0])["r"]) == ["id", "sa", "n4", "token", "values"]


def sized_value(serialised: int, n: int = 0) -> Value:
    """An unsigned value whose msgpack form is exactly ``serialised`` bytes (for 38 to 292)."""
    v = Value(b"v" * (serialised - 37), id=(1 << 63) + n)
    assert len(v.packed()) == serialised
    return v


def test_inline_below_600_bytes_fragmented_above():
    two = [sized_value(280, i) for i in range(2)]
    field_, blobs = pack_values(two)
    assert blobs == [] and field_ == [v.to_wire() for v in two]
    three = [sized_value(280, i) for i in range(3)]
    field_, blobs = pack_values(three)
    assert field_ == [280, 280, 280]
    frags = fragments(T, blobs)
    assert [len(f) for f in frags] == [305, 305, 305]
    assert [decode(f).parts for f in frags] == [{i: (0, blobs[i])} for i in range(3)]
    assert pack_values([sized_value(150, i) for i in range(50)])[0] == [150] * 50  # 50 values: fragmented
    assert pack_values([]) == ([], [])


def test_network_and_client_flag_only_when_set():
    plain = msgpack.unpackb(Encoder(ID_D).request(1, "ping", {}))
    assert "n" not in plain and "s" not in plain and isinstance(plain["v"], str)
    data = Encoder(ID_D, network=5, is_client=True).request(1, "ping", {})
    raw = msgpack.unpackb(data)
    assert raw["n"] == 5 and raw["s"] is True
    assert data.endswith(bytes.fromhex("a1 6e 05 a1 73 c3"))  # n = 5, s = msgpack true
    msg = decode(data)
    assert msg.network == 5 and msg.is_client
    frag = msgpack.unpackb(fragments(1, [b"abc"], network=5, is_client=True)[0], strict_map_key=False)
    assert frag["n"] == 5 and frag["s"] is True


# -- every message type round-trips --------------------------------------------------------------------------

OTHER = InfoHash(b"\xaa" * 20)
NODES4 = [(InfoHash(b"\x11" * 20), ("10.0.0.1", 4222)), (InfoHash(b"\x22" * 20), ("192.168.1.2", 1))]
NODES6 = [(InfoHash(b"\x33" * 20), ("2001:db8::1", 65535))]
QUERY = Query((FIELD_ID,), ((FIELD_TYPE, 3),))


@pytest.mark.parametrize(
    ("method", "args", "check"),
    [
        ("ping", {}, {}),
        ("find", {"target": OTHER, "w": [2, 10]}, {"target": OTHER, "want": [2, 10]}),
        ("get", {"h": KEY, "q": QUERY.to_wire()}, {"info_hash": KEY, "query": QUERY}),
        (
            "put",
            {"h": KEY, "values": [Value(b"a", id=7).to_wire()], "c": 1795627909, "token": TOKEN},
            {"info_hash": KEY, "created": 1795627909, "token": TOKEN},
        ),
        ("refresh", {"h": KEY, "vid": 2**64 - 1, "token": TOKEN}, {"value_id": 2**64 - 1}),
        (
            "listen",
            {
                "ve": 1,
                "h": KEY,
                "token": TOKEN,
                "sid": 2**32 - 1,
                "q": Query((), ((FIELD_TYPE, 7),)).to_wire(),
            },
            {"listen_version": 1, "sid": 2**32 - 1, "query": Query((), ((FIELD_TYPE, 7),))},
        ),
        (
            "update",
            {"ve": 1, "h": KEY, "sid": 77, "values": [Value(b"x", id=1).to_wire()], "token": TOKEN},
            {"sid": 77, "token": TOKEN, "has_values": True},
        ),
        ("update", {"sid": 77, "token": TOKEN, "re": [1, 2]}, {"refreshed": [1, 2]}),
        ("update", {"sid": 77, "token": TOKEN, "exp": [2**64 - 1]}, {"expired": [2**64 - 1]}),
    ],
)
def test_requests_round_trip(method, args, check):
    data = Encoder(ID_D).request(T, method, args)
    raw = msgpack.unpackb(data)  # BIN comes back as bytes, STR as str
    assert list(raw) == ["a", "q", "t", "y", "v"]
    assert type(raw["t"]) is int and raw["y"] == "q" and type(raw["v"]) is str and type(raw["q"]) is str
    for name in ("id", "h", "target"):
        if name in raw["a"]:
            assert type(raw["a"][name]) is bytes and len(raw["a"][name]) == 20, name
    if "token" in raw["a"]:
        assert type(raw["a"]["token"]) is bytes
    for v in raw["a"].get("values", []):
        assert type(v["dat"]["body"]["data"]) is bytes
    msg = decode(data)
    assert (msg.kind, msg.method, msg.tid, msg.sender) == (Kind.REQUEST, method, T, ID_D)
    for name, want in check.items():
        assert getattr(msg, name) == want, name
    if "values" in args:
        assert [v.to_wire() for v in msg.values] == args["values"]


def test_replies_round_trip():
    enc = Encoder(ID_D)
    msg = decode(enc.reply(T, Encoder.nodes_body(SA, NODES4, NODES6, TOKEN)))
    assert (msg.kind, msg.sender, msg.requester_ip, msg.token) == (Kind.REPLY, ID_D, SA, TOKEN)
    assert msg.nodes4 == NODES4 and msg.nodes6 == NODES6
    assert list(msgpack.unpackb(enc.reply(T, Encoder.nodes_body(SA, [], [], TOKEN)))["r"]) == [
        "id",
        "sa",
        "token",
    ]  # a family with nothing to return has no key
    msg = decode(enc.reply(T, {"vid": 99, "sa": SA}))
    assert msg.value_id == 99
    msg = decode(enc.reply(T, {"sa": SA, "token": TOKEN, "fileds": {"f": [1, 4], "v": [5, 0, 6, 1]}}))
    assert msg.fields == ((1, 4), [5, 0, 6, 1])
    values = [Value(b"p", id=3, utype="text/plain")]
    (only,) = enc.reply_with_values(T, {"sa": SA, "token": TOKEN}, values)
    msg = decode(only)
    assert msg.has_values and [v.to_wire() for v in msg.values] == [values[0].to_wire()]
    msg = decode(enc.reply(T, {"sa": bytes(16)}))
    assert msg.requester_ip == bytes(16)


def test_lenient_inputs():
    """What an OpenDHT node answers although it is odd: no y, unknown top-level key, STR t, s: true, tolerated
    blobs."""
    base = {"a": {"id": bytes(ID_D)}, "q": "ping", "t": 5}
    assert decode(pack(base)).method == "ping"  # no y
    assert decode(pack({**base, "zz": [1, {"x": 2}]})).method == "ping"
    assert decode(pack({**base, "t": "abcd"})).tid == 1633837924
    assert decode(pack({**base, "t": b"abcd"})).tid == 1633837924
    assert decode(pack({**base, "s": True})).is_client
    assert decode(pack({**base, "a": {"id": bytes(ID_D), 7: "ignored", "new": 1}})).sender == ID_D
    msg = decode(pack({"a": {"id": bytes(ID_D), "h": bytes(KEY), "token": "tok"}, "q": "put", "t": 1}))
    assert msg.token == b"tok"
    msg = decode(pack({"a": {"id": bytes(ID_D), "token": [1, 2, 3]}, "q": "listen", "t": 1}))
    assert msg.token == b"\x01\x02\x03"
    msg = decode(pack({"r": {"id": bytes(ID_D), "sa": b"\x01\x02\x03"}, "t": 1}))
    assert msg.requester_ip is None  # odd length: ignored, not dropped
    msg = decode(pack({"r": {"id": bytes(ID_D), "values": [{"id": 1}, Value(b"k", id=2).to_wire()]}, "t": 1}))
    assert [v.id for v in msg.values] == [2]  # a bad value is skipped on its own
    assert decode(pack({**base, "a": {"id": bytes(ID_D), "w": [2, 10, 23, 28, 30]}})).want == [
        2,
        10,
        23,
        28,
        30,
    ]


def drop(obj) -> None:
    with pytest.raises(MalformedMessage):
        decode(obj if isinstance(obj, bytes) else pack(obj))


PING = {"a": {"id": bytes(ID_D)}, "q": "ping", "t": 1, "y": "q", "v": "o2"}


def with_args(method: str, **args) -> dict:
    return {"a": {"id": bytes(ID_D), **args}, "q": method, "t": 1, "y": "q"}


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param({**PING, "a": {"id": ID_D.hex()[:20]}}, id="id-as-str"),
        pytest.param({**PING, "a": {"id": bytes(19)}}, id="id-19-bytes"),
        pytest.param({**PING, "s": 1}, id="s-int"),
        pytest.param({**PING, "v": 12}, id="v-int"),
        pytest.param(with_args("get", h="k" * 20), id="h-as-str"),
        pytest.param(with_args("find", target=bytes(KEY), w=2), id="w-not-array"),
        pytest.param(with_args("get", h=bytes(KEY), q={"s": [1]}), id="query-without-w"),
        pytest.param(with_args("get", h=bytes(KEY), q={"s": [], "w": [{"f": 4, "v": 1}]}), id="where-seq"),
        pytest.param({**PING, "q": "frobnicate"}, id="unknown-query"),
    ],
)
def test_silent_drops(obj):
    drop(obj)


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(pack([1, 2]), id="not-a-map"),
        pytest.param(pack(PING) + b"\x00", id="trailing-bytes"),
        pytest.param(pack(PING)[:-3], id="truncated"),
        pytest.param({"a": {"id": bytes(ID_D)}, "q": "ping"}, id="no-t"),
        pytest.param({**PING, "t": 2**32}, id="t-over-uint32"),
        pytest.param({**PING, "t": "abc"}, id="t-str-3"),
        pytest.param({**PING, "a": [bytes(ID_D)]}, id="a-not-map"),
        pytest.param({**PING, "a": {}}, id="a-without-id"),
        pytest.param({"r": [1], "t": 1, "y": "r"}, id="r-not-map"),
        pytest.param({"u": 1, "t": 1, "y": "r"}, id="u-not-map"),
        pytest.param({"e": [], "r": {"id": bytes(ID_D)}, "t": 1}, id="e-empty"),
        pytest.param({"e": "401", "r": {"id": bytes(ID_D)}, "t": 1}, id="e-not-array"),
        pytest.param({"p": [1], "t": 1, "y": "p"}, id="p-not-map"),
        pytest.param({"p": {"0": {"o": 0, "d": b"x"}}, "t": 1}, id="p-str-key"),
        pytest.param({"p": {0: {"o": -1, "d": b"x"}}, "t": 1}, id="p-negative-offset"),
        pytest.param({"p": {0: {"o": 0}}, "t": 1}, id="p-no-data"),
        pytest.param({"r": {"id": bytes(ID_D), "sa": "127.0.0.1"}, "t": 1}, id="sa-str"),
        pytest.param({"r": {"id": bytes(ID_D), "n4": b"x" * 27}, "t": 1}, id="n4-not-multiple"),
        pytest.param({"r": {"id": bytes(ID_D), "n6": b"x" * 26}, "t": 1}, id="n6-not-multiple"),
        pytest.param({"r": {"id": bytes(ID_D), "values": 3}, "t": 1}, id="values-not-array"),
        pytest.param({"r": {"id": bytes(ID_D), "fileds": {"f": [], "v": []}}, "t": 1}, id="fileds-empty-f"),
        pytest.param({"r": {"id": bytes(ID_D), "vid": -1}, "t": 1}, id="vid-negative"),
        pytest.param({"r": {"id": bytes(ID_D), "c": "now"}, "t": 1}, id="c-str"),
        pytest.param({"r": {"id": bytes(ID_D), "exp": [1, "2"]}, "t": 1}, id="exp-bad"),
        pytest.param({**PING, "n": -1}, id="n-negative"),
        pytest.param({**PING, "y": "x"}, id="y-unknown"),
        pytest.param({**PING, "q": ["ping"]}, id="q-unhashable"),
        pytest.param({**PING, "q": {"ping": 1}}, id="q-map"),
        pytest.param({"q": "ping", "t": 1}, id="query-without-a"),
        pytest.param(with_args("get", h=bytes(KEY), q={"s": [0], "w": []}), id="select-none-field"),
        pytest.param(
            with_args("get", h=bytes(KEY), q={"s": [], "w": [{"f": 3, "v": b"x"}]}), id="owner-short"
        ),
        pytest.param(with_args("listen", sid="ab"), id="sid-str-2"),
    ],
)
def test_malformed_datagrams_raise_malformed(obj):
    drop(obj)


# -- compact node records ------------------------------------------------------------------------------------


def test_compact_records():
    blob = pack_nodes(NODES4, v6=False)
    assert len(blob) == 52 and blob[20:26] == bytes([10, 0, 0, 1, 0x10, 0x7E])  # port big-endian
    assert unpack_nodes(blob, v6=False) == NODES4
    blob6 = pack_nodes(NODES6, v6=True)
    assert len(blob6) == 38 and unpack_nodes(blob6, v6=True) == NODES6
    with pytest.raises(MalformedRecords):
        unpack_nodes(blob[:-1], v6=False)
    assert unpack_ip(pack_ip("127.0.0.1")) == "127.0.0.1"
    assert unpack_ip(pack_ip("::ffff:1.2.3.4")) == "1.2.3.4"
    assert unpack_ip(b"abc") is None
    assert normalize(("::ffff:10.1.2.3", 5, 0, 0)) == ("10.1.2.3", 5)
    assert want_families(None, False) == (True, False)
    assert want_families(None, True) == (False, True)
    assert want_families([2, 10], False) == (True, True)
    assert want_families([30], False) == (False, True)
    for addr in [
        ("1.2.3.4", 0),
        ("0.1.2.3", 1),
        ("224.0.0.1", 1),
        ("ff02::1", 1),
        ("::", 1),
        ("nonsense", 1),
    ]:
        assert is_martian(addr), addr
    assert not is_martian(("127.0.0.1", 1)) and not is_martian(("::1", 1))
    assert is_martian(("fe80::1", 1), allow_link_local=False) and not is_martian(("fe80::1", 1))


# -- values and queries -------------------------------------------------------------------------------------

OWNER = b"\x30\x82" + os.urandom(300)  # stands for a DER SubjectPublicKeyInfo
SIG = os.urandom(512)


def test_unsigned_value_wire_form():
    v = Value(b"hello", id=0x3E1F, utype="text/plain")
    assert v.to_wire() == {
        "id": 0x3E1F,
        "dat": {"body": {"type": 0, "data": b"hello", "utype": "text/plain"}},
    }
    packed = v.packed()
    assert list(msgpack.unpackb(packed)["dat"]["body"]) == ["type", "data", "utype"]
    back = Value.unpack(packed)
    assert back.same_content(v) and back.id == v.id and back.packed() == packed
    assert Value.from_wire(v.to_wire()).to_wire() == v.to_wire()
    assert Value(b"x", id=1, prio=1, push_type="audioCall").to_wire()["pt"] == "audioCall"
    assert Value.from_wire(Value(b"x", id=1, prio=1, push_type="audioCall").to_wire()).prio == 1


def test_signed_value_wire_form():
    v = Value(b"data", type=3, id=9, seq=4, owner=OWNER, recipient=bytes(KEY), signature=SIG, utype="u")
    wire = v.to_wire()
    assert list(wire["dat"]) == ["body", "sig"] and wire["dat"]["sig"] == SIG
    assert list(wire["dat"]["body"]) == ["seq", "owner", "to", "type", "data", "utype"]
    assert v.signed_bytes() == pack(wire["dat"]["body"])
    assert v.signed_bytes()[0] == 0x86  # map of 6: seq, owner, to, type, data, utype
    back = Value.unpack(v.packed())
    assert back.is_signed and back.same_content(v)
    assert (back.seq, back.owner, back.recipient, back.signature) == (4, OWNER, bytes(KEY), SIG)
    assert back.owner_id == InfoHash(hashlib.sha1(OWNER).digest())
    no_to = Value(b"d", id=2, seq=0, owner=OWNER, signature=SIG)
    assert no_to.signed_bytes()[0] == 0x84


def test_encrypted_value_wire_form():
    v = Value(id=11, cypher=os.urandom(700))
    assert v.to_wire() == {"id": 11, "dat": v.cypher}
    back = Value.unpack(v.packed())
    assert back.is_encrypted and back.cypher == v.cypher and back.data == b""
    assert back.same_content(v) and not back.same_content(Value(id=11, cypher=b"other"))


@pytest.mark.parametrize(
    "obj",
    [
        {"id": 81, "data": b"x"},  # no dat: an OpenDHT node does not answer it
        {"id": 81, "dat": {"body": {"data": b"x"}}},  # no type
        {"id": 81, "dat": {"body": {"type": 0}}},  # no data
        {"id": -1, "dat": {"body": {"type": 0, "data": b""}}},
        {"id": 1, "dat": {"body": {"type": 70000, "data": b""}}},
        {"id": 1, "dat": {"body": {"type": 0, "data": b"", "owner": OWNER}}},  # no seq, no sig
        {"id": 1, "dat": {"body": {"seq": 1, "type": 0, "data": b"", "owner": OWNER}}},  # no sig
        {
            "id": 1,
            "dat": {"body": {"seq": 1, "owner": OWNER, "to": b"short", "type": 0, "data": b""}, "sig": b"s"},
        },
        {"id": 1, "dat": 5},
        {"id": 1},
        [1, 2],
    ],
)
def test_invalid_values(obj):
    with pytest.raises(InvalidValue):
        Value.from_wire(obj)


def test_value_unpack_garbage():
    for data in (b"", b"\xc1", b"\x92\x01\x02", pack({"id": 1}) + b"x"):
        with pytest.raises(InvalidValue):
            Value.unpack(data)


def test_query_wire_and_matching():
    owner_id = InfoHash(hashlib.sha1(OWNER).digest())
    wire = {
        "s": [4, 1, 1],
        "w": [{"f": 1, "v": 5}, {"f": 2, "v": 3}, {"f": 3, "v": bytes(owner_id)}, {"f": 5, "v": b"text"}],
    }
    q = Query.from_wire(wire)
    assert q.select == (1, 4)
    assert q.where == ((FIELD_ID, 5), (FIELD_TYPE, 3), (FIELD_OWNER, owner_id), (FIELD_UTYPE, "text"))
    assert Query.from_wire(q.to_wire()) == q
    match = Value(b"d", type=3, id=5, seq=1, owner=OWNER, signature=SIG, utype="text")
    assert q.matches(match)
    assert not q.matches(Value(b"d", type=3, id=5, utype="text"))  # no owner never matches OwnerPk
    assert not q.matches(Value(b"d", type=3, id=6, seq=1, owner=OWNER, signature=SIG, utype="text"))
    by_type = Query.from_wire({"s": [], "w": [{"f": 2, "v": 7}]})
    assert by_type.matches(Value(b"", type=7)) and not by_type.matches(Value(b"", type=0))
    assert not Query() and Query((1,)) and by_type
    assert Query.from_wire({"s": [1, 2, 3, 4, 5], "w": []}).field_items(Value(b"", id=9)) == [
        9,
        0,
        bytes(20),
        0,
        "",
    ]


# -- property tests ------------------------------------------------------------------------------------------

hashes = st.binary(min_size=20, max_size=20).map(InfoHash)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
texts = st.text(max_size=20)
ipv4s = st.tuples(st.integers(1, 223), st.integers(0, 255), st.integers(0, 255), st.integers(1, 254)).map(
    lambda t: ".".join(map(str, t))
)
ipv6s = st.binary(min_size=16, max_size=16).map(lambda b: unpack_ip(b"\x20\x01" + b[2:]))
nodes4 = st.lists(st.tuples(hashes, st.tuples(ipv4s, st.integers(1, 65535))), max_size=8)
nodes6 = st.lists(st.tuples(hashes, st.tuples(ipv6s, st.integers(1, 65535))), max_size=8)


@st.composite
def values(draw) -> Value:
    kind = draw(st.sampled_from(["plain", "signed", "encrypted"]))
    vid = draw(st.integers(1, 2**64 - 1))
    if kind == "encrypted":
        return Value(id=vid, cypher=draw(st.binary(min_size=1, max_size=300)))
    v = Value(draw(st.binary(max_size=300)), type=draw(u16), id=vid, utype=draw(texts))
    if kind == "signed":
        v.seq = draw(u16)
        v.owner = draw(st.binary(min_size=1, max_size=100))
        v.signature = draw(st.binary(min_size=1, max_size=100))
        v.recipient = draw(st.none() | hashes.map(bytes))
    v.prio = draw(st.integers(0, 1))
    v.push_type = draw(st.sampled_from(["", "audioCall"]))
    return v


queries = st.builds(
    Query,
    st.lists(st.sampled_from([1, 2, 3, 4, 5]), unique=True).map(lambda s_: tuple(sorted(s_))),
    st.lists(
        st.one_of(
            st.tuples(st.just(FIELD_ID), u64),
            st.tuples(st.just(FIELD_TYPE), u16),
            st.tuples(st.just(FIELD_OWNER), hashes),
            st.tuples(st.just(FIELD_UTYPE), texts),
        ),
        max_size=3,
    ).map(tuple),
)


@st.composite
def requests(draw):
    method = draw(st.sampled_from(["ping", "find", "get", "put", "refresh", "listen", "update"]))
    args: dict = {}
    vals: list[Value] = []
    if method == "find":
        args = {"target": draw(hashes)}
        if draw(st.booleans()):
            args["w"] = draw(st.sampled_from([[2], [10], [2, 10]]))
    elif method == "get":
        args = {"h": draw(hashes)}
        q = draw(queries)
        if q:
            args["q"] = q.to_wire()
    elif method == "put":
        args = {"h": draw(hashes), "token": draw(st.binary(min_size=1, max_size=64))}
        if draw(st.booleans()):
            args["c"] = draw(st.integers(-(2**63), 2**63 - 1))
        vals = draw(st.lists(values(), min_size=1, max_size=4))
    elif method == "refresh":
        args = {"h": draw(hashes), "vid": draw(u64), "token": draw(st.binary(max_size=64))}
    elif method == "listen":
        args = {"ve": 1, "h": draw(hashes), "token": draw(st.binary(max_size=64)), "sid": draw(u32)}
    elif method == "update":
        form = draw(st.sampled_from(["values", "re", "exp"]))
        args = {"sid": draw(u32), "token": draw(st.binary(max_size=64))}
        if form == "values":
            args = {"ve": 1, "h": draw(hashes), **args}
            vals = draw(st.lists(values(), min_size=1, max_size=4))
        else:
            args[form] = draw(st.lists(u64, max_size=5))
    return method, args, vals


def messages_equal(a, b) -> None:
    for name in a.__slots__:
        if name == "values":
            assert [v.to_wire() for v in a.values] == [v.to_wire() for v in b.values]
        else:
            assert getattr(a, name) == getattr(b, name), name


@settings(max_examples=200, deadline=None)
@given(requests(), hashes.filter(bool), u32, u32, st.booleans())
def test_requests_round_trip_property(req, node_id, tid, network, client):
    method, args, vals = req
    enc = Encoder(node_id, network=network, is_client=client)
    datagrams = enc.request_with_values(tid, method, args, vals) if vals else [enc.request(tid, method, args)]
    msg = decode(datagrams[0])
    assert (msg.kind, msg.method, msg.tid, msg.sender) == (Kind.REQUEST, method, tid, node_id)
    assert (msg.network, msg.is_client) == (network, client)
    for key, name in [("h", "info_hash"), ("target", "target"), ("vid", "value_id"), ("sid", "sid")]:
        if key in args:
            assert getattr(msg, name) == args[key]
    if "token" in args:
        assert msg.token == args["token"]
    if "q" in args:
        assert msg.query == Query.from_wire(args["q"])
    for key, name in [("re", "refreshed"), ("exp", "expired"), ("c", "created"), ("w", "want")]:
        if key in args:
            assert getattr(msg, name) == args[key]
    if vals and len(datagrams) == 1:
        assert [v.to_wire() for v in msg.values] == [v.to_wire() for v in vals]
    elif vals:  # fragmented: the fragments rebuild every serialised value
        assert msg.value_sizes == [len(v.packed()) for v in vals]
        bufs = {i: bytearray(n) for i, n in enumerate(msg.value_sizes)}
        for frag in datagrams[1:]:
            f = decode(frag)
            assert f.kind is Kind.FRAGMENT and f.tid == tid and (f.network, f.is_client) == (network, client)
            for index, (offset, chunk) in f.parts.items():
                assert len(chunk) <= FRAGMENT_SIZE
                bufs[index][offset : offset + len(chunk)] = chunk
        assert [Value.unpack(bytes(b)).to_wire() for b in bufs.values()] == [v.to_wire() for v in vals]
    # A second encoding of the decoded message is byte-identical for value-less requests.
    if not vals:
        assert decode(enc.request(tid, method, args)) is not msg
        messages_equal(decode(enc.request(tid, method, args)), msg)


@settings(max_examples=150, deadline=None)
@given(
    hashes.filter(bool),
    u32,
    st.binary(min_size=4, max_size=4) | st.binary(min_size=16, max_size=16),
    nodes4,
    nodes6,
    st.none() | st.binary(min_size=1, max_size=64),
    st.lists(values(), max_size=3),
    st.none() | u64,
)
def test_replies_round_trip_property(node_id, tid, sa, n4, n6, token, vals, vid):
    enc = Encoder(node_id)
    body = Encoder.nodes_body(sa, n4, n6, token)
    if vid is not None:
        body["vid"] = vid
    datagrams = enc.reply_with_values(tid, body, vals) if vals else [enc.reply(tid, body)]
    msg = decode(datagrams[0])
    assert (msg.kind, msg.tid, msg.sender, msg.requester_ip, msg.token) == (
        Kind.REPLY,
        tid,
        node_id,
        sa,
        token,
    )
    assert msg.nodes4 == n4 and msg.nodes6 == n6 and msg.value_id == vid
    if vals and len(datagrams) == 1:
        assert [v.to_wire() for v in msg.values] == [v.to_wire() for v in vals]


@given(
    hashes.filter(bool),
    u32,
    u32,
    st.booleans(),
    texts,
    st.dictionaries(
        st.sampled_from(["sa", "n4", "n6", "token", "vid", "values", "fileds"]), st.binary() | u64
    ),
)
def test_reply_bytes_are_the_packed_map(node_id, tid, network, client, agent, body):
    """Replies are assembled from pre-packed pieces: the same bytes as packing the whole map."""
    top = {"r": {"id": node_id, **body}, "t": tid, "y": "r", "v": agent}
    if network:
        top["n"] = network
    if client:
        top["s"] = True
    assert Encoder(node_id, network, client, agent).reply(tid, body) == packb(top)


@settings(max_examples=100, deadline=None)
@given(hashes.filter(bool), u32, st.sampled_from([203, 401, 404]), texts)
def test_errors_round_trip_property(node_id, tid, code, text):
    msg = decode(Encoder(node_id).error(tid, code, text))
    assert (msg.kind, msg.tid, msg.sender, msg.error_code, msg.error_text) == (
        Kind.ERROR,
        tid,
        node_id,
        code,
        text,
    )


@settings(max_examples=200, deadline=None)
@given(values())
def test_values_round_trip_property(v):
    back = Value.unpack(v.packed())
    assert back.to_wire() == v.to_wire() and back.same_content(v) and back.packed() == v.packed()


@settings(max_examples=100, deadline=None)
@given(queries)
def test_queries_round_trip_property(q):
    assert Query.from_wire(msgpack.unpackb(pack(q.to_wire()))) == q


# Fuzzing: random bytes and mutated valid datagrams.

SAMPLES = [
    Encoder(ID_D).request(T, "ping", {}),
    Encoder(ID_D).request(T, "find", {"target": KEY, "w": [2, 10]}),
    Encoder(ID_D).request(T, "get", {"h": KEY, "q": QUERY.to_wire()}),
    Encoder(ID_D).request_with_values(T, "put", {"h": KEY, "token": TOKEN, "c": 5}, [Value(b"abc", id=4)])[0],
    Encoder(ID_D).request(T, "refresh", {"h": KEY, "vid": 4, "token": TOKEN}),
    Encoder(ID_D).request(T, "listen", {"ve": 1, "h": KEY, "token": TOKEN, "sid": 9}),
    Encoder(ID_D).request(T, "update", {"sid": 9, "token": TOKEN, "exp": [4]}),
    Encoder(ID_D).reply(T, Encoder.nodes_body(SA, NODES4, NODES6, TOKEN)),
    Encoder(ID_D).reply(T, {"sa": SA, "fileds": {"f": [1], "v": [4]}}),
    Encoder(ID_D).error(T, 401, "Put with incorrect token"),
    fragments(T, [Value(b"q" * 100, id=4).packed()])[0],
    Encoder(ID_D).request(
        T,
        "put",
        {
            "h": KEY,
            "token": TOKEN,
            "values": [
                Value(b"d", id=3, seq=1, owner=OWNER[:40], signature=b"s", recipient=bytes(KEY)).to_wire()
            ],
        },
    ),
]


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "splice", "insert", "delete"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(
                st.sampled_from([0x00, 0x7F, 0x80, 0x90, 0xA0, 0xC0, 0xC2, 0xC3, 0xC4, 0xCE, 0xFF])
            )
        elif op == "truncate":
            del data[pos:]
        elif op == "splice":
            other = draw(st.sampled_from(SAMPLES))
            data = data[:pos] + other[draw(st.integers(0, len(other))) :]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
    return bytes(data)


def structured() -> st.SearchStrategy:
    """Well-formed msgpack maps with plausible keys and arbitrary value types."""
    leaves = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.binary(max_size=40), texts, st.floats()
    )
    anything = st.recursive(
        leaves, lambda c: st.lists(c, max_size=3) | st.dictionaries(texts | u16, c, max_size=3)
    )
    keys = st.sampled_from(
        ["a", "r", "e", "p", "u", "t", "y", "q", "v", "n", "s", "id", "h", "values", "sid"]
    )
    return st.dictionaries(keys, anything, max_size=6).map(pack)


fuzz_inputs = st.binary(max_size=200) | mutated() | structured()


@settings(max_examples=1000, deadline=None)
@given(fuzz_inputs)
def test_decode_raises_only_malformed(data):
    with contextlib.suppress(MalformedMessage):
        decode(data)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(datagrams=st.lists(fuzz_inputs, min_size=1, max_size=25))
async def test_handle_datagram_never_raises(open_driven_node, datagrams):
    async with open_driven_node() as driven:
        node = driven.node
        for data in datagrams:
            malformed = False
            try:
                decode(data)
            except MalformedMessage:
                malformed = True
            before = node.counters.dropped_malformed
            await driven.feed(data, ("127.0.0.1", 4000))
            assert node.counters.dropped_malformed == before + malformed
        await trio.testing.wait_all_tasks_blocked()
