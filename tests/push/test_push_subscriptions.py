"""The subscription book, transition by transition (sans-IO: times are plain numbers)."""

import pytest

from trio_dht.infohash import InfoHash
from trio_dht.push.payloads import Dialect, Platform, PushKind
from trio_dht.push.subscribe_bodies import BadRequest, parse_subscribe, parse_unsubscribe
from trio_dht.push.subscriptions import SubscriptionBook
from trio_dht.push.subscriptions import SubscriptionState as S

H = 3600.0
KEY = InfoHash.get("key")


def sub_req(**fields):
    import json

    body = {"key": "tok", "client_id": "c", "session_id": "s1", "platform": "android"} | fields
    return parse_subscribe(json.dumps({k: v for k, v in body.items() if v is not None}).encode())


def test_active_then_timeout_push_then_expired():
    book = SubscriptionBook()  # 6 h, margin 30 min
    sub, created = book.subscribe(KEY, sub_req(), now=0)
    assert created and sub.state is S.ACTIVE and sub.deadline == 6 * H
    assert book.next_due() == 5.5 * H
    assert book.advance(5.5 * H - 1) == []
    [t] = book.advance(5.5 * H)
    assert t.state is S.TIMEOUT_PUSH_SENT and t.subscription is sub
    push = book.timeout_push(sub)
    assert push.kind is PushKind.TIMEOUT and push.data == {"s": "s1", "timeout": KEY.hex(), "to": "c"}
    assert not push.high_priority
    assert book.next_due() == 6 * H
    [t] = book.advance(6 * H)
    assert t.state is S.EXPIRED and len(book) == 0 and book.next_due() is None
    assert not book.watched(KEY)


def test_refresh_moves_the_deadline_from_either_live_state():
    book = SubscriptionBook(lifetime=24 * H)  # OpenDHT: timeout push at 22 h
    sub, _ = book.subscribe(KEY, sub_req(), now=0)
    assert book.next_due() == 22 * H
    again, created = book.subscribe(KEY, sub_req(refresh=True, session_id="s2"), now=10 * H)
    assert again is sub and not created and sub.session_id == "s2"
    assert book.next_due() == 32 * H and sub.deadline == 34 * H
    book.advance(32 * H)
    assert sub.state is S.TIMEOUT_PUSH_SENT
    book.subscribe(KEY, sub_req(session_id=None), now=33 * H)
    assert sub.state is S.ACTIVE and sub.session_id == "s2" and sub.deadline == 57 * H
    assert book.advance(34 * H) == []


def test_identity_is_token_key_and_client_id():
    book = SubscriptionBook()
    a, _ = book.subscribe(KEY, sub_req(), 0)
    b, _ = book.subscribe(KEY, sub_req(client_id="other"), 0)
    c, _ = book.subscribe(InfoHash.get("k2"), sub_req(), 0)
    d, _ = book.subscribe(KEY, sub_req(key="tok2"), 0)
    assert len({a.sid, b.sid, c.sid, d.sid}) == 4 and len(book) == 4 and book.token_count == 2
    assert set(book.on_key(KEY)) == {a, b, d}
    assert book.unsubscribe(KEY, parse_unsubscribe(b'{"key":"tok","client_id":"c"}')) == [a]
    assert a.state is S.UNSUBSCRIBED
    assert book.unsubscribe(KEY, parse_unsubscribe(b'{"key":"tok","client_id":"c"}')) == []
    assert set(book.remove_token("tok")) == {b, c} and len(book) == 1


def test_seed_dialect_token_identifies_the_subscription():
    book = SubscriptionBook()
    sub, _ = book.subscribe(KEY, sub_req(client_id=None, session_id=None, callback_id="cb"), 0)
    assert sub.dialect is Dialect.SEED and sub.client_id == "cb"
    again, created = book.subscribe(KEY, sub_req(client_id=None, session_id=None, callback_id="cb"), 1)
    assert again is sub and not created
    push = book.values_push(sub, t_ms=5, high_priority=True)
    assert push.data == {"callback_id": "cb", "token": sub.sid}
    wrong = parse_unsubscribe(f'{{"key":"nottok","token":{sub.sid}}}'.encode())
    assert book.unsubscribe(KEY, wrong) == []
    right = parse_unsubscribe(f'{{"key":"tok","token":{sub.sid},"callback_id":"cb"}}'.encode())
    assert book.unsubscribe(KEY, right) == [sub]


def test_values_push_payload_and_priority():
    book = SubscriptionBook()
    sub, _ = book.subscribe(KEY, sub_req(), 0)
    p = book.values_push(sub, t_ms=1234, high_priority=False, expired_id=99)
    assert p.platform is Platform.ANDROID and p.token == "tok" and p.slot == (sub.sid, PushKind.VALUES)
    assert p.data == {"key": KEY.hex(), "s": "s1", "t": 1234, "to": "c", "exp": "99"}


def test_oversized_pushes_are_refused_at_subscribe():
    book = SubscriptionBook()
    with pytest.raises(BadRequest, match="too large"):
        # Control characters are escaped as \u00XX: 256 bytes of id become 1536 bytes of JSON.
        book.subscribe(KEY, sub_req(client_id="\x01" * 256, session_id="\x01" * 256), 0)
    assert len(book) == 0
    # Within the 4 KB Web Push limit they fit.
    book.subscribe(KEY, sub_req(client_id="\x01" * 256, session_id="\x01" * 256, platform="unifiedpush"), 0)


def test_restore_spreads_overdue_timeout_pushes_and_drops_expired():
    book = SubscriptionBook()
    source = SubscriptionBook()
    a, _ = source.subscribe(KEY, sub_req(), 0)
    b, _ = source.subscribe(KEY, sub_req(client_id="b"), 0)
    # Restart at 5.8 h: both timeout pushes are overdue; b's is put off by 2 s.
    assert book.restore(a, 5.8 * H) and book.restore(b, 5.8 * H, delay=2)
    assert [t.subscription for t in book.advance(5.8 * H)] == [a]
    assert [t.subscription for t in book.advance(5.8 * H + 2)] == [b]
    late, _ = source.subscribe(InfoHash.get("x"), sub_req(), 0)
    assert not book.restore(late, 7 * H)
    assert not book.restore(a, 5.9 * H)  # already there


def test_heap_stays_bounded_under_refreshes():
    book = SubscriptionBook()
    for i in range(1000):
        book.subscribe(KEY, sub_req(), now=i)
    assert len(book._heap) <= 2 * len(book) + 64
    assert book.next_due() == 999 + 5.5 * H


@pytest.mark.parametrize("dialect", list(Dialect))
@pytest.mark.parametrize("char", ["a", '"', "\x01", "é", "\U0001f600"])
def test_payload_size_check_matches_the_encoded_payloads(dialect, char):
    """The check skips encoding when a bound proves the pushes fit; around the limit it must still agree
    with the exact encoded sizes."""
    from trio_dht.push.payloads import MAX_GATEWAY_DATA, encode_data, timeout_data, values_data
    from trio_dht.push.subscriptions import _check_payload_size

    for n in range(0, 1100, 7):
        client_id, session_id = char * n, char * (n // 2)
        fields = {
            "key_hex": KEY.hex(),
            "client_id": client_id,
            "session_id": session_id,
            "sub_token": 2**63 - 1,
        }
        largest = max(
            len(encode_data(values_data(dialect, t_ms=10**13, expired_id=2**64 - 1, **fields))),
            len(encode_data(timeout_data(dialect, **fields))),
        )
        try:
            _check_payload_size(dialect, KEY, client_id, session_id, 2**63 - 1, Platform.ANDROID)
            fits = True
        except BadRequest:
            fits = False
        assert fits == (largest <= MAX_GATEWAY_DATA), (n, largest)


def test_subscriptions_per_source_are_capped_and_counted_down():
    book = SubscriptionBook(per_source=2)
    a, _ = book.subscribe(KEY, sub_req(client_id="a"), 0, source="10.0.0.1")
    book.subscribe(KEY, sub_req(client_id="b"), 0, source="10.0.0.1")
    with pytest.raises(BadRequest) as refused:
        book.subscribe(KEY, sub_req(client_id="c"), 0, source="10.0.0.1")
    assert refused.value.status == 429 and b"Too many push subscriptions" in refused.value.body
    assert book.refused_per_source == 1 and len(book) == 2 and book.held_by("10.0.0.1") == 2
    # A refresh is not a new subscription, even from another address; it keeps its creator's count.
    again, created = book.subscribe(KEY, sub_req(client_id="a", refresh=True), 1, source="10.0.0.2")
    assert again is a and not created and a.source == "10.0.0.1" and book.held_by("10.0.0.2") == 0
    book.subscribe(KEY, sub_req(client_id="c"), 0, source="10.0.0.2")  # another source has its own cap
    book.subscribe(KEY, sub_req(client_id="d"), 0, source="")  # unknown: never refused
    book.subscribe(KEY, sub_req(client_id="e"), 0, source="")
    book.subscribe(KEY, sub_req(client_id="f"), 0, source="")
    assert book.source_count == 3
    # Unsubscribe, expiry and pruning give the slots back.
    book.unsubscribe(KEY, parse_unsubscribe(b'{"key":"tok","client_id":"a"}'))
    assert book.held_by("10.0.0.1") == 1
    book.subscribe(KEY, sub_req(client_id="g"), 0, source="10.0.0.1")
    book.advance(100 * H)
    assert len(book) == 0 and book.source_count == 0 and book.held_by("10.0.0.1") == 0
    book.subscribe(KEY, sub_req(client_id="h", key="tok2"), 100 * H, source="10.0.0.1")
    book.remove_token("tok2")
    assert book.held_by("10.0.0.1") == 0


def test_prepare_changes_nothing_until_commit():
    book = SubscriptionBook(per_source=1)
    change = book.prepare(KEY, sub_req(), 0, source="10.0.0.1")
    assert change.created and len(book) == 0 and book.held_by("10.0.0.1") == 0 and book.next_due() is None
    sub = book.commit(change)
    assert sub is change.sub and len(book) == 1 and book.held_by("10.0.0.1") == 1
    # A prepared refresh leaves the live subscription as it was until committed.
    book.advance(5.5 * H)
    refresh = book.prepare(KEY, sub_req(session_id="s2", platform="ios"), 5.5 * H, source="10.0.0.9")
    assert not refresh.created and refresh.sub is sub
    assert (sub.deadline, sub.session_id, sub.platform, sub.state) == (
        6 * H,
        "s1",
        Platform.ANDROID,
        S.TIMEOUT_PUSH_SENT,
    )
    assert (refresh.deadline, refresh.session_id, refresh.platform) == (11.5 * H, "s2", Platform.IOS)
    assert book.next_due() == 6 * H
    assert book.commit(refresh) is sub
    assert (sub.deadline, sub.session_id, sub.platform, sub.state) == (11.5 * H, "s2", Platform.IOS, S.ACTIVE)
    assert book.held_by("10.0.0.1") == 1 and book.held_by("10.0.0.9") == 0 and book.next_due() == 11 * H


def test_a_restored_subscription_counts_for_its_source():
    book = SubscriptionBook(per_source=1)
    change = book.prepare(KEY, sub_req(), 0, source="2001:db8::")
    assert book.restore(change.sub, 1)
    with pytest.raises(BadRequest):
        book.subscribe(KEY, sub_req(client_id="other"), 1, source="2001:db8::")


def test_subscriptions_in_all_are_capped():
    book = SubscriptionBook(total=3)
    for i in range(3):
        book.subscribe(KEY, sub_req(client_id=f"c{i}"), 0, source=f"10.0.0.{i}")
    with pytest.raises(BadRequest) as refused:
        book.subscribe(KEY, sub_req(client_id="c9"), 0, source="10.0.0.9")
    assert refused.value.status == 503 and book.refused_full == 1 and len(book) == 3
    book.subscribe(KEY, sub_req(client_id="c0", refresh=True), 1)  # a refresh is not new
    book.unsubscribe(KEY, parse_unsubscribe(b'{"key":"tok","client_id":"c1"}'))
    book.subscribe(KEY, sub_req(client_id="c9"), 1, source="10.0.0.9")
    assert len(book) == 3 and book.refused_per_source == 0
