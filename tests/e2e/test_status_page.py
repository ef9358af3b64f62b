"""``GET /status`` of the ``trio-dht`` process in a real headless browser (Debian's ``chromium``, driven over
CDP on a pipe): the page loads with no console errors, shows the node's id, and its counters move when the
test puts a value and subscribes (a push goes through the gorush double); with and without an HTTP worker.
When the program stops, the page says so in its banner, still without throwing.

Without ``chromium`` the test is skipped, except with ``CI=true`` (``.ci/run`` installs it), where it fails.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio
from cli_process import LOOPBACK_NODE, free_tcp_port, trio_dht_process
from headless_chromium import Page, needs_chromium, open_page, require_chromium

from trio_dht.infohash import InfoHash
from trio_dht.testing.gorush import open_gorush_double

MODULE = (sys.executable, "-m", "trio_dht")
WAIT = 20.0
"""Seconds any one thing the page should show may take (it reads every 2 s)."""

SHOWN = """JSON.stringify({
  nodeId: document.getElementById("node-id").textContent,
  values: document.getElementById("storage-values").textContent,
  subscriptions: document.getElementById("subscriptions").textContent,
  health: document.getElementById("health").textContent,
  banner: document.getElementById("banner").hidden ? null : document.getElementById("banner").textContent,
  gateways: [...document.querySelectorAll("#gateways tr[data-gateway]")].map(
    (tr) => [...tr.cells].map((td) => td.textContent)),
})"""
"""What the page shows, as the test reads it."""


async def shown(page: Page) -> dict[str, Any]:
    return json.loads(await page.evaluate(SHOWN))


async def until(page: Page, what: str, ok: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """What the page shows once ``ok`` holds (polled, for at most :data:`WAIT` seconds)."""
    last: dict[str, Any] = {}
    with trio.move_on_after(WAIT):
        while not ok(last := await shown(page)):
            await trio.sleep(0.1)
        return last
    raise AssertionError(f"the page never showed {what} in {WAIT} s; it shows {last}; errors: {page.errors}")


def number(text: str) -> float:
    return float(text.replace(",", ""))


@needs_chromium
@pytest.mark.parametrize("workers", [0, 1])
async def test_the_status_page_shows_the_node_and_its_counters_move(workers: int) -> None:
    require_chromium()
    key = InfoHash.get(f"status page {workers}")
    async with open_gorush_double() as gorush:
        port = free_tcp_port()
        command = [
            *MODULE, *LOOPBACK_NODE,
            "--proxyserver", str(port), "--proxy-addr", "127.0.0.1",
            "--pushserver", gorush.url.removeprefix("http://"),
            "--http-workers", str(workers),
            "--health-isolated-after", "1h",  # a lone node: /healthz stays 200 (a 503 is a logged load error)
        ]  # fmt: skip
        async with (
            trio_dht_process(command) as process,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as http,
        ):
            node_id = (await http.get("/node/info")).json()["node_id"]
            async with open_page(f"http://127.0.0.1:{port}/status") as page:
                before = await until(page, "the node's id", lambda s: s.get("nodeId") == node_id)
                assert before["banner"] is None and before["health"].startswith("ok")
                assert (before["values"], before["subscriptions"], before["gateways"]) == ("0", "0", [])

                body = {"key": "tok-1", "platform": "android", "client_id": "c", "session_id": "s"}
                assert (await http.request("SUBSCRIBE", f"/key/{key.hex()}", json=body)).status_code == 200
                await http.post(
                    f"/key/{key.hex()}", json={"data": "aGVsbG8=", "id": "7"}
                )  # 502 alone, stored
                await http.post(f"/key/{InfoHash.get('another').hex()}", json={"data": "aGk=", "id": "8"})
                with trio.fail_after(WAIT):
                    while not gorush.notifications:
                        await trio.sleep(0.05)

                after = await until(
                    page,
                    "two values, one subscription and a push",
                    lambda s: (
                        s.get("values") == "2"
                        and s["subscriptions"] == "1"
                        and any(number(total) >= 1 for _, _, _, total, _ in s["gateways"])
                    ),
                )
                [(_, _, peak, _, outcomes)] = after["gateways"]
                assert number(peak) > 0, after  # a rate, from two successive readings
                assert "delivered 1" in outcomes, after
                assert after["banner"] is None and after["nodeId"] == node_id
                assert page.errors == [], page.errors
                if workers == 0:  # the page finds the proxy's routes however its own path is written
                    async with open_page(f"http://127.0.0.1:{port}/%73tatus/") as spelled:
                        again = await until(spelled, "the node's id", lambda s: s.get("nodeId") == node_id)
                        assert again["values"] == "2" and spelled.errors == [], (again, spelled.errors)

                assert await process.stop() == 0
                gone = await until(page, "the banner", lambda s: s.get("banner") is not None)
                assert "cannot be read" in gone["banner"] and "unreachable" in gone["banner"], gone
                # Failed loads are the browser's own log entries; the page itself threw and logged nothing.
                assert [error for error in page.errors if error.source != "network"] == [], page.errors
    assert "Traceback" not in process.output
