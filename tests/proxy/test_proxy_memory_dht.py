"""MemoryDht (trio_dht.testing) and the proxy's permanent-put timers, on the mock clock."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from trio_dht import signature
from trio_dht.api import NoIdentity, RecipientNotFound, ValueEvent
from trio_dht.infohash import InfoHash
from trio_dht.proxy import ProxyConfig, create_app
from trio_dht.proxy.permanent import LIFETIME, REFRESH_MARGIN, PermanentPut
from trio_dht.proxy.routes import Later, Request, put
from trio_dht.testing.memory_dht import MemoryDht
from trio_dht.value import Query, Value

KEY = InfoHash.get("k")


async def test_put_get_and_ids() -> None:
    dht = MemoryDht()
    v = Value(data=b"a")
    assert await dht.put(KEY, v)
    assert v.id != 0
    batches: list[list[Value]] = []
    assert await dht.get(KEY, on_values=batches.append) == [v]
    assert batches == [[v]]
    assert await dht.get(InfoHash.get("other")) == []
    assert not await dht.put(KEY, Value(data=b"x" * 70_000))  # over OpenDHT's 64 KiB
    info = dht.info()
    assert info.good == 8 and info.storage_values == 1 and info.storage_size == 1


async def test_signed_and_encrypted_puts_with_an_identity() -> None:
    from trio_dht.crypto import Identity

    me, other = Identity.generate("me", bits=2048), Identity.generate("other", bits=2048)
    dht = MemoryDht(identity=me)
    value = Value(data=b"a")
    assert await dht.put_signed(KEY, value) and value.id == 0  # the caller's value is left as it was
    (signed,) = dht.values(KEY)
    assert signed.owner == me.public_key.der and signed.seq == 0 and signature.verify(signed)
    assert await dht.put_signed(KEY, Value(data=b"b", id=signed.id))
    (signed,) = dht.values(KEY)
    assert signed.data == b"b" and signed.seq == 1 and signature.verify(signed)

    sealed = InfoHash.get("sealed")
    with pytest.raises(RecipientNotFound):
        await dht.put_encrypted(sealed, Value(data=b"c"), other.public_key.long_id)
    assert await dht.put(InfoHash.get("anywhere"), Value(other.certificate.pem, type=8))
    for to in (other.id, other.public_key.long_id, other.public_key):
        assert await dht.put_encrypted(sealed, Value(data=b"c", id=1), to)
        (stored,) = dht.values(sealed)
        assert stored.cypher and other.decrypt_value(stored, signature.verify).data == b"c"
    assert await dht.put_encrypted(sealed, Value(data=b"d", id=2), me.public_key.long_id)  # our own key
    assert {v.id for v in dht.values(sealed)} == {1, 2}

    plain = MemoryDht()
    with pytest.raises(NoIdentity):
        await plain.put_signed(KEY, Value(data=b"a"))
    with pytest.raises(NoIdentity):
        await plain.put_encrypted(KEY, Value(data=b"a"), other.public_key)


async def test_failed_puts_still_store_locally() -> None:
    dht = MemoryDht(fail_puts=True)
    assert not await dht.put(KEY, Value(data=b"a", id=1))
    assert [v.id for v in dht.values(KEY)] == [1]


async def test_values_expire_by_type(autojump_clock: trio.testing.MockClock) -> None:
    dht = MemoryDht()
    await dht.put(KEY, Value(data=b"ice", id=1, type=5))  # 60 s
    await dht.put(KEY, Value(data=b"user", id=2, type=0))  # 10 min
    await trio.sleep(61)
    assert [v.id for v in await dht.get(KEY)] == [2]
    await trio.sleep(600)
    assert await dht.get(KEY) == []


async def test_listen_current_then_new_then_expired(autojump_clock: trio.testing.MockClock) -> None:
    dht = MemoryDht()
    await dht.put(KEY, Value(data=b"old", id=1))
    events: list[tuple[int, bool, float]] = []
    async with dht.listen(KEY) as stream:
        async with trio.open_nursery() as nursery:

            async def putter() -> None:
                await trio.sleep(5)
                await dht.put(KEY, Value(data=b"new", id=2, type=5))
                await dht.put(KEY, Value(data=b"new", id=2, type=5))  # same content: no event

            nursery.start_soon(putter)
            async for ev in stream:
                events.append((ev.value.id, ev.expired, trio.current_time()))
                if len(events) == 3:
                    break
        assert dht.listener_count(KEY) == 1
    assert dht.listener_count(KEY) == 0
    assert [(i, e) for i, e, _ in events] == [(1, False), (2, False), (2, True)]
    assert events[2][2] - events[1][2] == 60.0


async def test_listen_with_query(autojump_clock: trio.testing.MockClock) -> None:
    dht = MemoryDht()
    async with dht.listen(KEY, Query(where=((1, 7),))) as stream:
        await dht.put(KEY, Value(data=b"a", id=6))
        await dht.put(KEY, Value(data=b"b", id=7))
        with trio.fail_after(1):
            ev: ValueEvent = await stream.__anext__()
    assert ev.value.id == 7


async def test_permanent_until_cancelled(autojump_clock: trio.testing.MockClock) -> None:
    dht = MemoryDht()
    await dht.put(KEY, Value(data=b"p", id=1, type=5), permanent=True)
    await trio.sleep(3600)
    assert len(dht.values(KEY)) == 1
    assert dht.cancel_put(KEY, 1) and not dht.cancel_put(KEY, 1)
    await trio.sleep(61)
    assert dht.values(KEY) == []


async def test_proxy_cancels_lapsed_permanent_puts(autojump_clock: trio.testing.MockClock) -> None:
    dht = MemoryDht()
    warned: list[PermanentPut] = []

    class Hooks:
        async def ping(self, target: Any) -> None:
            pass

        def permanent_put_due(self, held: PermanentPut) -> None:
            warned.append(held)

        def stats(self) -> dict[str, Any]:
            return {}

    app = create_app(dht, ProxyConfig(), push=Hooks())
    state = app.state
    async with trio.open_nursery() as nursery:
        nursery.start_soon(state.run)
        body = b'{"data":"cA==","id":5,"permanent":{"key":"tok","client_id":"c"}}'
        answer = put(state, Request(KEY, body))
        assert isinstance(answer, Later) and (await answer.reply()).status == 200
        await trio.sleep(LIFETIME - REFRESH_MARGIN + 1)
        assert [h.value.id for h in warned] == [5] and state.permanent.total == 1
        await trio.sleep(REFRESH_MARGIN)
        assert state.permanent.total == 0  # lapsed: cancelled on the node, then it expires by type
        await trio.sleep(601)
        assert dht.values(KEY) == []
        nursery.cancel_scope.cancel()


async def test_add_listener_callbacks_and_expiry(nursery, autojump_clock) -> None:
    """Callback listens see current values, new ones and (with run() started) expiries; cancel stops them."""
    dht = MemoryDht()
    await nursery.start(dht.run)
    key = InfoHash.get("callbacks")
    await dht.put(key, Value(data=b"old", id=1))
    events: list[ValueEvent] = []
    handle = dht.add_listener(key, events.append)
    await dht.put(key, Value(data=b"new", id=2, type=5))
    assert [(e.value.id, e.expired) for e in events] == [(1, False), (2, False)]
    await trio.sleep(61)
    assert (2, True) in [(e.value.id, e.expired) for e in events]
    handle.cancel()
    await dht.put(key, Value(data=b"after", id=3))
    assert 3 not in [e.value.id for e in events]
