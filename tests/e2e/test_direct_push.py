"""The program (``python -m trio_dht --config FILE``) pushing without gorush: two FCM apps and two APNs apps,
each its own double, routed by the SUBSCRIBE's topic; a real OpenDHT node (PyPI ``opendht`` 4.4.2) puts on
the subscribed keys, and each double receives exactly its own subscriber's wake-up.

With ``CI=true`` a missing peer fails these tests instead of skipping them.
"""

from __future__ import annotations

import json
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
import trio
from cli_process import LOOPBACK_NODE, free_tcp_port, trio_dht_process
from peers import needs_opendht, open_opendht_peer, poll_until, require_opendht

from trio_dht.infohash import InfoHash
from trio_dht.testing import generate_test_key, open_apns_double, open_fcm_double

pytestmark = pytest.mark.interop

ANDROID_TOKEN = "fcm-device-{}"


def _config(tmp_path: Path, port: int, fcm: list, apns: list) -> Path:
    lines = [f"proxyserver = {port}", 'proxy_addr = "127.0.0.1"', "http_workers = 0"]
    for name, double, account in fcm:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(account))
        lines += [
            f"[apps.fcm-{name}]",
            'kind = "fcm"',
            f'service_account = "{path}"',
            f'url = "{double.url}"',
            f'topics = ["org.example.{name}"]',
        ]
    for name, double, key in apns:
        path = tmp_path / f"{name}.p8"
        path.write_bytes(key.pem)
        lines += [
            f"[apps.apns-{name}]",
            'kind = "apns"',
            f'key_file = "{path}"',
            f'key_id = "{key.key_id}"',
            f'team_id = "{key.team_id}"',
            f'url = "{double.url}"',
            f'ca_file = "{double.ca_file}"',
            f'topics = ["com.example.{name}"]',
        ]
    config = tmp_path / "trio-dht.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


@needs_opendht
async def test_fcm_and_apns_apps_routed_by_topic_push_what_a_real_node_puts(tmp_path: Path) -> None:
    require_opendht()
    keys = {name: generate_test_key() for name in ("a", "b")}
    async with AsyncExitStack() as stack:
        fcm = {name: await stack.enter_async_context(open_fcm_double()) for name in ("a", "b")}
        apns = {
            name: await stack.enter_async_context(
                open_apns_double(keys=[keys[name]], bundle_ids=[f"com.example.{name}"])
            )
            for name in ("a", "b")
        }
        port = free_tcp_port()
        config = _config(
            tmp_path,
            port,
            [(name, double, double.service_account()) for name, double in fcm.items()],
            [(name, double, keys[name]) for name, double in apns.items()],
        )
        command = [sys.executable, "-m", "trio_dht", *LOOPBACK_NODE, "--config", str(config)]
        process = await stack.enter_async_context(trio_dht_process(command))
        http = await stack.enter_async_context(
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10)
        )
        subscribers = {
            ("android", "a"): ANDROID_TOKEN.format("a"),
            ("android", "b"): ANDROID_TOKEN.format("b"),
            ("ios", "a"): "a" * 64,
            ("ios", "b"): "b" * 64,
        }
        keys_of = {}
        for (platform, app), token in subscribers.items():
            key = InfoHash.get(f"direct push {platform} {app}")
            keys_of[(platform, app)] = key
            topic = f"org.example.{app}" if platform == "android" else f"com.example.{app}"
            body = {"key": token, "platform": platform, "topic": topic, "client_id": f"c-{platform}-{app}"}
            r = await http.request("SUBSCRIBE", f"/key/{key.hex()}", json=body)
            assert r.status_code == 200, r.text
        real = await stack.enter_async_context(open_opendht_peer(bootstrap=("127.0.0.1", process.udp_port)))
        await real.wait_for_nodes(1, timeout=15)
        for key in keys_of.values():
            assert await real.put(key, b"new value")

        for app in ("a", "b"):
            messages = await poll_until(lambda app=app: _nonempty(fcm[app].messages), timeout=15)
            assert [m["token"] for m in messages] == [ANDROID_TOKEN.format(app)]
            (message,) = messages
            assert message["android"] == {"priority": "high", "ttl": "86400s"}
            assert message["data"]["key"] == keys_of[("android", app)].hex()
            assert message["data"]["to"] == f"c-android-{app}"
            notes = await poll_until(lambda app=app: _nonempty(apns[app].notifications), timeout=15)
            assert [n.device_token for n in notes] == [app * 64]
            assert notes[0].headers["apns-topic"] == f"com.example.{app}"
            assert notes[0].payload["key"] == keys_of[("ios", app)].hex()
        await trio.sleep(0.5)  # nothing more arrives: each double got its own subscriber's push only
        assert [len(d.messages) for d in fcm.values()] == [1, 1]
        assert [len(d.notifications) for d in apns.values()] == [1, 1]
        stats = (await http.get("/node/stats")).json()
        gateways = stats["pushGateways"]
        for name in ("fcm-a", "fcm-b", "apns-a", "apns-b"):
            assert gateways[name] == {"delivered": 1}, gateways


async def _nonempty(items: list) -> list | None:
    return list(items) or None
