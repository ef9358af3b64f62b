"""The ``trio-dht`` process with push: SUBSCRIBE through its proxy, ``kill -9``, restart with ``--persist``.

Every acknowledged subscription must come back (with its session id), and a put after the restart must push;
a permanent put must be held (and announced) again.
"""

from __future__ import annotations

import json
import signal
import sys

import httpx
import trio
from cli_process import LOOPBACK_NODE, free_tcp_port, trio_dht_process

from trio_dht.infohash import InfoHash
from trio_dht.testing.gorush import open_gorush_double

MODULE = (sys.executable, "-m", "trio_dht")
COUNT = 25
PERMANENT_KEY = InfoHash.get("held across restarts")  # subscribed by nobody


async def test_subscriptions_survive_kill_9_and_push_after_restart(tmp_path) -> None:
    keys = [InfoHash.get(f"persisted-{i}") for i in range(COUNT)]
    async with open_gorush_double() as gorush:
        port = free_tcp_port()
        command = [
            *MODULE,
            *LOOPBACK_NODE,
            "--proxyserver", str(port),
            "--proxy-addr", "127.0.0.1",
            "--pushserver", gorush.url.removeprefix("http://"),
            "--subscription-lifetime", "24h",
            "-f", str(tmp_path / "push-state"),
        ]  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=10) as http:
            async with trio_dht_process(command) as process:
                for i, key in enumerate(keys):
                    body = {"key": f"tok-{i}", "platform": "android", "client_id": "c", "session_id": f"s{i}"}
                    r = await http.request("SUBSCRIBE", f"/key/{key.hex()}", json=body)
                    assert (r.status_code, r.content) == (200, b"{}\n")  # acknowledged: stored before this
                permanent = {"data": "c3RheQ==", "id": "4242", "permanent": True}
                await http.post(f"/key/{PERMANENT_KEY.hex()}", json=permanent)  # 502 on a lone node, but held
                assert (await http.get("/node/stats")).json()["totalPermanentPuts"] == 1
                process.process.send_signal(signal.SIGKILL)
                with trio.fail_after(10):
                    assert await process.process.wait() == -signal.SIGKILL

            async with trio_dht_process(command):
                stats = (await http.get("/node/stats")).json()
                assert stats["pushListenersCount"] == COUNT
                assert stats["pushSubscriptions"]["restored"] == COUNT
                assert stats["totalPermanentPuts"] == 1
                with trio.fail_after(10):  # re-announced: the node holds the value again
                    while not any(
                        v.get("id") == "4242" for v in _lines(await http.get(f"/key/{PERMANENT_KEY.hex()}"))
                    ):
                        await trio.sleep(0.05)

                # A put on a restored key pushes (a lone node answers 502 but stores the value, as OpenDHT).
                await http.post(f"/key/{keys[3].hex()}", json={"data": "aGVsbG8=", "id": "77"})
                with trio.fail_after(10):
                    while not gorush.notifications:
                        await trio.sleep(0.05)
                [note] = gorush.notifications
                assert note["tokens"] == ["tok-3"] and note["platform"] == 2
                assert (note["data"]["key"], note["data"]["s"], note["data"]["to"]) == (
                    keys[3].hex(),
                    "s3",
                    "c",
                )

                # Each subscription is known again: a plain re-SUBSCRIBE is answered as an existing one.
                for i, key in enumerate(keys):
                    body = {"key": f"tok-{i}", "platform": "android", "client_id": "c", "refresh": True}
                    r = await http.request("SUBSCRIBE", f"/key/{key.hex()}", json=body)
                    assert r.status_code == 200 and "content-length" not in r.headers  # chunked: existing
                assert (await http.get("/node/stats")).json()["pushListenersCount"] == COUNT


def _lines(response: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]
