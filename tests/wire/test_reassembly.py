"""Reassembly of fragmented values (trio_dht.wire.reassembly), sans-IO with explicit times."""

from __future__ import annotations

import math
import os

import pytest

from trio_dht.infohash import InfoHash
from trio_dht.limits import Limits
from trio_dht.value import Value
from trio_dht.wire.message import Encoder, Kind, Message, decode
from trio_dht.wire.reassembly import (
    FRAGMENT_COST,
    MAX_EARLY_BYTES,
    MAX_EARLY_FRAGMENTS,
    MAX_SERIALISED_VALUE,
    MIN_FRAGMENT,
    PARTIAL_COST,
    SIZE_COST,
    Reassembler,
)

SENDER = InfoHash(b"\x05" * 20)
KEY = InfoHash(b"\x07" * 20)
ADDR = ("127.0.0.1", 4222)
TID = 77_000


def fragmented_put(*values: Value, tid: int = TID) -> tuple[Message, list[Message]]:
    datagrams = Encoder(SENDER).request_with_values(tid, "put", {"h": KEY, "token": b"t" * 32}, list(values))
    header, *frags = (decode(d) for d in datagrams)
    assert header.fragmented
    return header, frags


def value(size: int, vid: int = 0xABCDEF0123456789) -> Value:
    return Value(os.urandom(size), id=vid)


def check(done: Message | None, *values: Value) -> None:
    assert done is not None
    assert [v.to_wire() for v in done.values] == [v.to_wire() for v in values]
    assert not done.fragmented and done.sender == SENDER and done.info_hash == KEY


def feed(
    r: Reassembler, frags: list[Message], now: float = 0.0, key=(ADDR, TID), reply: bool = True
) -> list[Message | None]:
    """Each fragment in turn, as a reply's to our request (``reply``: they may precede their header)."""
    return [r.fragment(key, f, now, reply) for f in frags]


def test_in_order():
    v = value(60_000)
    header, frags = fragmented_put(v)
    assert len(frags) == 47
    r = Reassembler()
    assert r.header((ADDR, TID), header, 0.0) is None
    results = feed(r, frags)
    assert results[:-1] == [None] * 46
    check(results[-1], v)
    assert len(r) == 0 and r.dropped == 0


@pytest.mark.parametrize("order", ["reverse", "swapped", "before-header"])
def test_any_order(order):
    v = value(5_000)
    header, frags = fragmented_put(v)
    r = Reassembler()
    if order == "before-header":
        assert feed(r, frags) == [None] * len(frags)  # buffered
        check(r.header((ADDR, TID), header, 0.5), v)
    else:
        frags = frags[::-1] if order == "reverse" else [frags[0], frags[2], frags[1], *frags[3:]]
        assert r.header((ADDR, TID), header, 0.0) is None
        results = feed(r, frags)
        assert results[:-1] == [None] * (len(frags) - 1)
        check(results[-1], v)
    assert len(r) == 0


def test_several_values_one_fragment_each():
    values = [value(243, vid=(1 << 63) + i) for i in range(3)]  # 280 serialised bytes each
    header, frags = fragmented_put(*values)
    assert header.value_sizes == [280, 280, 280] and len(frags) == 3
    r = Reassembler()
    r.header((ADDR, TID), header, 0.0)
    check(feed(r, frags)[-1], *values)


def test_duplicates_and_overlaps_are_ignored():
    v = value(4_000)
    header, frags = fragmented_put(v)
    packed = v.packed()
    r = Reassembler()
    r.header((ADDR, TID), header, 0.0)
    assert feed(r, frags[:2]) == [None, None]
    overlap = Message(header.kind, TID, parts={0: (640, packed[640:1920])})  # straddles fragments 0 and 1
    assert r.fragment((ADDR, TID), overlap, 0.1) is None
    assert feed(r, frags[:2]) == [None, None]  # a retransmission repeats them
    check(feed(r, frags[2:])[-1], v)


def test_overlap_does_not_corrupt():
    """An overlapping fragment with other bytes arriving first leaves the real data in place."""
    v = value(3_000)
    header, frags = fragmented_put(v)
    r = Reassembler()
    r.header((ADDR, TID), header, 0.0)
    bogus = Message(header.kind, TID, parts={0: (100, b"\x00" * 1280)})
    r.fragment((ADDR, TID), bogus, 0.0)  # covers [100, 1380): the real fragment 0 and 1 now overlap it
    results = feed(r, frags)
    assert all(x is None for x in results)  # never completes with mixed bytes
    assert len(r) == 1


def test_header_retransmission_keeps_progress():
    v = value(3_000)
    header, frags = fragmented_put(v)
    r = Reassembler()
    r.header((ADDR, TID), header, 0.0)
    feed(r, frags[:2])
    assert r.header((ADDR, TID), header, 1.0) is None
    check(feed(r, frags[2:], now=1.0)[-1], v)


def test_keyed_by_source_and_tid():
    v = value(3_000)
    header, frags = fragmented_put(v)
    r = Reassembler()
    r.header((ADDR, TID), header, 0.0)
    assert feed(r, frags, key=(("127.0.0.1", 4223), TID)) == [None] * len(frags)  # another port
    assert feed(r, frags, key=(ADDR, TID + 1)) == [None] * len(frags)  # another t
    check(feed(r, frags)[-1], v)


def test_too_large_value_is_refused():
    v = value(70_000)  # 70,038 serialised bytes > 64 KiB + 32
    header, frags = fragmented_put(v)
    r = Reassembler()
    done = r.header((ADDR, TID), header, 0.0)
    assert done is not None and done.values == []  # nothing to wait for: the value is skipped
    assert all(x is None for x in feed(r, frags))  # its fragments only fill a bounded buffer
    assert r.expire(10.0) == 1 and len(r) == 0


def test_limit_is_64_kib_plus_32():
    fits = Value(os.urandom(64 * 1024 - 8), id=1 << 63)  # serialised: 64 KiB + 30
    assert len(fits.packed()) <= 64 * 1024 + 32
    header, frags = fragmented_put(fits)
    r = Reassembler()
    r.header((ADDR, TID), header, 0.0)
    check(feed(r, frags)[-1], fits)


def test_one_of_two_values_too_large():
    small, big = value(100, vid=11), value(70_000, vid=12)
    header, frags = fragmented_put(big, small)
    r = Reassembler()
    r.header((ADDR, TID), header, 0.0)
    results = feed(r, frags)
    done = next(x for x in results if x is not None)
    check(done, small)


def test_early_fragments_are_bounded():
    """Fragments before their header: at most 100 of them and 120 KiB are buffered per message."""
    r = Reassembler()
    small = [
        Message(Kind.FRAGMENT, TID, parts={0: (i * 100, b"x" * 100)}) for i in range(MAX_EARLY_FRAGMENTS + 20)
    ]
    feed(r, small)
    assert r.dropped == 20
    r = Reassembler()
    large = [  # two values' worth (one value is at most 64 KiB + 32)
        Message(Kind.FRAGMENT, TID, parts={i // 50: (i % 50 * 1280, b"x" * 1280)}) for i in range(100)
    ]
    feed(r, large)
    assert r.dropped == 100 - MAX_EARLY_BYTES // 1280


def test_expiry_10_s_after_start():
    v = value(20_000)
    header, frags = fragmented_put(v)
    r = Reassembler()
    r.header((ADDR, TID), header, 0.0)
    for i, f in enumerate(frags[:-1]):
        r.fragment((ADDR, TID), f, 0.6 * i)  # never idle 3 s
    last = 0.6 * (len(frags) - 2)
    assert last < 10.0
    assert r.expire(9.9) == 0
    assert r.expire(10.1) == 1
    assert r.fragment((ADDR, TID), frags[-1], 10.2) is None  # too late: its message is gone
    assert len(r) == 0 and r.unsolicited == 1


def test_expiry_3_s_idle():
    v = value(5_000)
    header, frags = fragmented_put(v)
    r = Reassembler()
    r.header((ADDR, TID), header, 0.0)
    r.fragment((ADDR, TID), frags[0], 1.0)
    assert r.expire(3.9) == 0
    assert r.expire(4.1) == 1 and len(r) == 0
    # Early fragments without a header expire the same way.
    r.fragment((ADDR, TID + 1), frags[0], 5.0, reply=True)
    assert r.expire(7.9) == 0 and r.expire(8.1) == 1


def test_corrupt_value_is_dropped_not_raised():
    header, frags = fragmented_put(value(2_000))
    r = Reassembler()
    r.header((ADDR, TID), header, 0.0)
    bad = [
        Message(f.kind, TID, parts={i: (o, b"\xc1" * len(d)) for i, (o, d) in f.parts.items()}) for f in frags
    ]
    done = feed(r, bad)[-1]
    assert done is not None and done.values == [] and r.dropped == 1


def test_a_full_table_makes_room_by_dropping_stale_partials():
    r = Reassembler()
    orphan = Message(Kind.FRAGMENT, TID, parts={0: (0, b"x")})
    for port in range(r.max_messages):
        r.fragment((("127.0.0.1", port), TID), orphan, 0.0, reply=True)
    assert len(r) == r.max_messages
    v = value(2_000)
    header, frags = fragmented_put(v)
    # Full of fresh partials: refused. Once those are stale (3 s idle), a new message gets in.
    assert r.header((ADDR, TID), header, 1.0) is None and r.dropped == 1
    assert r.header((ADDR, TID), header, 4.0) is None
    check(feed(r, frags, now=4.0)[-1], v)


# -- bounds: memory follows the bytes received ---------------------------------------------------------------


def test_a_header_announcing_huge_sizes_costs_its_own_size():
    """Thousands of announced 64 KiB values allocate nothing: only the header is charged."""
    header, _ = fragmented_put(value(1_000))
    header.value_sizes = [MAX_SERIALISED_VALUE] * 5000
    r = Reassembler()
    assert r.header((ADDR, TID), header, 0.0) is None
    assert r.held == PARTIAL_COST + SIZE_COST * 5000
    far = Message(Kind.FRAGMENT, TID, parts={4999: (60_000, b"x" * 100)})
    r.fragment((ADDR, TID), far, 0.0)  # a fragment far into a value costs its bytes, not its offset
    assert r.held == PARTIAL_COST + SIZE_COST * 5000 + 100 + FRAGMENT_COST
    assert r.expire(10.0) == 1 and r.held == 0


def test_fragments_beyond_their_announced_size_are_dropped():
    v = value(3_000)
    header, frags = fragmented_put(v)
    r = Reassembler()
    r.header((ADDR, TID), header, 0.0)
    held = r.held
    beyond = Message(Kind.FRAGMENT, TID, parts={0: (3_000, b"x" * 1280), 1: (0, b"x")})
    assert r.fragment((ADDR, TID), beyond, 0.0) is None
    assert r.held == held and r.dropped == 2
    check(feed(r, frags)[-1], v)


def test_the_global_budget_drops_what_does_not_fit():
    limits = Limits(udp_reassembly_bytes=100_000)
    r = Reassembler(limits)
    v = value(60_000)
    header, frags = fragmented_put(v)
    keys = [(("127.0.0.1", port), TID) for port in range(3)]
    for key in keys:  # three sources with all but their last fragment: not all fit in 100 KB
        r.header(key, header, 0.0, reply=True)
        feed(r, frags[:-1], key=key)
    assert r.dropped_budget > 0 and r.held <= limits.udp_reassembly_bytes
    assert r.fragment(keys[1], frags[-1], 0.5) is None  # the second lost some to the budget
    assert r.expire(4.0) == 2 and r.held == 0  # the third never got in; the stale ones free it all
    r.header(keys[1], header, 4.0, reply=True)
    check(feed(r, frags, now=4.0, key=keys[1])[-1], v)


def test_one_source_is_capped_and_others_still_get_through():
    limits = Limits(udp_reassembly_bytes_per_source=20_000)
    r = Reassembler(limits, source=lambda addr: addr[0])
    header, frags = fragmented_put(value(60_000))
    for tid in range(5):  # one source, many messages: capped in all
        r.header((ADDR, tid), header, 0.0)
        feed(r, frags, key=(ADDR, tid))
    assert r.held <= 20_000 and r.dropped_budget > 0
    v = value(5_000)
    header, frags = fragmented_put(v)
    other = ("127.0.0.2", 4222)
    r.header((other, TID), header, 0.0)
    check(feed(r, frags, key=(other, TID))[-1], v)


def test_completion_returns_every_charged_byte():
    r = Reassembler()
    v = value(20_000)
    header, frags = fragmented_put(v)
    r.header((ADDR, TID), header, 0.0)
    feed(r, frags[:5])
    assert r.held > 5 * 1280
    check(feed(r, frags[5:])[-1], v)
    assert r.held == 0 and r._by_source == {}


# -- what may start a message --------------------------------------------------------------------------------


def test_a_request_fragment_before_its_header_is_dropped():
    """Only a reply's fragments may precede their header; a stranger's fragments start nothing."""
    v = value(5_000)
    header, frags = fragmented_put(v)
    r = Reassembler()
    assert feed(r, frags[:2], reply=False) == [None, None]
    assert len(r) == 0 and r.held == 0 and r.unsolicited == 2
    assert r.header((ADDR, TID), header, 0.1) is None  # the header first: its fragments then add to it
    check(feed(r, frags, now=0.2, reply=False)[-1], v)
    assert r.held == 0


def test_requests_take_at_most_half_the_table_and_replies_still_get_in():
    limits = Limits(udp_reassembly_messages=8, udp_reassembly_bytes=100_000)
    r = Reassembler(limits)
    header, frags = fragmented_put(value(60_000))
    for port in range(8):  # strangers' requests: 4 of 8 messages
        r.header((("127.0.0.1", port), TID), header, 0.0)
    assert len(r) == 4 and r.dropped_budget == 4
    feed(r, frags, key=(("127.0.0.1", 0), TID), reply=False)  # bytes too: half the budget at most
    assert r._requests_held <= 50_000 and r.dropped_budget > 4
    v = value(30_000)
    for port in range(100, 104):  # our requests' replies: the other half is theirs
        header, frags = fragmented_put(v)
        assert r.header((("127.0.0.1", port), TID), header, 0.0, reply=True) is None
        check(feed(r, frags, key=(("127.0.0.1", port), TID))[-1], v)


def test_a_value_in_many_tiny_fragments_is_refused_past_its_size_at_512_bytes_each():
    r = Reassembler()
    header, _ = fragmented_put(value(2_000))
    r.header((ADDR, TID), header, 0.0)
    size = header.value_sizes[0]
    tiny = [Message(Kind.FRAGMENT, TID, parts={0: (2 * i + 1, b"x")}) for i in range(size // 2)]
    feed(r, tiny)
    assert len(r._partials[(ADDR, TID)].values[0].starts) == math.ceil(size / MIN_FRAGMENT)
    assert r.dropped == size // 2 - math.ceil(size / MIN_FRAGMENT)
