"""ValueScreen, driven synchronously: forged signatures dropped, values for us decrypted (each cypher's
outcome remembered, within its budgets), others opaque; and what a get keeps per id."""

from __future__ import annotations

from dataclasses import replace

from trio_dht import signature
from trio_dht.crypto import Identity
from trio_dht.infohash import InfoHash
from trio_dht.limits import Limits
from trio_dht.node.local_listens import LocalListens
from trio_dht.node.search_driver import replaces
from trio_dht.node.value_screen import ValueScreen
from trio_dht.value import Value


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def screen_for(identity: Identity | None, clock: Clock | None = None, **limits: float) -> ValueScreen:
    return ValueScreen(signature.Verifier(), identity, Limits(**limits), clock or Clock())


def test_forged_dropped_plain_passes_foreign_stays_opaque(identity: Identity, other: Identity) -> None:
    screen = screen_for(identity)
    plain = Value(b"plain", id=1)
    signed = other.sign_value(Value(b"signed", id=2))
    forged = replace(signed, data=b"forged", _packed=None)
    foreign = other.encrypt_value(Value(b"not for me", id=3), other.public_key)
    ours = other.encrypt_value(Value(b"for me", id=4), identity.public_key)
    out = screen.screen([plain, signed, forged, foreign, ours])
    assert [v.id for v in out] == [1, 2, 3, 4]
    assert out[2] is foreign and out[3].data == b"for me" and out[3].owner == other.public_key.der
    assert (screen.bad_signatures, screen.decrypted, screen.not_for_us) == (1, 1, 1)
    # Without an identity nothing is decrypted; forged values are still dropped.
    assert [v.cypher or v.data for v in screen_for(None).screen([forged, ours])] == [ours.cypher]


def test_the_same_cypher_is_decrypted_once_and_keeps_the_outer_id_and_hints(
    identity: Identity, other: Identity
) -> None:
    screen = screen_for(identity)
    ours = other.encrypt_value(Value(b"for me", id=4), identity.public_key)
    first = screen.one(ours)
    again = screen.one(replace(ours, id=99, prio=1, push_type="call", _packed=None))
    assert first is not None and again is not None and screen.decrypted == 1
    assert (first.id, again.id, again.prio, again.push_type, again.data) == (4, 99, 1, "call", b"for me")
    assert signature.verify(again)  # the id and hints are outside the signed body


def test_decryption_has_a_budget(identity: Identity, other: Identity) -> None:
    clock = Clock()
    screen = screen_for(identity, clock, decrypts_per_second=2)
    cyphers = [other.encrypt_value(Value(b"v%d" % i, id=i + 1), identity.public_key) for i in range(3)]
    out = [screen.one(v) for v in cyphers]
    assert [v.data for v in out] == [b"v0", b"v1", b""]  # the third is over budget: opaque
    assert (screen.decrypted, screen.over_budget) == (2, 1)
    assert screen.one(cyphers[0]).data == b"v0"  # a remembered outcome costs nothing
    clock.now += 0.5  # one more decryption's worth
    assert screen.one(cyphers[2]).data == b"v2" and screen.over_budget == 1
    garbage = Value(id=7, cypher=bytes(256))  # a stranger's bytes of our key's length: budget spent, opaque
    assert screen.one(garbage) is garbage and screen.over_budget == 2


def test_the_cache_is_bounded_in_bytes(identity: Identity, other: Identity) -> None:
    screen = screen_for(identity, decrypt_cache_bytes=25_000, decrypts_per_second=1000)
    big = [other.encrypt_value(Value(bytes([i]) * 10_000, id=i + 1), identity.public_key) for i in range(4)]
    for v in big:
        assert screen.one(v).data == bytes([v.id - 1]) * 10_000
    assert len(screen._decrypted) == 2 and screen._cache_bytes <= 25_000
    screen.one(big[0])  # evicted: decrypted again
    assert screen.decrypted == 5


def test_a_listener_never_hears_a_forged_value(identity: Identity, other: Identity) -> None:
    screen = screen_for(identity)
    listens = LocalListens(screen.one)
    heard = []
    key = InfoHash.get("listened")
    listens.add(key, None, heard.append)
    signed = other.sign_value(Value(b"real", id=2))
    listens.deliver(key, replace(signed, data=b"forged", _packed=None), 100.0)
    listens.deliver(key, other.encrypt_value(Value(b"sealed", id=3), identity.public_key), 100.0)
    listens.deliver(key, signed, 100.0)
    assert [(e.value.id, e.value.data) for e in heard] == [(3, b"sealed"), (2, b"real")]


def test_a_get_keeps_a_signed_value_over_an_unsigned_or_opaque_copy(
    identity: Identity, other: Identity
) -> None:
    signed = other.sign_value(Value(b"real", id=8))
    opaque = Value(id=8, cypher=b"\x01" * 300)
    unsigned = Value(b"copy", id=8)
    assert replaces(signed, None) and replaces(opaque, None)
    assert replaces(signed, opaque) and replaces(signed, unsigned)
    assert not replaces(opaque, signed) and not replaces(unsigned, signed) and not replaces(unsigned, opaque)
    edit = other.sign_value(Value(b"later edit", id=8, seq=1))
    assert replaces(edit, signed) and not replaces(signed, edit)  # the owner's latest version
    theirs = identity.sign_value(Value(b"another owner", id=8, seq=5))
    assert not replaces(theirs, signed)  # between owners, the first found stays
