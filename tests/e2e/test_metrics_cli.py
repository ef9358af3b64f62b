"""``GET /metrics`` of the ``trio-dht`` process: it parses with prometheus_client's own parser, and each
family moves when the test does the matching work (a put, a SUBSCRIBE, a push through the gorush double, a
refused request, a datagram), with and without an HTTP worker (whose requests are counted too). And
``GET /healthz`` while the push gateway fails every push, then recovers."""

from __future__ import annotations

import sys
from typing import Any

import httpx
import pytest
import trio
from cli_process import LOOPBACK_NODE, free_tcp_port, ping, trio_dht_process
from prometheus_client.parser import text_string_to_metric_families

from trio_dht.infohash import InfoHash
from trio_dht.testing.gorush import open_gorush_double

MODULE = (sys.executable, "-m", "trio_dht")


async def scrape(http: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``GET /metrics``: (name, sorted labels) -> value."""
    r = await http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(r.text)
        for sample in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict[Any, float], name: str, **labels: str) -> float:
    """The sum over the samples of ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


@pytest.mark.parametrize("workers", [0, 1])
async def test_every_family_moves_with_its_work(workers: int) -> None:
    key = InfoHash.get(f"metrics-{workers}")
    async with open_gorush_double() as gorush:
        port = free_tcp_port()
        command = [
            *MODULE, *LOOPBACK_NODE,
            "--proxyserver", str(port), "--proxy-addr", "127.0.0.1",
            "--pushserver", gorush.url.removeprefix("http://"),
            "--http-workers", str(workers),
            "--limit", "subscriptions_per_source=1",
        ]  # fmt: skip
        async with (
            trio_dht_process(command) as process,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as http,
        ):
            if workers:
                with trio.fail_after(10):
                    while value(await scrape(http), "trio_dht_http_workers_serving") != 1:
                        await trio.sleep(0.05)
            before = await scrape(http)
            assert value(before, "trio_dht_push_subscriptions", platform="android", dialect="current") == 0
            assert total(before, "python_info", implementation="CPython") == 1
            assert value(before, "process_resident_memory_bytes") > 0

            await ping(process.udp_port)  # a datagram in, its reply out
            body = {"key": "tok-1", "platform": "android", "client_id": "c", "session_id": "s"}
            assert (await http.request("SUBSCRIBE", f"/key/{key.hex()}", json=body)).status_code == 200
            other = {**body, "key": "tok-2"}  # a new subscription past subscriptions_per_source=1
            assert (await http.request("SUBSCRIBE", f"/key/{key.hex()}", json=other)).status_code == 429
            assert (await http.post(f"/key/{key.hex()}", content=b"not json")).status_code == 400
            await http.post(f"/key/{key.hex()}", json={"data": "aGVsbG8=", "id": "7"})  # 502 alone, stored
            with trio.fail_after(10):
                while not gorush.notifications:
                    await trio.sleep(0.05)
            with trio.fail_after(10):
                while not total(after := await scrape(http), "trio_dht_pushes_total", outcome="sent"):
                    await trio.sleep(0.05)

            assert value(after, "trio_dht_udp_datagrams_received_total") > value(
                before, "trio_dht_udp_datagrams_received_total"
            )
            assert value(after, "trio_dht_udp_requests_received_total", method="ping") >= 1
            assert (
                value(after, "trio_dht_udp_requests_sent_total", method="ping") >= 1
            )  # it confirms the pinger
            assert value(after, "trio_dht_udp_datagrams_sent_total") > 0
            assert value(after, "trio_dht_stored_values") >= 1 and value(after, "trio_dht_stored_bytes") > 0
            assert value(after, "trio_dht_listens", kind="local") >= 1  # the subscription's DHT listen
            assert value(after, "trio_dht_push_subscriptions", platform="android", dialect="current") == 1
            # The SUBSCRIBEs went through the worker (relayed) when there is one: counted all the same.
            assert value(after, "trio_dht_http_requests_total", route="subscribe", status="200") == 1
            assert value(after, "trio_dht_http_requests_total", route="subscribe", status="429") == 1
            assert value(after, "trio_dht_http_requests_total", route="put", status="400") == 1
            assert (
                value(after, "trio_dht_http_requests_total", route="metrics", status="200") >= 1
            )  # the earlier scrapes
            assert value(after, "trio_dht_http_request_duration_seconds_count", route="subscribe") == 2
            assert value(after, "trio_dht_http_request_duration_seconds_bucket", route="put", le="+Inf") == 2
            assert value(after, "trio_dht_limit_hits_total", limit="subscriptions_per_source") == 1
            assert total(after, "trio_dht_pushes_total", outcome="sent") >= 1
            assert value(after, "trio_dht_push_latency_seconds_count") >= 1
            assert value(after, "trio_dht_push_latency_seconds_sum") < 10
            assert ("trio_dht_queue_depth", (("queue", "push"),)) in after
            if workers:
                assert value(after, "trio_dht_http_worker_restarts_total") == 0

            r = await http.get("/key/metrics")  # the key named "metrics" is still reachable
            assert r.status_code == 200 and r.headers["content-type"] == "application/json"
            r = await http.get("/status")  # the status page, no longer the key's legacy route
            assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"


async def test_healthz_reports_a_gateway_that_fails_every_push_until_one_goes_through() -> None:
    key = InfoHash.get("failing gateway")
    async with open_gorush_double() as gorush:
        port = free_tcp_port()
        command = [
            *MODULE, *LOOPBACK_NODE,
            "--proxyserver", str(port), "--proxy-addr", "127.0.0.1",
            "--pushserver", gorush.url.removeprefix("http://"),
            "--health-isolated-after", "1h",  # a lone node: not a reason within this test
            "--health-gateway-after", "1",
        ]  # fmt: skip
        async with (
            trio_dht_process(command),
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as http,
        ):
            assert (await http.get("/healthz")).status_code == 200
            gorush.script(503, b'{"error": "down"}', times=1000)  # every push fails (retried with backoff)
            body = {"key": "tok", "platform": "android", "client_id": "c", "session_id": "s"}
            assert (await http.request("SUBSCRIBE", f"/key/{key.hex()}", json=body)).status_code == 200
            await http.post(f"/key/{key.hex()}", json={"data": "aGVsbG8=", "id": "8"})
            with trio.fail_after(30):
                while (r := await http.get("/healthz")).status_code != 503:
                    await trio.sleep(0.1)
            [reason] = r.json()["reasons"]
            assert reason.startswith("push gateway ") and "has failed every push" in reason
            assert r.json()["failingGateways"]
            gorush._script.clear()  # the gateway is back: the next retry goes through
            with trio.fail_after(30):
                while (r := await http.get("/healthz")).status_code != 200:
                    await trio.sleep(0.1)
            assert gorush.notifications and "failingGateways" not in r.json()
