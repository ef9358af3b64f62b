"""Device-side figures: our proxy client's ``get`` round trips, and listen fan-out, against both proxies.

For each server (Debian's ``dhtnode --proxyserver`` and ours, each the proxy of node A in a 2-node DHT, as in
``proxy_bench.py``; ``--quick`` starts both stacks at once), in the same run:

* ``client get``: ``trio_dht.open_proxy_client(url).get(key)`` on a key holding one value, 8 concurrent
  callers for a fixed time: round trips per second and p50/p99 latency;
* ``listen fan-out``: 1 000 ``GET /key/{h}/listen`` streams open at once; one POST; the time from the POST
  until the last stream has received the value.

    python bench/client_bench.py [--seconds 10] [--streams 1000] [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy_bench import GET_KEY, machine, open_stacks

from trio_dht import InfoHash, open_proxy_client

HERE = Path(__file__).resolve().parent


async def client_gets(url: str, seconds: float, concurrency: int = 8) -> dict:
    latencies: list[float] = []
    errors = 0
    key = InfoHash.from_hex(GET_KEY)
    async with open_proxy_client(url) as dht:
        deadline = trio.current_time() + seconds

        async def caller() -> None:
            nonlocal errors
            while trio.current_time() < deadline:
                start = time.perf_counter()
                try:
                    values = await dht.get(key)
                except Exception:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)
                if not values:
                    errors += 1

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(caller)
        elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3 if latencies else 0.0

    return {"rps": len(latencies) / elapsed, "p50_ms": pct(0.5), "p99_ms": pct(0.99), "errors": errors}


async def fan_out(url: str, streams: int, setup: float = 1.0) -> dict:
    """Open ``streams`` listen streams on a fresh key, wait ``setup`` s, put one value, time until the last
    one has it."""
    key = os.urandom(20).hex()
    marker = os.urandom(6).hex()
    opened = 0
    received: list[float] = []
    all_open = trio.Event()
    limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=30), limits=limits) as client:

        async def listen() -> None:
            nonlocal opened
            async with client.stream("GET", f"{url}/key/{key}/listen") as response:
                opened += 1
                if opened == streams:
                    all_open.set()
                async for line in response.aiter_lines():
                    if _has_marker(line, marker):
                        received.append(time.perf_counter())
                        return

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for _ in range(streams):
                    nursery.start_soon(listen)
                await all_open.wait()
                await trio.sleep(setup)  # let the servers set up their DHT listens
                data = base64.b64encode(marker.encode()).decode()
                posted = time.perf_counter()
                r = await client.post(f"{url}/key/{key}", json={"data": data, "type": 0})
                r.raise_for_status()
                with trio.move_on_after(30):
                    while len(received) < streams:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
    last = max(received) - posted if received else float("nan")
    return {"streams": streams, "received": len(received), "last_ms": last * 1e3}


def _has_marker(line: str, marker: str) -> bool:
    try:
        value = json.loads(line)
    except ValueError:
        return False
    return base64.b64decode(value.get("data", "")).decode(errors="replace") == marker


def table(results: dict[str, dict]) -> str:
    d, o = results["dhtnode"], results["trio_dht"]
    return "\n".join(
        [
            "| workload | dhtnode | trio_dht | ratio (trio_dht / dhtnode) |",
            "|---|---|---|---|",
            f"| client get round trips/s (8 callers) | {d['get']['rps']:.0f} | {o['get']['rps']:.0f} "
            f"| {o['get']['rps'] / d['get']['rps']:.2f} |",
            f"| client get p50 / p99 ms | {d['get']['p50_ms']:.1f} / {d['get']['p99_ms']:.1f} "
            f"| {o['get']['p50_ms']:.1f} / {o['get']['p99_ms']:.1f} | |",
            f"| listen fan-out: last of {o['fanout']['streams']} streams, ms | {d['fanout']['last_ms']:.0f} "
            f"({d['fanout']['received']} got it) | {o['fanout']['last_ms']:.0f} "
            f"({o['fanout']['received']} got it) "
            f"| {d['fanout']['last_ms'] / o['fanout']['last_ms']:.2f} (time ratio dhtnode / ours) |",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument(
        "--quick", action="store_true", help="both stacks at once, 1 s of gets, 100 streams after 0.5 s"
    )
    ap.add_argument("--output", type=Path, default=HERE / "client_results.json")
    args = ap.parse_args()
    seconds, streams, setup = (1.0, 100, 0.5) if args.quick else (args.seconds, args.streams, 1.0)
    names = ["dhtnode", "trio_dht"]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # one stack at a time; --quick starts both at once
        for group in [names] if args.quick else [[name] for name in names]:
            with open_stacks(group, Path(tmp)) as stacks:
                for name in group:
                    results[name] = {
                        "get": trio.run(client_gets, stacks[name].url, seconds),
                        "fanout": trio.run(fan_out, stacks[name].url, streams, setup),
                    }
    text = table(results)
    print(text)
    args.output.write_text(json.dumps({"machine": machine(), "results": results, "table": text}, indent=1))


if __name__ == "__main__":
    main()
