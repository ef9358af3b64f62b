"""A stranger's push endpoints against the real program's push side (``python -m trio_dht``, loopback).

* Sixteen UnifiedPush endpoints that answer one byte every ten seconds take every UnifiedPush request slot;
  a gorush push (another gateway kind) still arrives before any of them reaches its deadline, and a healthy
  UnifiedPush endpoint's push once they do (``--limit push_request_timeout=4``); the slow ones are counted
  as timeouts and, while they keep failing, hold at most half of UnifiedPush's slots.
* An endpoint that answers a 200 MiB body (streamed on loopback) costs a bounded amount of memory: the body
  is read up to ``push_response_bytes`` and the connection closed (``oversizedReplies``).
* ``pingPush`` to a dead endpoint (one that answers 503, one where nothing listens) stops after
  ``push_one_off_attempts`` attempts (``oneOffGaveUp``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import httpx
import trio
from cli_process import free_tcp_port
from conftest import Target, attacked

from trio_dht.infohash import InfoHash
from trio_dht.testing.gorush import open_gorush_double
from trio_dht.testing.unifiedpush import WebPushEndpoint, open_unifiedpush_double

ALLOW = "--push-allow-private-endpoints"
SLOW = 16
DEADLINE = 4
"""``push_request_timeout`` (seconds) for the slowloris test."""


def http_client(target: Target) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=target.url, timeout=10, trust_env=False)


def key(name: str) -> str:
    return InfoHash.get(name).hex()


async def subscribe(http: httpx.AsyncClient, name: str, token: str, platform: str, topic: str = "") -> None:
    body = {"key": token, "platform": platform, "client_id": "c", "session_id": "s", "topic": topic}
    r = await http.request("SUBSCRIBE", f"/key/{key(name)}", json=body)
    assert r.status_code == 200, r.text


async def subscribe_endpoint(http: httpx.AsyncClient, name: str, ep: WebPushEndpoint) -> None:
    await subscribe(http, name, ep.url, "unifiedpush", ep.topic)


async def put(http: httpx.AsyncClient, name: str, n: int = 1) -> None:
    """A value on the key: a wake-up push to its subscribers (a lone node answers 502 but stores it)."""
    await http.post(f"/key/{key(name)}", json={"data": "aGVsbG8=", "id": str(n)})


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``predicate()`` holds (fails after ``timeout``)."""
    start = trio.current_time()
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.02)
        return trio.current_time() - start
    raise AssertionError(f"not within {timeout} s: {what}")


async def delivery(target: Target) -> dict:
    return (await target.stats())["pushDelivery"]


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def test_slowloris_endpoints_do_not_stall_other_pushes() -> None:
    async with contextlib.AsyncExitStack() as stack:
        gorush = await stack.enter_async_context(open_gorush_double())
        slow_servers = [await stack.enter_async_context(open_unifiedpush_double()) for _ in range(SLOW)]
        healthy = await stack.enter_async_context(open_unifiedpush_double())
        gorush_flag = ("--pushserver", gorush.url.removeprefix("http://"))
        flags = (ALLOW, *gorush_flag, "--limit", f"push_request_timeout={DEADLINE}")
        target = await stack.enter_async_context(attacked(*flags))
        http = await stack.enter_async_context(http_client(target))

        slow = []
        for i, server in enumerate(slow_servers):  # one host (port) each: sixteen lanes
            ep = server.endpoint()
            ep.script(201, body=b"x" * 1000, byte_interval=10, times=100)  # a whole reply takes hours
            await subscribe_endpoint(http, f"slow-{i}", ep)
            slow.append(ep)
        fine = healthy.endpoint()
        await subscribe_endpoint(http, "fine", fine)
        await subscribe(http, "device", "gorush-device-token", "android")

        for i in range(SLOW):
            await put(http, f"slow-{i}")
        await wait_until(lambda: all(ep.requests for ep in slow), 10, "every slow endpoint asked")
        await put(http, "device")
        await put(http, "fine")
        # Another gateway kind does not wait for the slow requests: the gorush push arrives while every one of
        # them is still stuck (none has reached its deadline yet).
        await wait_until(lambda: bool(gorush.notifications), DEADLINE, "the gorush push")
        assert (await delivery(target))["timeouts"] == 0
        assert gorush.notifications[0]["tokens"] == ["gorush-device-token"]
        # UnifiedPush's slots are all held by the slow endpoints: the healthy one's turn comes when their
        # requests hit their deadline (a slow reply would take hours).
        await wait_until(lambda: bool(fine.messages), 15, "the healthy endpoint's push")
        stats: dict = {}

        async def timed_out() -> bool:
            stats.update(await delivery(target))
            return stats["timeouts"] >= SLOW

        with trio.fail_after(15):  # each slow request timed out
            while not await timed_out():
                await trio.sleep(0.1)

        # The slow ones keep failing and retrying, but hold at most half of UnifiedPush's slots, so the other
        # half stays free for hosts that answer.
        asked = sum(len(ep.requests) for ep in slow)
        most = 0
        with trio.move_on_after(DEADLINE + 2):
            while True:
                most = max(most, (await delivery(target))["inFlight"])
                await trio.sleep(0.05)
        assert sum(len(ep.requests) for ep in slow) > asked, "the slow endpoints were retried"
        assert 0 < most <= SLOW // 2, most
        await put(http, "fine", 2)
        await wait_until(lambda: len(fine.messages) == 2, 15, "the second healthy push")
        assert not any(ep.messages for ep in slow)


async def test_a_huge_reply_body_is_not_read_into_memory() -> None:
    async with (
        open_unifiedpush_double() as server,
        attacked(ALLOW, "--limit", "push_one_off_attempts=1") as target,
        http_client(target) as http,
    ):
        ep = server.endpoint()
        ep.script(201, body=b"y" * 65536, repeat=3200, times=3)  # 200 MiB each, streamed
        await subscribe_endpoint(http, "huge", ep)
        await trio.sleep(0.5)
        before = peak_rss_kb(target.pid)
        stats: dict = {}

        async def oversized(n: int) -> bool:
            stats.update(await delivery(target))
            return stats["oversizedReplies"] >= n

        for n in range(1, 4):
            await put(http, "huge", n)
            await wait_until(lambda n=n: len(ep.requests) == n, 10, "the push request")
            with trio.fail_after(10):  # the reply read up to the cap, then counted
                while not await oversized(n):
                    await trio.sleep(0.05)
        assert stats["oversizedReplies"] == 3, stats
        growth = peak_rss_kb(target.pid) - before
        assert growth < 16 * 1024, f"peak RSS grew {growth} KiB"
        # The endpoint answers normally again: its pushes are delivered (no stuck or reused connection).
        await put(http, "huge", 10)
        await wait_until(lambda: len(ep.messages) == 1, 5, "a normal push after the huge replies")


async def test_ping_push_to_a_dead_endpoint_stops_after_its_attempts() -> None:
    flags = (ALLOW, "--limit", "push_one_off_attempts=3", "--limit", "push_request_timeout=2")
    async with (
        open_unifiedpush_double() as server,
        attacked(*flags) as target,
        http_client(target) as http,
    ):
        busy = server.endpoint()
        busy.script(503, times=100)
        nowhere = f"http://127.0.0.1:{free_tcp_port()}/up/gone"  # nothing listens there
        for token in (busy.url, nowhere):
            ping = {"key": token, "platform": "unifiedpush", "client_id": "c"}
            assert (await http.post("/node/pingPush", json=ping)).status_code == 200
        stats: dict = {}

        async def gave_up() -> bool:
            stats.update(await delivery(target))
            return stats["oneOffGaveUp"] == 2

        with trio.fail_after(12):  # two backoffs each (0.5-1 s, then 1-2 s)
            while not await gave_up():
                await trio.sleep(0.1)
        assert len(busy.requests) == 3 and stats["queued"] == 0
        await trio.sleep(3)
        assert len(busy.requests) == 3  # no attempt after the last
