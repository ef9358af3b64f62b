"""The proxy client against our real proxy on 127.0.0.1 (a MemoryDht behind it): get/put/listen, a LISTEN
stream killed and restarted, timeouts of a proxy that never answers, an isolated proxy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import pytest
import trio

from trio_dht.api import ValueEvent
from trio_dht.backoff import Backoff
from trio_dht.client import ProxyError, ProxyStatus, ProxyTimeout, open_proxy_client
from trio_dht.infohash import InfoHash
from trio_dht.proxy import ProxyConfig, serve_proxy
from trio_dht.testing.memory_dht import MemoryDht
from trio_dht.value import FIELD_TYPE, Query, Value

BOUND = 5.0
"""Safety bound on every wait (not a timing assertion)."""
KEY = InfoHash.get("chan")


@pytest.fixture
async def dht(nursery: trio.Nursery) -> MemoryDht:
    dht = MemoryDht(lifetime=lambda value: 0.5 if value.type == 5 else 600.0)
    await nursery.start(dht.run)  # expiries for callback listens (the proxy's listen streams)
    return dht


async def start_proxy(nursery: trio.Nursery, dht: MemoryDht, port: int = 0) -> tuple[str, trio.CancelScope]:
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[list[str]]) -> None:
        with scope:
            await serve_proxy(
                dht,
                ProxyConfig(host="127.0.0.1", port=port, graceful_timeout=0.5, node_info_cache=0),
                task_status=task_status,
            )

    (url,) = await nursery.start(run)
    return url, scope


@pytest.fixture
async def proxy_url(nursery: trio.Nursery, dht: MemoryDht) -> str:
    url, _ = await start_proxy(nursery, dht)
    return url


async def next_event(events: AsyncIterator[ValueEvent]) -> ValueEvent:
    with trio.fail_after(BOUND):
        return await events.__anext__()


async def no_event(events: AsyncIterator[ValueEvent], wait: float = 0.3) -> None:
    with trio.move_on_after(wait):
        event = await events.__anext__()
        raise AssertionError(f"unexpected event {event}")


async def test_get_put_through_the_proxy(proxy_url: str, dht: MemoryDht) -> None:
    async with open_proxy_client(proxy_url) as client:
        assert client.connected and client.status is ProxyStatus.CONNECTED
        assert client.node_id == dht.node_id and client.info().good == dht.good_nodes
        value = Value(data=b"hello", utype="text/plain")
        assert await client.put(KEY, value)
        assert value.id != 0 and [v.data for v in dht.values(KEY)] == [b"hello"]
        await dht.put(KEY, Value(data=b"z" * 40_000, id=42, type=3))  # a 53 KB line
        batches: list[list[Value]] = []
        got = await client.get(KEY, on_values=batches.append)
        assert sorted(v.id for v in got) == sorted([value.id, 42])
        assert next(v for v in got if v.id == 42).data == b"z" * 40_000
        assert sum(len(b) for b in batches) == 2
        typed = await client.get(KEY, Query(where=((FIELD_TYPE, 3),)))
        assert [v.id for v in typed] == [42]
        assert await client.get(InfoHash.get("empty")) == []
        dht.fail_puts = True
        assert not await client.put(KEY, Value(data=b"nope"))


async def test_permanent_put_is_held_and_cancelled_locally(proxy_url: str, dht: MemoryDht) -> None:
    async with open_proxy_client(proxy_url) as client:
        value = Value(data=b"forever")
        assert await client.put(KEY, value, permanent=True)
        assert (KEY, value.id) in client.book.puts
        assert client.cancel_put(KEY, value.id) and not client.cancel_put(KEY, value.id)


async def test_listen_stream(proxy_url: str, dht: MemoryDht) -> None:
    await dht.put(KEY, Value(data=b"init", id=1))
    async with open_proxy_client(proxy_url) as client, client.listen(KEY) as events:
        assert not client.push_mode
        assert (await next_event(events)).value.data == b"init"
        await client.put(KEY, Value(data=b"new", id=2))
        assert (await next_event(events)).value.id == 2
        await dht.put(KEY, Value(data=b"short", id=9, type=5))  # lives 0.5 s here
        assert (await next_event_value(events, 9)).data == b"short"
        expired = await next_event(events)
        assert (expired.value.id, expired.expired) == (9, True)
    with trio.fail_after(BOUND):
        while dht.listener_count(KEY):
            await trio.sleep(0.01)


async def next_event_value(events: AsyncIterator[ValueEvent], vid: int) -> Value:
    event = await next_event(events)
    assert event.value.id == vid and not event.expired
    return event.value


async def test_two_listeners_share_one_stream(proxy_url: str, dht: MemoryDht) -> None:
    await dht.put(KEY, Value(data=b"a", id=1))
    async with open_proxy_client(proxy_url) as client, client.listen(KEY) as first:
        assert (await next_event(first)).value.id == 1
        async with client.listen(KEY) as second:
            assert (await next_event(second)).value.id == 1  # what the watch holds, at once
            assert dht.listener_count(KEY) == 1
            await dht.put(KEY, Value(data=b"b", id=2))
            assert (await next_event(first)).value.id == 2
            assert (await next_event(second)).value.id == 2


async def test_connectivity_changed_restarts_the_streams_without_misses_or_duplicates(
    proxy_url: str, dht: MemoryDht
) -> None:
    await dht.put(KEY, Value(data=b"a", id=1))
    async with open_proxy_client(proxy_url) as client, client.listen(KEY) as events:
        assert (await next_event(events)).value.id == 1
        client.connectivity_changed()  # the device changed networks: the stream is reopened
        await dht.put(KEY, Value(data=b"b", id=2))
        assert (await next_event(events)).value.id == 2
        await no_event(events)  # value 1 is not delivered again
        assert client.connected


async def test_killed_listen_stream_is_restarted_without_misses_or_duplicates(
    nursery: trio.Nursery, dht: MemoryDht
) -> None:
    url, scope = await start_proxy(nursery, dht)
    port = int(url.rsplit(":", 1)[1])
    await dht.put(KEY, Value(data=b"one", id=1))
    await dht.put(KEY, Value(data=b"doomed", id=3))
    backoff = Backoff(0.05, 0.5, stable_after=60.0)
    async with open_proxy_client(url, stream_backoff=backoff) as client, client.listen(KEY) as events:
        assert {(await next_event(events)).value.id for _ in range(2)} == {1, 3}
        for round_ in range(2):
            scope.cancel()  # the proxy goes away: the stream ends (cleanly, with its last chunk)
            with trio.fail_after(BOUND):
                while dht.listener_count(KEY):
                    await trio.sleep(0.01)
            # while it is down: one value appears, one goes away
            await dht.put(KEY, Value(data=b"while down", id=10 + round_))
            if round_ == 0:
                dht._store[KEY].pop(3)  # gone without an expiry event anyone could see
            url2, scope = await start_proxy(nursery, dht, port)
            assert url2 == url
            got = [await next_event(events) for _ in range(2 if round_ == 0 else 1)]
            assert sorted((e.value.id, e.expired) for e in got) == sorted(
                [(10, False), (3, True)] if round_ == 0 else [(11, False)]
            )
            await no_event(events)  # value 1 is not delivered again
        await dht.put(KEY, Value(data=b"after", id=20))
        assert (await next_event(events)).value.id == 20
        await no_event(events)


async def test_a_proxy_that_never_answers_times_out(nursery: trio.Nursery) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(BOUND):
        async with open_proxy_client(f"127.0.0.1:{port}", timeout=0.3) as client:
            assert client.status is ProxyStatus.DISCONNECTED and "within 0.3 s" in client.health.error
            with pytest.raises(ProxyTimeout, match="GET /key/"):
                await client.get(KEY)
            with pytest.raises(ProxyTimeout, match="POST /key/"):
                await client.put(KEY, Value(data=b"x"))
            # a listen keeps retrying in the background; entering it does not hang
            async with client.listen(KEY) as events:
                await no_event(events, 0.1)
    with trio.fail_after(BOUND):
        async with (
            open_proxy_client(f"127.0.0.1:{port}", push_token="tok", timeout=0.3) as client,
            client.listen(KEY) as events,
        ):
            assert client.book.watches[KEY].state.value == "failed"  # SUBSCRIBE timed out, retried later
            await no_event(events, 0.1)


async def test_unreachable_proxy_is_a_clear_error() -> None:
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with trio.fail_after(BOUND):
        async with open_proxy_client(f"http://127.0.0.1:{port}", timeout=1.0) as client:
            assert client.status is ProxyStatus.DISCONNECTED
            with pytest.raises(ProxyError, match="ConnectError"):
                await client.get(KEY)


async def test_isolated_proxy_is_reported_not_connected(proxy_url: str, dht: MemoryDht) -> None:
    async with open_proxy_client(proxy_url) as client:
        assert client.connected
        dht.good_nodes = 0  # the proxy's node loses every peer, HTTP still answers (#869)
        health = await client.check_health()
        assert health.status is ProxyStatus.ISOLATED and not client.connected
        assert "isolated" in health.error and health.node_id == dht.node_id
        dht.good_nodes = 3
        assert (await client.check_health()).connected
    dht.good_nodes = 0
    async with open_proxy_client(proxy_url) as client:
        assert client.status is ProxyStatus.ISOLATED and not client.connected
