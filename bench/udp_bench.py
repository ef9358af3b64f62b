"""UDP request throughput of one node: ours against Debian's ``dhtnode`` 2.4.12, in the same run.

For each server the same load client (``udp_load.py``, a separate process) keeps a window of ping, get or put
requests in flight from 16 loopback source addresses for a few seconds. We report replies per second, latency,
and the server's CPU time per request (read from /proc: it holds up better than req/s on a busy machine),
and write them as JSON (``--output``; ``bench/run.py`` puts them in ``bench/RESULTS.md``).

Both servers run twice: with their default rate limits (OpenDHT: 1024 requests/s per IP, 8192/s overall, so
replies per second are capped near 8 k for both), and with the limits off (``-U``), which shows what one
node sustains. Ours is started with ``TRIO_DHT_CMD`` (see ``common.py``), ``dhtnode`` as ``dhtnode -s``.
One server runs at a time; ``--quick`` (a smoke run) starts all four at once and loads them in turn,
0.5 s per workload.

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
from collections.abc import Callable
from pathlib import Path

from common import (
    HERE,
    answers_ping,
    cpu_seconds,
    free_port,
    machine,
    our_command,
    our_env,
    processes,
    spawn,
    start_all,
)

KINDS = ("dhtnode", "trio_dht", "dhtnode -U", "trio_dht -U")


def spawner(kind: str, workdir: Path) -> Callable[[], tuple[subprocess.Popen, int]]:
    """Starts one server of ``kind`` on a fresh port."""

    def start() -> tuple[subprocess.Popen, int]:
        port = free_port(socket.SOCK_DGRAM)
        unlimited = ["-U"] if kind.endswith("-U") else []
        if kind.startswith("dhtnode"):
            cmd = ["dhtnode", "-s", *unlimited, "-p", str(port)]
        else:
            cmd = [*our_command(), "-p", str(port), "--bind", "127.0.0.1", "--no-ipv6", "--no-proxy"]
            cmd += unlimited
        return spawn(cmd, workdir / f"{kind.replace(' ', '')}.log", our_env()), port

    return start


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


def measure(
    kinds: list[str], methods: list[str], seconds: float, settle: float, drain: float, workdir: Path
) -> dict[str, dict[str, dict]]:
    """Start ``kinds`` together; once they answer pings and ``settle`` s later, load each in turn with one
    method, then the next method. ``drain`` s after each run lets rate-limit windows drain (with several
    kinds, the other kinds' runs in between do that)."""
    results: dict[str, dict[str, dict]] = {kind: {} for kind in kinds}
    with processes() as procs:
        servers = start_all(procs, {kind: spawner(kind, workdir) for kind in kinds}, answers_ping)
        time.sleep(settle)
        for method in methods:
            for kind in kinds:
                proc, port = servers[kind]
                before = cpu_seconds(proc.pid)
                r = load(port, method, seconds)
                r["cpu_us_per_req"] = (cpu_seconds(proc.pid) - before) / max(1, r["replies"]) * 1e6
                results[kind][method] = r
                time.sleep(drain)
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
    ap.add_argument(
        "--quick", action="store_true", help="a smoke run: all servers at once, 0.5 s per workload"
    )
    ap.add_argument("--output", type=Path, default=HERE / "udp_results.json")
    args = ap.parse_args()
    if shutil.which("dhtnode") is None:
        sys.exit("dhtnode is not installed: apt-get install dhtnode")
    methods = ["ping", "get", "put"]
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            results = measure(list(KINDS), methods, 0.5, 0.0, 0.0, Path(tmp))
        else:  # one server at a time, 1.5 s after it answers, 1.2 s between workloads
            results = {}
            for kind in KINDS:
                results |= measure([kind], methods, args.seconds, 1.5, 1.2, Path(tmp))
    text = table(results, methods)
    print(text)
    args.output.write_text(json.dumps({"machine": machine(), "results": results, "table": text}, indent=1))


if __name__ == "__main__":
    main()
