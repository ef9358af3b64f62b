"""UDP request throughput of one node: ours against Debian's ``dhtnode`` 2.4.12, in the same run.

For each server the same load client (``udp_load.py``, a separate process) keeps a window of ping, get or put
requests in flight from 16 loopback source addresses for a few seconds. We report replies per second, latency,
and the server's CPU time per request (read from /proc: it holds up better than req/s on a busy machine),
and write them as JSON (``--output``; ``bench/run.py`` puts them in ``bench/RESULTS.md``).

Both servers run twice: with their default rate limits (OpenDHT: 1024 requests/s per IP, 8192/s overall, so
replies per second are capped near 8 k for both), and with the limits off (``-U``), which shows what one
node sustains. Ours is started with ``TRIO_DHT_CMD`` (see ``common.py``), ``dhtnode`` as ``dhtnode -s``.

    python bench/udp_bench.py [--seconds 5] [--quick] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import HERE, cpu_seconds, free_port, machine, our_command, our_env, spawn, stop

KINDS = ("dhtnode", "trio_dht", "dhtnode -U", "trio_dht -U")


def start_server(kind: str, port: int, workdir: Path) -> subprocess.Popen:
    unlimited = ["-U"] if kind.endswith("-U") else []
    if kind.startswith("dhtnode"):
        cmd = ["dhtnode", "-s", *unlimited, "-p", str(port)]
    else:
        cmd = [*our_command(), "-p", str(port), "--bind", "127.0.0.1", "--no-ipv6", "--no-proxy", *unlimited]
    proc = spawn(cmd, workdir / f"{kind.replace(' ', '')}.log", our_env())
    time.sleep(1.5)
    return proc


def load(port: int, method: str, seconds: float) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            str(HERE / "udp_load.py"),
            str(port),
            "--method",
            method,
            "--seconds",
            str(seconds),
            "--sources",
            "16",
            "--window",
            "64",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    )
    return json.loads(out.stdout)


def measure(kind: str, methods: list[str], seconds: float, workdir: Path) -> dict[str, dict]:
    port = free_port(socket.SOCK_DGRAM)
    proc = start_server(kind, port, workdir)
    results = {}
    try:
        for method in methods:
            before = cpu_seconds(proc.pid)
            r = load(port, method, seconds)
            r["cpu_us_per_req"] = (cpu_seconds(proc.pid) - before) / max(1, r["replies"]) * 1e6
            results[method] = r
            time.sleep(1.2)  # let rate-limit windows drain between workloads
    finally:
        stop(proc)
    return results


def table(results: dict[str, dict[str, dict]], methods: list[str]) -> str:
    lines = [
        "| workload | limits | dhtnode req/s | trio_dht req/s | ratio | dhtnode µs CPU/req "
        "| trio_dht µs CPU/req | p50 ms dhtnode / ours |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for limits, suffix in (("default", ""), ("off (-U)", " -U")):
        for m in methods:
            d, o = results["dhtnode" + suffix][m], results["trio_dht" + suffix][m]
            lines.append(
                f"| UDP {m} | {limits} | {d['rps']:.0f} | {o['rps']:.0f} | {o['rps'] / d['rps']:.2f} "
                f"| {d['cpu_us_per_req']:.1f} | {o['cpu_us_per_req']:.1f} "
                f"| {d['p50_ms']:.2f} / {o['p50_ms']:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--quick", action="store_true", help="1 s per workload (a smoke run)")
    ap.add_argument("--output", type=Path, default=HERE / "udp_results.json")
    args = ap.parse_args()
    if shutil.which("dhtnode") is None:
        sys.exit("dhtnode is not installed: apt-get install dhtnode")
    seconds = 1.0 if args.quick else args.seconds
    methods = ["ping", "get", "put"]
    with tempfile.TemporaryDirectory() as tmp:
        results = {kind: measure(kind, methods, seconds, Path(tmp)) for kind in KINDS}
    text = table(results, methods)
    print(text)
    args.output.write_text(json.dumps({"machine": machine(), "results": results, "table": text}, indent=1))


if __name__ == "__main__":
    main()
