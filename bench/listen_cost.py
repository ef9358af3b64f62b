"""What holding subscriptions costs: the CPU of a proxy's node keeping N subscribed keys' DHT listens alive.

A listen on the DHT lives 30 s on the storing node unless renewed: the listening node sends ``listen`` again
every 20 s per key and storing node (wire spec 2.7), whether or not values change. So a proxy's CPU at rest
grows with the keys it is subscribed to. For each server (ours and Debian's ``dhtnode --proxyserver``, each
the proxy of node A in a 2-node loopback DHT with a plain ``dhtnode`` B, as in ``push_bench.py``): subscribe
``--keys`` distinct keys, wait ``--settle`` s for the listens to be set up, then measure the CPU of A and B
and the UDP datagrams sent on the machine over ``--seconds`` s of rest.

    python bench/listen_cost.py [--keys 20000] [--settle 30] [--seconds 40] [--output FILE]

Not part of ``bench/run.py`` (it rests for over a minute per server).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine
from push_bench import CpuMeter, drive, open_stacks, random_keys, subscribe_requests

HERE = Path(__file__).resolve().parent
REFRESH_PERIOD = 20.0
"""Seconds between two ``listen`` requests of one key to one node (both implementations)."""


def udp_datagrams_sent() -> int:
    """Datagrams sent by every process of the machine (``/proc/net/snmp``)."""
    lines = Path("/proc/net/snmp").read_text().splitlines()
    head, values = [line.split() for line in lines if line.startswith("Udp:")]
    return int(values[head.index("OutDatagrams")])


def measure(name: str, keys: int, settle: float, seconds: float, workdir: Path) -> dict:
    with open_stacks([name], workdir) as stacks:
        stack = stacks[name]
        run = drive(stack.port, subscribe_requests(random_keys(keys)))
        time.sleep(settle)
        sent = udp_datagrams_sent()
        with CpuMeter(stack) as cpu:
            time.sleep(seconds)
        datagrams = udp_datagrams_sent() - sent
    refreshes = keys * seconds / REFRESH_PERIOD
    return {
        "subscribed": run["statuses"].get(200, 0),
        "a_cpu_share": cpu.result["a_cpu"] / seconds,
        "b_cpu_share": cpu.result["b_cpu"] / seconds,
        "us_per_refresh": cpu.result["a_cpu"] / refreshes * 1e6,
        "datagrams_per_key_per_period": datagrams / keys * REFRESH_PERIOD / seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=20_000)
    ap.add_argument("--settle", type=float, default=30.0)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--output", type=Path, default=HERE / "listen_cost.json")
    args = ap.parse_args()
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / "listen_cost"
    workdir.mkdir(exist_ok=True)
    results = {}
    for name in ("dhtnode", "trio_dht"):
        print(f"{name}: {args.keys:,} keys, {args.settle:g} + {args.seconds:g} s", flush=True)
        results[name] = measure(name, args.keys, args.settle, args.seconds, workdir)
    d, o = results["dhtnode"], results["trio_dht"]
    rows = [
        "| at rest with N subscribed keys | dhtnode | trio_dht | ratio (dhtnode / ours) |",
        "|---|---:|---:|---:|",
        f"| subscriptions acknowledged | {d['subscribed']:,} | {o['subscribed']:,} | |",
        f"| CPU of A, share of a core | {d['a_cpu_share']:.1%} | {o['a_cpu_share']:.1%} "
        f"| **{d['a_cpu_share'] / o['a_cpu_share']:.2f}** |",
        f"| CPU of A per listen refresh, µs | {d['us_per_refresh']:.1f} | {o['us_per_refresh']:.1f} | |",
        f"| CPU of B (the storing dhtnode), share of a core | {d['b_cpu_share']:.1%} "
        f"| {o['b_cpu_share']:.1%} | |",
        f"| UDP datagrams per key per {REFRESH_PERIOD:g} s | {d['datagrams_per_key_per_period']:.2f} "
        f"| {o['datagrams_per_key_per_period']:.2f} | |",
    ]
    text = "\n".join(rows)
    print(text)
    command = "python bench/listen_cost.py " + " ".join(sys.argv[1:])
    report = {"machine": machine(), "command": command.strip(), "results": results, "table": text}
    args.output.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
