"""UDP request throughput of one node: ours against Debian's ``dhtnode`` 2.4.12, in the same run.

For each server the same load client (``udp_load.py``, a separate process) keeps a window of ping, get or put
requests in flight from 16 loopback source addresses for a few seconds. We report replies per second, latency,
and the server's CPU time per request (read from /proc: it holds up better than req/s on a busy machine),
and write the table to ``bench/RESULTS.md``.

Both servers run with their default rate limits (OpenDHT: 1024 requests/s per IP, 8192/s overall), so replies
per second are capped near 8 k for both; the CPU column shows the capacity. Ours is also run with the limits
off (``unlimited``) to show what one core sustains.

    python bench/udp_bench.py [--seconds 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
OUR_NODE = """
import sys, trio
from trio_dht import open_node
from trio_dht.node.ratelimit import RateLimiter
limits = RateLimiter(-1, -1) if sys.argv[2] == "unlimited" else RateLimiter()
async def main():
    async with open_node(port=int(sys.argv[1]), host="127.0.0.1", host6=None, rate_limiter=limits):
        await trio.sleep_forever()
trio.run(main)
"""


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def start_server(kind: str, port: int) -> subprocess.Popen:
    if kind == "dhtnode":
        cmd = ["dhtnode", "-s", "-p", str(port)]
    else:
        mode = "unlimited" if kind.endswith("unlimited") else "default"
        cmd = [sys.executable, "-c", OUR_NODE, str(port), mode]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
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


def measure(kind: str, methods: list[str], seconds: float) -> dict[str, dict]:
    port = free_udp_port()
    proc = start_server(kind, port)
    results = {}
    try:
        for method in methods:
            before = cpu_seconds(proc.pid)
            r = load(port, method, seconds)
            r["cpu_us_per_req"] = (cpu_seconds(proc.pid) - before) / max(1, r["replies"]) * 1e6
            results[method] = r
            time.sleep(1.2)  # let rate-limit windows drain between workloads
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
    return results


def table(results: dict[str, dict[str, dict]], methods: list[str]) -> str:
    lines = [
        "| workload | dhtnode req/s | trio_dht req/s | ratio | dhtnode µs CPU/req | trio_dht µs CPU/req "
        "| trio_dht unlimited req/s | unlimited µs CPU/req | p50 ms (dhtnode / ours) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        d, o, u = results["dhtnode"][m], results["trio_dht"][m], results["trio_dht unlimited"][m]
        lines.append(
            f"| UDP {m} | {d['rps']:.0f} | {o['rps']:.0f} | {o['rps'] / d['rps']:.2f} "
            f"| {d['cpu_us_per_req']:.1f} | {o['cpu_us_per_req']:.1f} "
            f"| {u['rps']:.0f} | {u['cpu_us_per_req']:.1f} "
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
    results = {
        kind: measure(kind, methods, seconds) for kind in ("dhtnode", "trio_dht", "trio_dht unlimited")
    }
    text = table(results, methods)
    print(text)
    args.output.write_text(
        json.dumps(
            {"machine": platform.platform(), "cpus": os.cpu_count(), "results": results, "table": text},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
