"""The sans-IO value store: put outcomes, policies, quota, refresh and expiry (explicit ``now`` values)."""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_dht.infohash import InfoHash
from trio_dht.node.storage import (
    MAX_VALUES_PER_KEY,
    PutOutcome,
    Refusal,
    Storage,
    source_bucket,
)
from trio_dht.value import MAX_VALUE_SIZE, Query, Value, type_expiration

K = InfoHash.get("key")
K2 = InfoHash.get("other key")
HOUR = 3600.0
T0 = 1000.0
ALICE = b"alice public key"
BOB = b"bob public key"


def fake_verify(value: Value) -> bool:
    """Stands in for RSA: a signature is valid when it is b"ok:" + the signed bytes."""
    return value.signature == b"ok:" + value.signed_bytes()


def signed(
    data: bytes, vid: int = 1, *, seq: int = 0, owner: bytes = ALICE, type: int = 0, valid=True
) -> Value:
    v = Value(data=data, type=type, id=vid, seq=seq, owner=owner)
    v.signature = b"ok:" + v.signed_bytes() if valid else b"forged"
    return v


def plain(data: bytes = b"hello", vid: int = 1, type: int = 0, utype: str = "") -> Value:
    return Value(data=data, type=type, id=vid, utype=utype)


@pytest.fixture
def storage() -> Storage:
    return Storage(verify=fake_verify)


# -- new values -------------------------------------------------------------------------------------------


def test_new_value_is_stored(storage: Storage) -> None:
    v = plain(b"hello", 7)
    result = storage.put(K, v, T0, source="10.0.0.1")
    assert result.outcome is PutOutcome.STORED and result.accepted and result.evicted == ()
    assert storage.get(K) == [v]
    assert storage.get_value(K, 7) is v
    assert storage.get_value(K, 8) is None and storage.get_value(K2, 7) is None
    assert storage.keys() == [K] and K in storage and K2 not in storage
    assert storage.value_count == 1 and storage.key_count == 1
    assert storage.total_bytes == 5 and storage.local_bytes == 0
    assert storage.stored(K, 7).expiration == T0 + 600
    assert storage.stats()["values"] == 1 and storage.stats()["sources"] == 1


def test_value_id_zero_is_refused(storage: Storage) -> None:
    result = storage.put(K, plain(vid=0), T0)
    assert result.outcome is PutOutcome.REFUSED and result.refusal is Refusal.INVALID_ID
    assert storage.value_count == 0


def test_size_limit(storage: Storage) -> None:
    assert storage.put(K, plain(b"x" * MAX_VALUE_SIZE, 1), T0).outcome is PutOutcome.STORED
    big = plain(b"x" * (MAX_VALUE_SIZE - 3), 2, utype="abcd")  # utype counts too
    result = storage.put(K, big, T0)
    assert result.refusal is Refusal.TOO_LARGE
    assert storage.get_value(K, 2) is None and storage.total_bytes == MAX_VALUE_SIZE


@pytest.mark.parametrize("type_id", [0, 1, 2, 3, 4, 5, 8, 42])
def test_expiration_is_created_plus_type_lifetime(storage: Storage, type_id: int) -> None:
    data = msgpack.packb(["svc", b"x"]) if type_id == 1 else b"x"
    storage.put(K, plain(data, 1, type=type_id), T0, created=T0 - 30)
    assert storage.stored(K, 1).expiration == T0 - 30 + type_expiration(type_id)


def test_created_in_the_future_counts_as_now(storage: Storage) -> None:
    storage.put(K, plain(), T0, created=T0 + HOUR)
    assert storage.stored(K, 1).expiration == T0 + 600


def test_nan_created_counts_as_now(storage: Storage) -> None:
    storage.put(K, plain(), T0, created=math.nan)
    assert storage.stored(K, 1).expiration == T0 + 600


@pytest.mark.parametrize("age", [600.0, 601.0, 10 * HOUR])
def test_expired_on_arrival_is_refused(storage: Storage, age: float) -> None:
    result = storage.put(K, plain(), T0, created=T0 - age)
    assert result.refusal is Refusal.EXPIRED
    assert K not in storage and storage.next_expiration() is None


def test_almost_expired_on_arrival_is_stored(storage: Storage) -> None:
    assert storage.put(K, plain(), T0, created=T0 - 599).outcome is PutOutcome.STORED
    assert storage.expire(T0 + 0.5) == []
    assert storage.expire(T0 + 1) == [(K, [1])]


def test_signed_value_must_verify(storage: Storage) -> None:
    assert storage.put(K, signed(b"a", 1), T0).outcome is PutOutcome.STORED
    result = storage.put(K, signed(b"b", 2, valid=False), T0)
    assert result.refusal is Refusal.BAD_SIGNATURE and storage.get_value(K, 2) is None


def test_unsigned_and_unregistered_types_skip_verification(storage: Storage) -> None:
    assert storage.put(K, plain(b"a", 1), T0).accepted
    # type 42 is not secured: a bad signature is not checked (OpenDHT: size only)
    assert storage.put(K, signed(b"b", 2, type=42, valid=False), T0).outcome is PutOutcome.STORED


def test_without_verify_everything_signed_is_accepted() -> None:
    storage = Storage()
    assert storage.put(K, signed(b"b", 2, valid=False), T0).outcome is PutOutcome.STORED


def test_a_verify_that_raises_refuses() -> None:
    def broken(value: Value) -> bool:
        raise ValueError("bad DER")

    storage = Storage(verify=broken)
    assert storage.put(K, signed(b"b", 2), T0).refusal is Refusal.BAD_SIGNATURE
    assert storage.put(K, plain(b"a", 1), T0).accepted


def test_dht_message_needs_a_service(storage: Storage) -> None:
    assert storage.put(K, plain(msgpack.packb(["", b"x"]), 1, type=1), T0).refusal is Refusal.POLICY
    assert storage.put(K, plain(msgpack.packb([b"", b"x"]), 2, type=1), T0).refusal is Refusal.POLICY
    assert storage.put(K, plain(msgpack.packb(["im", b"x"]), 3, type=1), T0).accepted
    assert storage.put(K, plain(b"\xc1 not msgpack", 4, type=1), T0).accepted
    assert storage.put(K, plain(b"", 5, type=1), T0).accepted


def test_per_key_value_limit() -> None:
    storage = Storage(max_values_per_key=3)
    for vid in (1, 2, 3):
        assert storage.put(K, plain(b"v", vid), T0).outcome is PutOutcome.STORED
    assert storage.put(K, plain(b"v", 4), T0).refusal is Refusal.KEY_FULL
    assert storage.put(K, plain(b"v", 1), T0 + 1).outcome is PutOutcome.REFRESHED
    assert storage.put(K2, plain(b"v", 4), T0).outcome is PutOutcome.STORED
    storage.remove(K, 2)
    assert storage.put(K, plain(b"v", 4), T0).outcome is PutOutcome.STORED
    assert Storage().max_values_per_key == MAX_VALUES_PER_KEY == 65536


# -- re-puts and edits ------------------------------------------------------------------------------------


def test_identical_reput_refreshes(storage: Storage) -> None:
    storage.put(K, plain(b"hello", 1), T0)
    again = plain(b"hello", 1)
    result = storage.put(K, again, T0 + 100, source="10.0.0.2")
    assert result.outcome is PutOutcome.REFRESHED
    assert storage.stored(K, 1).expiration == T0 + 700
    assert storage.value_count == 1 and storage.total_bytes == 5


def test_reput_never_shortens_life(storage: Storage) -> None:
    storage.put(K, plain(), T0)
    result = storage.put(K, plain(), T0 + 100, created=T0 - 400)
    assert result.outcome is PutOutcome.REFRESHED
    assert storage.stored(K, 1).expiration == T0 + 700  # refresh semantics: from now, as OpenDHT


def test_prio_and_push_type_are_not_content(storage: Storage) -> None:
    storage.put(K, plain(), T0)
    other = plain()
    other.prio = 1
    assert storage.put(K, other, T0 + 1).outcome is PutOutcome.REFRESHED


def test_unsigned_edit_is_refused(storage: Storage) -> None:
    original = plain(b"one", 1)
    storage.put(K, original, T0)
    result = storage.put(K, plain(b"two", 1), T0 + 1)
    assert result.refusal is Refusal.EDIT_REFUSED
    assert storage.get(K) == [original] and storage.stored(K, 1).expiration == T0 + 600


def test_signed_edit_with_higher_seq_is_accepted(storage: Storage) -> None:
    storage.put(K, signed(b"one", 1, seq=1), T0, source="10.0.0.1")
    storage.put(K, plain(b"neighbour", 2), T0)
    newer = signed(b"second version", 1, seq=2)
    result = storage.put(K, newer, T0 + 60, source="10.0.0.9")
    assert result.outcome is PutOutcome.EDITED
    assert storage.get(K)[0] is newer  # keeps its place
    assert storage.stored(K, 1).expiration == T0 + 660
    assert storage.total_bytes == newer.size + 9 and storage.value_count == 2
    assert storage.stored(K, 1).bucket == "10.0.0.9"


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda: signed(b"two", 1, seq=1), id="lower seq"),
        pytest.param(lambda: signed(b"two", 1, seq=2), id="equal seq, other bytes"),
        pytest.param(lambda: signed(b"two", 1, seq=3, owner=BOB), id="other owner"),
        pytest.param(lambda: signed(b"two", 1, seq=3, valid=False), id="bad signature"),
        pytest.param(lambda: plain(b"two", 1), id="unsigned"),
        pytest.param(lambda: Value(cypher=b"secret", id=1), id="encrypted"),
    ],
)
def test_signed_edit_refusals(storage: Storage, edit) -> None:
    original = signed(b"one", 1, seq=2)
    storage.put(K, original, T0)
    assert storage.put(K, edit(), T0 + 1).refusal is Refusal.EDIT_REFUSED
    assert storage.get(K) == [original]


def test_equal_seq_same_signed_bytes_other_signature_is_accepted() -> None:
    storage = Storage(verify=lambda v: True)  # two valid signatures of the same bytes
    storage.put(K, signed(b"one", 1, seq=2), T0)
    resigned = Value(data=b"one", id=1, seq=2, owner=ALICE, signature=b"another valid signature")
    assert storage.put(K, resigned, T0 + 1).outcome is PutOutcome.EDITED
    assert storage.get_value(K, 1) is resigned


def test_edit_of_an_unsigned_stored_value_is_refused_even_if_signed(storage: Storage) -> None:
    storage.put(K, plain(b"one", 1), T0)
    assert storage.put(K, signed(b"two", 1, seq=5), T0).refusal is Refusal.EDIT_REFUSED


@pytest.mark.parametrize("type_id", [2, 42])
def test_unsecured_types_refuse_every_edit(storage: Storage, type_id: int) -> None:
    storage.put(K, signed(b"one", 1, seq=1, type=type_id), T0)
    assert storage.put(K, signed(b"two", 1, seq=2, type=type_id), T0).refusal is Refusal.EDIT_REFUSED


def test_certificate_edit_needs_the_same_owner(storage: Storage) -> None:
    storage.put(K, plain(b"cert v1", 1, type=8), T0)
    assert storage.put(K, plain(b"cert v2", 1, type=8), T0 + 1).outcome is PutOutcome.EDITED
    storage.put(K2, signed(b"cert v1", 1, type=8), T0)
    assert storage.put(K2, signed(b"cert v2", 1, type=8, owner=BOB), T0).refusal is Refusal.EDIT_REFUSED
    assert storage.put(K2, signed(b"cert v2", 1, seq=1, type=8), T0).outcome is PutOutcome.EDITED


# -- quota ------------------------------------------------------------------------------------------------


def test_source_bucket() -> None:
    assert source_bucket("192.0.2.7") == "192.0.2.7"
    assert source_bucket("2001:db8:1:2:aaaa::1") == source_bucket("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::"
    assert source_bucket("2001:db8:1:3::1") != source_bucket("2001:db8:1:2::1")
    assert source_bucket("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_bucket("fe80::1%eth0") == "fe80::"
    assert source_bucket(None) == source_bucket("") == ""
    assert source_bucket("not an ip") == "not an ip"


def test_quota_evicts_earliest_value_of_the_largest_source() -> None:
    storage = Storage(max_total_bytes=1000)
    a_ids = list(range(1, 7))
    for i, vid in enumerate(a_ids):  # source A: 600 bytes; value 3 expires first
        created = T0 - 300 if vid == 3 else T0 + i
        storage.put(K, plain(bytes(100), vid), T0 + i, created=created, source="10.0.0.1")
    for vid in (11, 12, 13):  # source B: 300 bytes, in the same /64 twice
        storage.put(K2, plain(bytes(100), vid), T0 + 10, source=f"2001:db8::{vid}")
    assert storage.total_bytes == 900
    result = storage.put(K2, plain(bytes(100), 14), T0 + 20, source="2001:db8::99")
    assert result.outcome is PutOutcome.STORED and result.evicted == ()
    result = storage.put(K2, plain(bytes(100), 15), T0 + 21, source="2001:db8::99")
    assert result.outcome is PutOutcome.STORED
    assert result.evicted == ((K, 3),)  # A (600) is larger than B (500)
    result = storage.put(K2, plain(bytes(100), 16), T0 + 22, source="2001:db8::99")
    # A and B now both use 500; after storing, B (600) is the largest: its earliest value goes
    assert result.evicted == ((K2, 11),)
    assert storage.total_bytes == 1000
    assert storage.stats()["sources"] == 2


def test_quota_can_evict_several_values_of_several_keys() -> None:
    storage = Storage(max_total_bytes=1000)
    for vid in range(1, 11):
        storage.put(K if vid % 2 else K2, plain(bytes(100), vid), T0 + vid, source="10.0.0.1")
    result = storage.put(K, plain(bytes(350), 99), T0 + 20, source="10.0.0.1")
    assert result.outcome is PutOutcome.STORED
    assert result.evicted == ((K, 1), (K2, 2), (K, 3), (K2, 4))
    assert storage.total_bytes == 950


def test_a_put_evicted_at_once_is_refused() -> None:
    storage = Storage(max_total_bytes=250)
    storage.put(K, plain(bytes(100), 1), T0, source="10.0.0.1")
    storage.put(K, plain(bytes(100), 2), T0, source="10.0.0.1")
    result = storage.put(K, plain(bytes(100), 3), T0, created=T0 - 100, source="10.0.0.1")
    assert result.outcome is PutOutcome.REFUSED and result.refusal is Refusal.QUOTA
    assert result.evicted == ()  # no listener ever saw value 3
    assert storage.get_value(K, 3) is None and storage.total_bytes == 200


def test_an_edit_evicted_at_once_is_reported() -> None:
    storage = Storage(max_total_bytes=250, verify=fake_verify)
    storage.put(K, signed(bytes(10), 1, seq=1), T0, created=T0 - 100, source="10.0.0.1")
    storage.put(K, plain(bytes(100), 2), T0, source="10.0.0.1")
    result = storage.put(K, signed(bytes(200), 1, seq=2), T0, created=T0 - 100, source="10.0.0.1")
    assert result.outcome is PutOutcome.REFUSED and result.evicted == ((K, 1),)
    assert storage.get_value(K, 1) is None


def test_unlimited_quota() -> None:
    storage = Storage(max_total_bytes=-1)
    for vid in range(1, 101):
        assert storage.put(K, plain(bytes(MAX_VALUE_SIZE), vid), T0).evicted == ()
    assert storage.total_bytes == 100 * MAX_VALUE_SIZE


# -- local values -----------------------------------------------------------------------------------------


def test_local_values_use_their_own_quota() -> None:
    storage = Storage(max_total_bytes=100, max_local_bytes=300)
    assert storage.put(K, plain(bytes(200), 1), T0, local=True).outcome is PutOutcome.STORED
    assert storage.put(K, plain(bytes(100), 2), T0, source="10.0.0.1").evicted == ()
    assert storage.local_bytes == 200 and storage.total_bytes == 100  # total: remote values only
    assert storage.put(K, plain(bytes(101), 3), T0, local=True).refusal is Refusal.LOCAL_QUOTA
    assert storage.put(K, plain(bytes(100), 3), T0, local=True).outcome is PutOutcome.STORED
    result = storage.put(K, plain(bytes(50), 4), T0, source="10.0.0.2")
    assert result.evicted == ((K, 2),)  # never a local value
    assert storage.local_bytes == 300


def test_local_permanent_value_never_expires_until_removed(storage: Storage) -> None:
    storage.put(K, plain(b"mine", 1), T0, local=True, permanent=True)
    storage.put(K, plain(b"theirs", 2), T0)
    assert storage.stored(K, 1).expiration == math.inf and storage.stored(K, 1).local
    assert storage.next_expiration() == T0 + 600
    assert storage.expire(T0 + 1000 * HOUR) == [(K, [2])]
    assert [v.data for v in storage.get(K)] == [b"mine"]
    assert storage.next_expiration() is None
    assert storage.refresh(K, 1, T0 + 2000 * HOUR) is True
    assert storage.stored(K, 1).expiration == math.inf
    assert storage.put(K, plain(b"mine", 1), T0, local=True).outcome is PutOutcome.REFRESHED
    assert storage.stored(K, 1).expiration == math.inf
    assert storage.remove(K, 1) is True and storage.remove(K, 1) is False
    assert K not in storage and storage.local_bytes == 0 and storage.value_count == 0


def test_permanent_is_for_local_values_only(storage: Storage) -> None:
    storage.put(K, plain(), T0, permanent=True)
    assert storage.stored(K, 1).expiration == T0 + 600


def test_local_reput_takes_a_remote_value_over(storage: Storage) -> None:
    storage.put(K, plain(b"shared", 1), T0, source="10.0.0.1")
    assert storage.total_bytes == 6
    result = storage.put(K, plain(b"shared", 1), T0 + 5, local=True, permanent=True)
    assert result.outcome is PutOutcome.REFRESHED
    assert storage.local_bytes == 6 and storage.total_bytes == 0
    assert storage.stored(K, 1).local and storage.stored(K, 1).expiration == math.inf
    # a remote re-put does not take it back
    storage.put(K, plain(b"shared", 1), T0 + 6, source="10.0.0.1")
    assert storage.stored(K, 1).local and storage.stats()["sources"] == 0


def test_local_edit_respects_local_quota() -> None:
    storage = Storage(max_local_bytes=100, verify=fake_verify)
    storage.put(K, signed(bytes(10), 1, seq=1), T0, local=True)
    assert storage.put(K, signed(bytes(500), 1, seq=2), T0, local=True).refusal is Refusal.LOCAL_QUOTA
    edit = signed(bytes(20), 1, seq=2)
    assert storage.put(K, edit, T0, local=True).outcome is PutOutcome.EDITED
    assert storage.local_bytes == edit.size


# -- refresh ----------------------------------------------------------------------------------------------


def test_refresh(storage: Storage) -> None:
    assert storage.refresh(K, 1, T0) is None
    storage.put(K, plain(b"x", 1, type=5), T0)  # ICE: 60 s
    assert storage.refresh(K, 1, T0 + 50) is True
    assert storage.stored(K, 1).expiration == T0 + 110
    assert storage.refresh(K, 999, T0 + 50) is True  # unknown vid, known key: answered normally
    assert storage.expire(T0 + 60) == []
    assert storage.expire(T0 + 110) == [(K, [1])]
    assert storage.refresh(K, 1, T0 + 120) is None


def test_refresh_does_not_shorten(storage: Storage) -> None:
    storage.put(K, plain(), T0)
    storage.refresh(K, 1, T0 - 100)
    assert storage.stored(K, 1).expiration == T0 + 600


# -- reading ----------------------------------------------------------------------------------------------


def test_get_filters_by_where(storage: Storage) -> None:
    a = plain(b"a", 1, type=0, utype="text/plain")
    b = plain(b"b", 2, type=3)
    c = signed(b"c", 3, type=3)
    for v in (a, b, c):
        storage.put(K, v, T0)
    assert storage.get(K, Query(where=((2, 3),))) == [b, c]
    assert storage.get(K, Query(where=((1, 1),))) == [a]
    assert storage.get(K, Query(where=((5, "text/plain"),))) == [a]
    assert storage.get(K, Query(where=((3, c.owner_id),))) == [c]
    assert storage.get(K, Query(where=((2, 3), (1, 1)))) == []
    assert storage.get(K, Query(select=(1,))) == [a, b, c]
    assert storage.get(K2, Query(where=((2, 3),))) == []


# -- expiry -----------------------------------------------------------------------------------------------


def test_expire_over_hours_groups_by_key_and_drops_empty_keys(storage: Storage) -> None:
    storage.put(K, plain(b"a", 1, type=5), T0)  # 1 min
    storage.put(K, plain(b"b", 2, type=0), T0)  # 10 min
    storage.put(K2, plain(b"c", 3, type=5), T0)  # 1 min
    storage.put(K2, plain(b"d", 4, type=4), T0)  # 7 days
    assert storage.next_expiration() == T0 + 60
    assert storage.expire(T0 + 59.9) == []
    assert sorted(storage.expire(T0 + HOUR)) == sorted([(K, [1, 2]), (K2, [3])])
    assert storage.keys() == [K2] and storage.value_count == 1
    assert storage.next_expiration() == T0 + 7 * 24 * HOUR
    assert storage.expire(T0 + 100 * HOUR) == []
    assert storage.expire(T0 + 7 * 24 * HOUR) == [(K2, [4])]
    assert storage.keys() == [] and storage.total_bytes == 0 and storage.next_expiration() is None


def test_refreshed_values_do_not_expire_at_their_old_time(storage: Storage) -> None:
    storage.put(K, plain(b"a", 1), T0)
    storage.put(K, plain(b"b", 2), T0)
    for minute in range(1, 60):  # refreshed every minute for an hour
        storage.refresh(K, 1, T0 + 60 * minute)
        assert storage.expire(T0 + 60 * minute) == ([(K, [2])] if minute == 10 else [])
    assert storage.next_expiration() == T0 + 59 * 60 + 600
    assert storage.get_value(K, 1) is not None


def test_heaps_stay_small_under_constant_refresh(storage: Storage) -> None:
    """White-box: stale heap entries are compacted, so memory does not grow with refreshes."""
    storage.put(K, plain(b"a", 1), T0, source="10.0.0.1")
    for i in range(20_000):
        storage.refresh(K, 1, T0 + i * 0.01)
    assert len(storage._heap) < 2 * 1 + 1024 + 2
    assert all(len(b.heap) < 2 * b.count + 16 + 2 for b in storage._buckets.values())
    assert len(storage._usage_heap) < 2 * len(storage._buckets) + 1024 + 2


def test_expire_a_hundred_thousand_values() -> None:
    storage = Storage(max_total_bytes=-1)
    n = 100_000
    keys = [InfoHash.get(str(i)) for i in range(1000)]
    for i in range(n):
        storage.put(keys[i % 1000], Value(data=b"v", id=i + 1), T0, created=T0 - (i % 600) - 0.5)
    assert storage.value_count == n
    expired_total = 0
    # value i expires at T0 + 600 - (i % 600) - 0.5: a tenth of the ages every minute
    for step in range(1, 11):
        now = T0 + 60 * step
        expired = storage.expire(now)
        count = sum(len(vids) for _, vids in expired)
        expired_total += count
        assert storage.value_count == n - expired_total
        assert storage.next_expiration() is None or storage.next_expiration() > now
        for key, vids in expired:
            for vid in vids:
                assert storage.get_value(key, vid) is None
    assert expired_total == n and storage.key_count == 0 and storage.total_bytes == 0
    assert storage.stats()["sources"] == 0


# -- properties -------------------------------------------------------------------------------------------

KEYS = [InfoHash.get(f"k{i}") for i in range(3)]
SOURCES = ["10.0.0.1", "10.0.0.2", "2001:db8::1", "2001:db8::2", None]

op_put = st.tuples(
    st.just("put"),
    st.sampled_from(KEYS),
    st.integers(1, 6),  # value id
    st.sampled_from([b"", b"a", bytes(40), bytes(120)]),
    st.sampled_from([0, 1, 5, 8, 42]),
    st.integers(0, 3),  # seq
    st.sampled_from([None, ALICE, BOB]),
    st.sampled_from([True, True, True, False]),  # valid signature
    st.one_of(st.just(0.0), st.floats(0, 900)),  # age of the put (created = now - age)
    st.sampled_from(SOURCES),
    st.booleans(),  # local
    st.booleans(),  # permanent
)
op_refresh = st.tuples(st.just("refresh"), st.sampled_from(KEYS), st.integers(1, 6))
op_remove = st.tuples(st.just("remove"), st.sampled_from(KEYS), st.integers(1, 6))
op_expire = st.tuples(st.just("expire"))
op_wait = st.tuples(st.just("wait"), st.floats(0, 2 * HOUR))
ops = st.lists(
    st.one_of(op_put, op_put, op_put, op_refresh, op_remove, op_expire, op_wait), min_size=20, max_size=80
)


def check_consistent(storage: Storage, limit: int, limit_local: int) -> None:
    remote = local = count = 0
    finite = []
    keys = storage.keys()
    for key in keys:
        values = storage.get(key)
        assert values, "empty keys are removed"
        assert len(values) <= storage.max_values_per_key
        for v in values:
            stored = storage.stored(key, v.id)
            assert stored is not None and stored.value is v
            count += 1
            if stored.local:
                local += v.size
            else:
                remote += v.size
            if stored.expiration != math.inf:
                finite.append(stored.expiration)
    assert (storage.total_bytes, storage.local_bytes, storage.value_count) == (remote, local, count)
    assert storage.key_count == len(keys)
    assert (limit < 0 or remote <= limit) and local <= limit_local
    assert storage.next_expiration() == (min(finite) if finite else None)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, limit=st.sampled_from([150, 300, 300, -1]), limit_local=st.sampled_from([130, 100_000]))
def test_random_operations_keep_stats_consistent(ops, limit: int, limit_local: int) -> None:
    storage = Storage(
        max_total_bytes=limit, max_local_bytes=limit_local, max_values_per_key=4, verify=fake_verify
    )
    now = T0
    for op in ops:
        if op[0] == "put":
            _, key, vid, data, type_id, seq, owner, valid, age, source, local, permanent = op
            v = Value(data=data, type=type_id, id=vid)
            if owner is not None:
                v = signed(data, vid, seq=seq, owner=owner, type=type_id, valid=valid)
            before = storage.get_value(key, vid)
            result = storage.put(
                key, v, now, created=now - age, source=source, local=local, permanent=permanent
            )
            for k, evicted_id in result.evicted:
                assert storage.get_value(k, evicted_id) is None
            if result.outcome in (PutOutcome.STORED, PutOutcome.EDITED):
                assert storage.get_value(key, vid) is v
            elif result.outcome is PutOutcome.REFRESHED:
                assert storage.get_value(key, vid) is before and before.same_content(v)
                assert storage.stored(key, vid).expiration >= now + type_expiration(type_id)
            elif result.refusal is not Refusal.QUOTA:
                assert storage.get_value(key, vid) is before and result.evicted == ()
        elif op[0] == "refresh":
            _, key, vid = op
            had_key = key in storage
            assert storage.refresh(key, vid, now) == (True if had_key else None)
        elif op[0] == "remove":
            _, key, vid = op
            had = storage.get_value(key, vid) is not None
            assert storage.remove(key, vid) is had
            assert storage.get_value(key, vid) is None
        elif op[0] == "expire":
            keys = storage.keys()
            before = {(k, v.id) for k in keys for v in storage.get(k)}
            expired = storage.expire(now)
            gone = [(k, vid) for k, vids in expired for vid in vids]
            assert len(gone) == len(set(gone)) and set(gone) <= before
            assert len({k for k, _ in expired}) == len(expired)
            keys = storage.keys()
            for k in keys:
                for v in storage.get(k):
                    assert storage.stored(k, v.id).expiration > now
        else:
            now += op[1]
        check_consistent(storage, limit, limit_local)
