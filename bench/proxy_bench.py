"""REST proxy throughput: our proxy against Debian's ``dhtnode --proxyserver`` 2.4.12, in the same run.

Each server is the proxy of node A in a 2-node DHT on loopback (A + a plain ``dhtnode -U`` node B); a fresh
stack is started for every scenario (``--quick``: one
stack per server, both started at once, for all scenarios). The same load client,
``wrk -t1 -c32`` with the Lua scripts in ``bench/wrk/``, drives both:

* ``get``:  GET /key/{h}, a key holding one value (each GET also asks node B over UDP, as OpenDHT's does);
* ``post``: POST a small value to a new random key per request (the reply waits for the DHT put);
* ``info``: GET /node/info.

Reported per scenario: requests/s, p50/p99 latency (wrk's ``--latency``), non-2xx replies, the CPU seconds
used by A, B and wrk, and ``others`` (machine busy CPU minus ours, from /proc/stat: other tenants' load that
makes a run noisy). The table is appended to ``bench/RESULTS.md``.

    python bench/proxy_bench.py [--seconds 15] [--quick] [--only get,post,info] [--servers dhtnode,trio_dht]
        [--no-write] [--label TEXT]

Our proxy is started with the CLI: ``python -m trio_dht -p 0 --bind 127.0.0.1 --no-ipv6 -b 127.0.0.1:B
--proxyserver PORT --proxy-addr 127.0.0.1``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    HERE,
    append_to_results,
    cpu_seconds,
    free_port,
    machine,
    machine_busy_seconds,
    our_command,
    our_env,
    processes,
    spawn,
    start_all,
    start_b_nodes,
    tree_cpu_seconds,
)

WRK_DIR = HERE / "wrk"
GET_KEY = "b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0"
SCENARIOS = {
    "get": ("GET /key/{h} (1 value)", f"/key/{GET_KEY}", "get.lua"),
    "post": ("POST /key/{random h}", "/", "post_distinct.lua"),
    "info": ("GET /node/info", "/node/info", "get.lua"),
}


def http(method: str, url: str, body: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class Stack:
    name: str
    url: str
    a: subprocess.Popen
    b: subprocess.Popen
    procs: list[subprocess.Popen] = field(default_factory=list)


def server_command(name: str, udp: int, http_port: int, b_port: int) -> list[str]:
    if name == "dhtnode":
        return ["dhtnode", "-s", "-U", "-p", str(udp), "-b", f"127.0.0.1:{b_port}",
                "--proxyserver", str(http_port), "--proxy-addr", "127.0.0.1"]  # fmt: skip
    return [*our_command(), "-p", str(udp), "--bind", "127.0.0.1", "--no-ipv6",
            "-b", f"127.0.0.1:{b_port}", "--proxyserver", str(http_port),
            "--proxy-addr", "127.0.0.1"]  # fmt: skip


@contextmanager
def open_stacks(names: list[str], workdir: Path) -> Iterator[dict[str, Stack]]:
    """For each name, node B (dhtnode -U), then node A with its proxy, bootstrapped to B; all Bs at once,
    then all As, each ready once its node info shows a good node and a put succeeds."""
    with processes() as procs:
        bs = start_b_nodes(procs, names, workdir)

        def spawner(name: str) -> Callable[[], tuple[subprocess.Popen, str]]:
            def start() -> tuple[subprocess.Popen, str]:
                http_port = free_port(socket.SOCK_STREAM)
                cmd = server_command(name, free_port(socket.SOCK_DGRAM), http_port, bs[name][1])
                return spawn(cmd, workdir / f"{name}-A.log", our_env()), f"http://127.0.0.1:{http_port}"

            return start

        servers = start_all(procs, {name: spawner(name) for name in names}, is_ready)
        yield {name: Stack(name, url, a, bs[name][0]) for name, (a, url) in servers.items()}


def is_ready(url: str) -> bool:
    """node info answers with a good node, then a put of the GET scenario's value succeeds."""
    try:
        status, body = http("GET", url + "/node/info", timeout=2)
        info = json.loads(body) if status == 200 else {}
        if info.get("ipv4", {}).get("good", 0) + info.get("ipv6", {}).get("good", 0) > 0:
            value = b'{"data":"aGVsbG8gd29ybGQ=","id":"4242","type":0}'
            status, _ = http("POST", f"{url}/key/{GET_KEY}", value, timeout=10)
            return status == 200
    except (OSError, ValueError):
        pass
    return False


def parse_duration_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if m is None:
        raise ValueError(text)
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[m.group(2)]


def run_wrk(url: str, path: str, script: str, seconds: float, conns: int) -> dict:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "--latency", "--timeout", "10s",
           "-s", str(WRK_DIR / script), url + path]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read().decode() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed: {out}")
    result: dict = {"command": " ".join(cmd), "wrk_cpu": usage.ru_utime + usage.ru_stime}
    result["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    result["requests"] = int(re.search(r"(\d+) requests in", out).group(1))
    for pct in ("50", "99"):
        result[f"p{pct}"] = parse_duration_ms(re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M).group(1))
    result["non2xx"] = int(re.search(r"non2xx=(\d+)", out).group(1))
    errors = re.search(r"Socket errors: (.*)", out)
    result["socket_errors"] = errors.group(1) if errors else ""
    return result


def measure(stack: Stack, scenario: str, seconds: float, conns: int, warm_up: bool = True) -> dict:
    _, path, script = SCENARIOS[scenario]
    if warm_up:
        time.sleep(1.0)
        run_wrk(stack.url, path, script, 1.0, conns)  # first connections, imports, caches
    a0, b0, m0 = tree_cpu_seconds(stack.a.pid), cpu_seconds(stack.b.pid), machine_busy_seconds()
    result = run_wrk(stack.url, path, script, seconds, conns)
    a1, b1, m1 = tree_cpu_seconds(stack.a.pid), cpu_seconds(stack.b.pid), machine_busy_seconds()
    result["a_cpu"], result["b_cpu"] = a1 - a0, b1 - b0
    result["others"] = max(0.0, (m1 - m0) - result["a_cpu"] - result["b_cpu"] - result["wrk_cpu"])
    result["us_per_req"] = 1e6 * result["a_cpu"] / max(1, result["requests"])
    print(
        f"{stack.name:8} {scenario:5} {result['rps']:9.0f} req/s  p50 {result['p50']:.2f} ms"
        f"  p99 {result['p99']:.2f} ms"
        f"  non2xx {result['non2xx']}  A {result['a_cpu']:.1f} s  B {result['b_cpu']:.1f} s"
        f"  wrk {result['wrk_cpu']:.1f} s  others {result['others']:.1f} s  {result['socket_errors']}",
        flush=True,
    )
    return result


def table(results: dict[str, dict[str, dict]], scenarios: list[str]) -> str:
    rows = [
        "| scenario (32 conns) | dhtnode req/s | trio_dht req/s | ratio | p50 ms dhtnode / ours "
        "| p99 ms dhtnode / ours | non-2xx dhtnode / ours | CPU s of A: dhtnode / ours | others CPU s |",
        "|---|---:|---:|---:|---|---|---|---|---|",
    ]
    for sc in scenarios:
        d, o = results["dhtnode"][sc], results["trio_dht"][sc]
        rows.append(
            f"| {SCENARIOS[sc][0]} | {d['rps']:,.0f} | {o['rps']:,.0f} | **{o['rps'] / d['rps']:.2f}** "
            f"| {d['p50']:.2f} / {o['p50']:.2f} | {d['p99']:.2f} / {o['p99']:.2f} "
            f"| {d['non2xx']} / {o['non2xx']} | {d['a_cpu']:.1f} / {o['a_cpu']:.1f} "
            f"| {d['others']:.1f} / {o['others']:.1f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument(
        "--quick", action="store_true", help="1 s per run on one stack per server, no warm-up, no RESULTS.md"
    )
    parser.add_argument("--only", default="get,post,info")
    parser.add_argument("--servers", default="dhtnode,trio_dht")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--label", default="", help="a note for the RESULTS.md section title")
    parser.add_argument("--output", type=Path, default=HERE / "proxy_results.json", help="results as JSON")
    args = parser.parse_args()
    if shutil.which("wrk") is None or shutil.which("dhtnode") is None:
        sys.exit("needs wrk and dhtnode: apt-get install -y wrk dhtnode")
    seconds = 1.0 if args.quick else args.seconds
    scenarios = args.only.split(",")
    servers = args.servers.split(",")
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / "proxy_bench"
    workdir.mkdir(exist_ok=True)
    results: dict[str, dict[str, dict]] = {s: {} for s in servers}
    if args.quick:  # one stack per server for every scenario, all started at once, no warm-up
        with open_stacks(servers, workdir) as stacks:
            for sc in scenarios:
                for name in servers:
                    results[name][sc] = measure(stacks[name], sc, seconds, args.conns, warm_up=False)
    else:
        for sc in scenarios:
            for name in servers:
                with open_stacks([name], workdir) as stacks:
                    results[name][sc] = measure(stacks[name], sc, seconds, args.conns)
    if set(servers) != {"dhtnode", "trio_dht"}:
        args.output.write_text(json.dumps({"results": results}, indent=1))
        return
    text = table(results, scenarios)
    print(text)
    args.output.write_text(json.dumps({"machine": machine(), "results": results, "table": text}, indent=1))
    if args.quick or args.no_write:
        return
    command = shlex.join(["python", "bench/proxy_bench.py", *sys.argv[1:]])
    wrk_cmd = results["dhtnode"][scenarios[0]]["command"].replace(
        results["dhtnode"][scenarios[0]]["command"].split()[-1], "URL"
    )
    section = (
        f"\n## REST proxy: trio_dht against dhtnode --proxyserver ({time.strftime('%Y-%m-%d %H:%M')}"
        f"{', ' + args.label if args.label else ''})\n\n"
        f"Machine: {machine()}. Both proxies run as node A of a 2-node loopback DHT whose node B is "
        f"`dhtnode -s -U`; a fresh stack per scenario; {seconds:g} s per run after a 1 s warm-up; "
        f"load client wrk (`{wrk_cmd}`). Our proxy: "
        "`python -m trio_dht -p PORT --bind 127.0.0.1 --no-ipv6 -b 127.0.0.1:BPORT --proxyserver HPORT "
        "--proxy-addr 127.0.0.1`.\n"
        f"Command: `{command.strip()}`.\n\n{text}\n\n"
        "`others` is busy CPU on the machine not used by A, B or wrk (other tenants); runs with a few "
        "CPU-s of it are noisier.\n"
    )
    append_to_results(section)


if __name__ == "__main__":
    main()
