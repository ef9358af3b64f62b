"""The program (``python -m trio_dht --config FILE``) pushing to FCM and APNs doubles through what goes wrong:

* OpenDHT's C++ proxy client (Debian's ``dhtnode`` 2.4.12, ``--proxyclient URL --devicekey TOKEN``) listens
  by SUBSCRIBE with ``"platform": ""`` and ``"topic": ""`` (OpenDHT's proxy, and ours, route that as iOS);
  an FCM app serving both platforms gets the wake-up of a real opendht 4.4.2 node's put for that device key.
* A token the service reports dead (FCM ``UNREGISTERED``, APNs 410 ``Unregistered``) is pruned: the next put
  on its key sends nothing to it, and ``/node/stats`` counts it.
* An outage (503 with ``Retry-After`` from both services) loses no wake-up: every key put on meanwhile is
  pushed once the services answer again.
* An expired OAuth access token (and an expired APNs provider token) is renewed once, and the push still
  arrives.

Puts other than the real node's go through the program's own proxy (a lone node stores them and answers 502).
With ``CI=true`` a missing peer fails these tests instead of skipping them.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cli_process import LOOPBACK_NODE, TrioDhtProcess, free_tcp_port, trio_dht_process
from peers import (
    needs_dhtnode,
    needs_opendht,
    open_dhtnode_proxy_client,
    open_opendht_peer,
    poll_until,
    require_dhtnode,
    require_opendht,
)

from trio_dht.infohash import InfoHash
from trio_dht.testing import generate_test_key, open_apns_double, open_fcm_double
from trio_dht.testing.apns import ApnsDouble
from trio_dht.testing.fcm import FcmDouble

pytestmark = pytest.mark.interop

BUNDLE_ID = "com.example.recovery"


@dataclass
class Stack:
    process: TrioDhtProcess
    http: httpx.AsyncClient
    fcm: FcmDouble
    apns: ApnsDouble
    url: str

    async def subscribe(self, key: InfoHash, token: str, platform: str, client_id: str = "c") -> None:
        body = {"key": token, "platform": platform, "client_id": client_id}
        if platform == "ios":
            body["topic"] = BUNDLE_ID
        r = await self.http.request("SUBSCRIBE", f"/key/{key.hex()}", json=body)
        assert r.status_code == 200, r.text

    async def put(self, key: InfoHash, data: bytes) -> None:
        """A put through the program's proxy: stored by its lone node (502 ``Put failed``), hence pushed."""
        body = {"data": base64.b64encode(data).decode()}
        r = await self.http.post(f"/key/{key.hex()}", json=body)
        assert r.status_code in (200, 502), r.text

    async def stats(self) -> dict[str, Any]:
        return (await self.http.get("/node/stats")).json()


@asynccontextmanager
async def open_stack(
    tmp_path: Path, *, fcm_platforms: tuple[str, ...] = ("android",)
) -> AsyncIterator[Stack]:
    """The program with one FCM app (the default of ``fcm_platforms``) and one APNs app (``BUNDLE_ID``), each
    its own double."""
    apns_key = generate_test_key()
    async with AsyncExitStack() as stack:
        fcm = await stack.enter_async_context(open_fcm_double())
        apns = await stack.enter_async_context(open_apns_double(keys=[apns_key], bundle_ids=[BUNDLE_ID]))
        account = tmp_path / "service-account.json"
        account.write_text(json.dumps(fcm.service_account()))
        p8 = apns_key.write(tmp_path)
        port = free_tcp_port()
        lines = [
            f"proxyserver = {port}",
            'proxy_addr = "127.0.0.1"',
            "http_workers = 0",
            "[apps.fcm]",
            'kind = "fcm"',
            f'service_account = "{account}"',
            f'url = "{fcm.url}"',
            f"platform = {json.dumps(list(fcm_platforms))}",
            "[apps.apns]",
            'kind = "apns"',
            f'key_file = "{p8}"',
            f'key_id = "{apns_key.key_id}"',
            f'team_id = "{apns_key.team_id}"',
            f'url = "{apns.url}"',
            f'ca_file = "{apns.ca_file}"',
            f'topics = ["{BUNDLE_ID}"]',
        ]
        config = tmp_path / "trio-dht.toml"
        config.write_text("\n".join(lines) + "\n")
        command = [sys.executable, "-m", "trio_dht", *LOOPBACK_NODE, "--config", str(config)]
        process = await stack.enter_async_context(trio_dht_process(command))
        url = f"http://127.0.0.1:{port}"
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=url, trust_env=False, timeout=10))
        yield Stack(process, http, fcm, apns, url)


def _fcm_tokens(fcm: FcmDouble) -> list[str]:
    """The token of every ``messages:send`` request received (accepted or not), in order."""
    return [json.loads(r.body)["message"]["token"] for r in fcm.requests if r.path.endswith("/messages:send")]


def _apns_tokens(apns: ApnsDouble) -> list[str]:
    """The device token of every request received (accepted or not), in order."""
    return [r.path.rpartition("/")[2] for r in apns.requests]


@asynccontextmanager
async def recording_relay(port: int) -> AsyncIterator[tuple[str, list[bytearray]]]:
    """A loopback TCP relay to ``127.0.0.1:port``: its URL, and what each connection's client sent so far."""
    sent: list[bytearray] = []

    async def pipe(source: trio.SocketStream, sink: trio.SocketStream, record: bytearray | None) -> None:
        async for chunk in source:
            if record is not None:
                record += chunk
            await sink.send_all(chunk)
        await sink.send_eof()

    async def relay(client: trio.SocketStream) -> None:
        record = bytearray()
        sent.append(record)
        try:
            async with (
                client,
                await trio.open_tcp_stream("127.0.0.1", port) as server,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(pipe, client, server, record)
                nursery.start_soon(pipe, server, client, None)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(functools.partial(trio.serve_tcp, relay, 0, host="127.0.0.1"))
        yield f"http://127.0.0.1:{listener.socket.getsockname()[1]}", sent
        nursery.cancel_scope.cancel()


def _subscribe_bodies(sent: list[bytearray]) -> list[dict[str, Any]]:
    """The JSON bodies of the SUBSCRIBE requests among the recorded ones."""
    return [
        json.loads(raw.partition(b"\r\n\r\n")[2])
        for raw in sent
        if re.match(rb"SUBSCRIBE /key/[0-9a-f]{40} HTTP/1\.1\r\n", raw)
    ]


@needs_dhtnode
@needs_opendht
async def test_cpp_proxy_client_with_a_device_key_is_woken_through_fcm(tmp_path: Path) -> None:
    require_dhtnode()
    require_opendht()
    device_key = "cpp-client-fcm-token"
    key = InfoHash.get("direct push: dhtnode's proxy client")
    # dhtnode sends no platform: the FCM app is the default of both (an iOS push through FCM is valid).
    async with (
        open_stack(tmp_path, fcm_platforms=("android", "ios")) as s,
        recording_relay(int(s.url.rpartition(":")[2])) as (relay_url, sent),
        open_dhtnode_proxy_client(relay_url, devicekey=device_key) as client,
    ):
        with trio.fail_after(40):
            async with client.listen(key.hex()):
                await poll_until(lambda: _active(s, 1), timeout=10)  # its listen became a SUBSCRIBE
                [body] = _subscribe_bodies(sent)
                assert body["session_id"]
                assert {k: v for k, v in body.items() if k != "session_id"} == {
                    "client_id": "dhtnode",
                    "key": device_key,
                    "platform": "",
                    "topic": "",
                }
                async with open_opendht_peer(bootstrap=("127.0.0.1", s.process.udp_port)) as real:
                    await real.wait_for_nodes(1, timeout=15)
                    assert await real.put(key, b"for the cpp client")
                    [message] = await poll_until(lambda: _nonempty(s.fcm.messages), timeout=15)
        assert message["token"] == device_key
        assert message["data"]["key"] == key.hex()
        assert message["data"]["to"] == "dhtnode"
        assert message["data"]["s"] == body["session_id"]
        assert s.apns.requests == []
        assert (await s.stats())["pushGateways"] == {"fcm": {"delivered": 1}}


async def test_dead_tokens_are_pruned_for_fcm_and_apns(tmp_path: Path) -> None:
    async with open_stack(tmp_path) as s:
        with trio.fail_after(30):
            android, ios = InfoHash.get("prune android"), InfoHash.get("prune ios")
            dead = {"fcm": "fcm-dead", "apns": "d" * 64}
            live = {"fcm": "fcm-live", "apns": "e" * 64}
            for name, platform, key in (("fcm", "android", android), ("apns", "ios", ios)):
                await s.subscribe(key, dead[name], platform)
                await s.subscribe(key, live[name], platform)
            s.fcm.unregister(dead["fcm"])
            s.apns.fail_token(dead["apns"], "Unregistered")

            await s.put(android, b"first")
            await s.put(ios, b"first")
            await poll_until(lambda: _pruned(s, 2), timeout=15)
            stats = await s.stats()
            assert stats["pushSubscriptions"]["active"] == 2
            assert stats["pushDelivery"]["tokensGone"] == 2
            assert sorted(_fcm_tokens(s.fcm)) == sorted([dead["fcm"], live["fcm"]])
            assert sorted(_apns_tokens(s.apns)) == sorted([dead["apns"], live["apns"]])

            await s.put(android, b"second")
            await s.put(ios, b"second")
            await poll_until(lambda: _count(s.fcm.messages, 2), timeout=15)
            await poll_until(lambda: _count(s.apns.notifications, 2), timeout=15)
            await trio.sleep(0.3)  # nothing more comes
        assert [m["token"] for m in s.fcm.messages] == [live["fcm"]] * 2
        assert [n.device_token for n in s.apns.notifications] == [live["apns"]] * 2
        assert _fcm_tokens(s.fcm).count(dead["fcm"]) == 1
        assert _apns_tokens(s.apns).count(dead["apns"]) == 1
        stats = await s.stats()
        assert stats["pushSubscriptions"]["prunedTokens"] == 2
        assert stats["pushGateways"] == {
            "apns": {"delivered": 2, "token-gone": 1},
            "fcm": {"delivered": 2, "token-gone": 1},
        }


async def test_an_outage_then_recovery_loses_no_wake_up(tmp_path: Path) -> None:
    keys = {
        (platform, i): InfoHash.get(f"outage {platform} {i}")
        for platform in ("android", "ios")
        for i in range(3)
    }
    token = {(p, i): f"fcm-{i}" if p == "android" else f"{i}" * 64 for p, i in keys}
    per_round = len(keys) // 2  # each service's subscriptions: one request each per attempt
    failures = 4 * per_round  # about four attempts, a Retry-After apart, for each service
    async with open_stack(tmp_path) as s:
        with trio.fail_after(40):
            for (platform, i), key in keys.items():
                await s.subscribe(key, token[platform, i], platform)
            retry_after = {"Retry-After": "1"}
            s.fcm.script(503, {"error": {"code": 503, "status": "UNAVAILABLE"}}, retry_after, times=failures)
            s.apns.script(503, "ServiceUnavailable", headers=retry_after, times=failures)

            # Values keep coming until each service has refused two attempts; then the puts stop.
            rounds = 0
            while min(len(_fcm_tokens(s.fcm)), len(s.apns.requests)) < 2 * per_round:
                for key in keys.values():
                    await s.put(key, f"during the outage {rounds}".encode())
                rounds += 1
                await trio.sleep(0.3)
            assert rounds >= 3  # the outage outlasted a Retry-After
            # Every put happened during the outage: neither service has accepted anything yet.
            assert s.fcm.messages == [] and s.apns.notifications == []

            await poll_until(lambda: _all_woken(s, keys, token), timeout=20)
            await trio.sleep(0.3)  # nothing more comes
        # Each subscription's pushes were coalesced while waiting: one wake-up each after the recovery.
        assert sorted(m["token"] for m in s.fcm.messages) == sorted(
            token[k] for k in keys if k[0] == "android"
        )
        assert sorted(n.device_token for n in s.apns.notifications) == sorted(
            token[k] for k in keys if k[0] == "ios"
        )
        stats = await s.stats()
        assert stats["pushDelivery"]["coalesced"] > 0 and stats["pushDelivery"]["expired"] == 0
        for name in ("fcm", "apns"):
            outcomes = stats["pushGateways"][name]
            assert outcomes["delivered"] == per_round
            # Every refused request was retried: in a batch that failed whole, or alone.
            assert outcomes.get("TemporaryGatewayError", 0) + outcomes.get("retry", 0) == failures


async def test_expired_access_tokens_are_renewed_without_losing_a_push(tmp_path: Path) -> None:
    android, ios = InfoHash.get("renew android"), InfoHash.get("renew ios")
    async with open_stack(tmp_path) as s:
        with trio.fail_after(30):
            await s.subscribe(android, "fcm-renew", "android")
            await s.subscribe(ios, "f" * 64, "ios")
            await s.put(android, b"first")
            await s.put(ios, b"first")
            await poll_until(lambda: _count(s.fcm.messages, 1), timeout=15)
            await poll_until(lambda: _count(s.apns.notifications, 1), timeout=15)
            assert s.fcm.token_requests == 1

            s.fcm.expire_tokens()
            s.apns.expire_provider_tokens()
            await s.put(android, b"second")
            await s.put(ios, b"second")
            await poll_until(lambda: _count(s.fcm.messages, 2), timeout=15)
            await poll_until(lambda: _count(s.apns.notifications, 2), timeout=15)
        assert s.fcm.token_requests == 2  # one refresh
        assert len(s.fcm.assertions) == 2
        assert len(_fcm_tokens(s.fcm)) == 3  # the refused one, sent again with the new token
        assert [status for status, _ in s.apns.replies] == [200, 403, 200]
        assert s.apns.replies[1] == (403, "ExpiredProviderToken")
        auth = [r.headers["authorization"] for r in s.apns.requests]
        assert auth[0] == auth[1] != auth[2]
        assert [m["data"]["key"] for m in s.fcm.messages] == [android.hex()] * 2
        stats = await s.stats()
        assert stats["pushGateways"] == {"apns": {"delivered": 2}, "fcm": {"delivered": 2}}


async def _nonempty(items: list) -> list | None:
    return list(items) or None


async def _count(items: list, n: int) -> bool:
    assert len(items) <= n, items
    return len(items) == n


async def _active(s: Stack, n: int) -> bool:
    return (await s.stats())["pushSubscriptions"]["active"] == n


async def _pruned(s: Stack, n: int) -> bool:
    return (await s.stats())["pushSubscriptions"]["prunedTokens"] >= n


async def _all_woken(s: Stack, keys: dict, token: dict) -> bool:
    """Every key's subscriber got a wake-up for it."""
    woken = {(m["token"], m["data"]["key"]) for m in s.fcm.messages}
    woken |= {(n.device_token, n.payload["key"]) for n in s.apns.notifications}
    return all((token[k], key.hex()) in woken for k, key in keys.items())
