"""Direct push providers: our program pushing to the FCM and the APNs doubles, against its gorush path.

One run, our program only (``dhtnode`` pushes through gorush alone). Each provider gets its own stack, as in
``push_bench.py``: our node A with its proxy, node B (``dhtnode -s -U``), and the provider's double in its own
process, so that the double is not what limits A:

* ``gorush``: ``--pushserver`` to push_bench's gorush double (``--gorush-sink``, HTTP/1.1 keep-alive);
* ``fcm``: ``--config`` with ``[apps.fcm-N]`` (kind ``fcm``) to :class:`trio_dht.testing.fcm.FcmDouble`
  (HTTP/2 h2c, OAuth2 token endpoint, strict message checks);
* ``apns``: ``--config`` with ``[apps.apns-N]`` (kind ``apns``) to :class:`trio_dht.testing.apns.ApnsDouble`
  (HTTP/2 over TLS, an ES256 provider token verified per request).

Each double process also serves ``GET /bench/stats`` and ``POST /bench/reset`` on a second HTTP/1.1 port,
with the gorush sink's fields, so push_bench's ``Stack``, ``CpuMeter`` and ``scenario_dhtflood`` drive all
three. The doubles send no GOAWAY after a number of requests on a connection (``--double-max-requests N``:
after N). Measures, per provider:

* ``connection``: memory per open provider connection. Each FCM/APNs stack has ``--apps`` apps (4), one topic
  each, so one HTTP/2 connection each for the pushes (FCM also asks its token endpoint once, on a connection
  closed after), to the same double. VmRSS of A (with its HTTP worker) is read after
  ``--settle`` s before the first push, after one push through the first app (its connection open, its
  token got, the modules it needs loaded), and after one push through each other app: the figure per
  connection is the growth over the other apps' pushes / their count; the first push's growth is reported
  beside it. Gorush has one app: its first push's growth only.
* ``dhtflood``: push_bench's DHT-put throughput workload: 10,000 subscribed keys (Android subscriptions for
  FCM and gorush, iOS for APNs; ``--quick``: 1,000), then one value each arriving over the DHT (UDP ``put``
  requests to A from 4 loopback peers, 64 in flight); pushes/s = pushes the double received / (its last
  push - first put), with the CPU seconds of A, B, the double, the load client and everything else.

    python bench/provider_bench.py [--providers gorush,fcm,apns] [--keys 10000] [--apps 4] [--settle 5]
        [--double-max-requests N] [--profile] [--quick] [--no-write] [--output FILE]

``--profile`` samples A's and the double's Python stacks with ``py-spy`` (if on PATH) during each flood and
reports where A's samples were: the HTTP/2 libraries, Trio, TLS, trio_dht, the rest.

Our program runs as in ``push_bench.py`` (``python -m trio_dht``, or ``TRIO_DHT_CMD``) with its HTTP worker
process; FCM and APNs stacks add ``--config FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

from common import (
    HERE,
    append_to_results,
    free_port,
    machine,
    our_command,
    our_env,
    processes,
    spawn,
    start_all,
    start_b_nodes,
)
from proxy_bench import http
from push_bench import VALUE, Stack, is_ready, open_stacks, random_keys, scenario_dhtflood, subscribe_requests

PROVIDERS = ("gorush", "fcm", "apns")
PLATFORM = {"gorush": "android", "fcm": "android", "apns": "ios"}
TOPIC = {"fcm": "org.example.bench{}", "apns": "com.example.bench{}"}


# -- a provider double, in its own process -------------------------------------------------------------------


class Arrivals(list):
    """Stands in for a double's list of accepted pushes (or of requests): counts them, records when each
    key's first push and the last push arrived, keeps nothing else."""

    def __init__(self, key_of: Callable[[Any], str] | None = None) -> None:
        super().__init__()
        self.key_of = key_of
        self.reset()

    def reset(self) -> None:
        self.state: dict[str, Any] = {"notifications": 0, "first": {}, "last": 0.0}

    def append(self, item: Any) -> None:
        now = time.monotonic()
        self.state["notifications"] += 1
        self.state["last"] = now
        if self.key_of is not None:
            self.state["first"].setdefault(self.key_of(item), now)


def run_double(kind: str, apps: int, directory: Path, max_requests: int) -> None:
    """Serve an FCM or APNs double on loopback, with its credentials for ``apps`` apps written to
    ``directory``; prints one JSON line (its URL, CA file, stats port, credentials) once serving.
    ``max_requests``: requests per connection before the double sends GOAWAY, 0 for no limit."""
    import trio

    from trio_dht.testing import generate_test_key, open_apns_double, open_fcm_double
    from trio_dht.testing.gorush import RecordedRequest, Reply, open_loopback_server

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            if kind == "fcm":
                double = await nursery_context(nursery, open_fcm_double(max_requests=max_requests))
                accounts = []
                for i in range(apps):
                    path = directory / f"fcm-{i}.json"
                    path.write_text(json.dumps(double.service_account()))
                    accounts.append(str(path))
                pushes = double.messages = Arrivals(lambda message: message["data"]["key"])
                info: dict[str, Any] = {"url": double.url, "service_accounts": accounts}
            else:
                key = generate_test_key()
                bundles = [TOPIC["apns"].format(i) for i in range(apps)]
                double = await nursery_context(
                    nursery, open_apns_double(keys=[key], bundle_ids=bundles, max_requests=max_requests)
                )
                pushes = double.notifications = Arrivals(lambda note: note.payload["key"])
                info = {"url": double.url, "ca_file": double.ca_file, "key_file": str(key.write(directory))}
                info |= {"key_id": key.key_id, "team_id": key.team_id}
            requests = double.requests = Arrivals()

            async def stats(request: RecordedRequest) -> Reply:
                if request.path == "/bench/reset":
                    pushes.reset()
                    requests.reset()
                    return Reply(200, b"{}")
                state = {**pushes.state, "requests": requests.state["notifications"]}
                state["connections"] = len(double.connections)
                return Reply(200, json.dumps(state).encode(), {"content-type": "application/json"})

            url = await nursery_context(nursery, open_loopback_server(stats))
            print(json.dumps({**info, "stats_port": int(url.rsplit(":", 1)[1])}), flush=True)

    async def nursery_context(nursery: trio.Nursery, context: Any) -> Any:
        """Enter ``context`` in a task of ``nursery`` that holds it open until the process ends."""

        async def hold(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            async with context as value:
                task_status.started(value)
                await trio.sleep_forever()

        return await nursery.start(hold)

    trio.run(main)


# -- stacks --------------------------------------------------------------------------------------------------


def config_text(kind: str, double: dict, apps: int) -> str:
    """The ``--config`` file: ``apps`` apps of ``kind``, app N serving topic N, all to the one double."""
    lines = []
    for i in range(apps):
        lines += [f"[apps.{kind}-{i}]", f'kind = "{kind}"', f'url = "{double["url"]}"']
        lines.append(f'topics = ["{TOPIC[kind].format(i)}"]')
        if kind == "fcm":
            lines.append(f'service_account = "{double["service_accounts"][i]}"')
        else:
            lines += [f'key_file = "{double["key_file"]}"', f'key_id = "{double["key_id"]}"']
            lines += [f'team_id = "{double["team_id"]}"', f'ca_file = "{double["ca_file"]}"']
    return "\n".join(lines) + "\n"


@contextmanager
def open_provider_stack(
    kind: str, apps: int, workdir: Path, settle: float = 1.0, max_requests: int = 0
) -> Iterator[Stack]:
    """The double of ``kind`` (``fcm``, ``apns``; ``max_requests``: see :func:`run_double`), node B, then
    node A with ``--config`` naming the double's ``apps`` apps; ready once a put succeeds, then left
    ``settle`` s."""
    env = our_env()
    directory = workdir / kind
    directory.mkdir(exist_ok=True)
    with processes() as procs:
        sink = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--double",
                kind,
                "--apps",
                str(apps),
                "--dir",
                str(directory),
                "--double-max-requests",
                str(max_requests),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=(workdir / f"{kind}-double.log").open("wb"),
        )
        procs.append(sink)
        b, b_port = start_b_nodes(procs, [kind], workdir)[kind]
        assert sink.stdout is not None
        line = sink.stdout.readline()
        if not line:
            raise RuntimeError(f"the {kind} double did not start: see {workdir / f'{kind}-double.log'}")
        double = json.loads(line)
        config = directory / "trio-dht.toml"
        config.write_text(config_text(kind, double, apps))

        def start() -> tuple[subprocess.Popen, tuple[int, int]]:
            port, udp = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
            cmd = [*our_command(), "--bind", "127.0.0.1", "--no-ipv6", "-U", "-p", str(udp)]
            cmd += ["-b", f"127.0.0.1:{b_port}", "--proxyserver", str(port), "--proxy-addr", "127.0.0.1"]
            cmd += ["--config", str(config)]
            return spawn(cmd, workdir / f"{kind}-A.log", env), (port, udp)

        servers = start_all(procs, {kind: start}, lambda ports: is_ready(ports[0]))
        a, (port, udp) = servers[kind]
        stack = Stack(kind, port, a, b, sink, double["stats_port"], udp)
        time.sleep(settle)
        stack.sink_reset()
        yield stack


@contextmanager
def open_stack(
    kind: str, apps: int, workdir: Path, settle: float = 1.0, max_requests: int = 0
) -> Iterator[Stack]:
    if kind == "gorush":
        with open_stacks(["trio_dht"], workdir, settle) as stacks:
            stack = stacks["trio_dht"]
            stack.name = "gorush"
            yield stack
    else:
        with open_provider_stack(kind, apps, workdir, settle, max_requests) as stack:
            yield stack


# -- scenarios -----------------------------------------------------------------------------------------------


def subscriptions(kind: str, app: int = 0) -> Callable[[list[str]], Iterable[bytes]]:
    """SUBSCRIBE requests for ``kind``'s platform, routed to its app number ``app``."""
    topic = TOPIC[kind].format(app) if kind in TOPIC else ""
    return partial(subscribe_requests, platform=PLATFORM[kind], topic=topic)


def wait_for_pushes(stack: Stack, count: int, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while (stats := stack.sink_stats())["notifications"] < count and time.monotonic() < deadline:
        time.sleep(0.05)
    if stats["notifications"] < count:
        raise RuntimeError(f"{stack.name}: {stats['notifications']} of {count} pushes arrived")
    return stats


def scenario_connection(stack: Stack, apps: int, settle: float) -> dict:
    """VmRSS of A before the first push, after one push through app 0, after one through each other app."""
    kind = stack.name
    apps = apps if kind in TOPIC else 1
    keys = random_keys(apps)
    for app, key in enumerate(keys):
        requests = list(subscriptions(kind, app)([key], first_token=10**9 + app))
        http_request(stack, requests[0])
    time.sleep(settle)
    stack.sink_reset()
    before = stack.rss_kb()
    put(stack, keys[0])
    wait_for_pushes(stack, 1)
    time.sleep(settle)
    first = stack.rss_kb()
    for key in keys[1:]:
        put(stack, key)
    stats = wait_for_pushes(stack, apps)
    time.sleep(settle)
    after = stack.rss_kb()
    result = {
        "apps": apps,
        "rss_before_mb": before / 1024,
        "rss_first_mb": first / 1024,
        "rss_after_mb": after / 1024,
        "first_push_kb": first - before,
        "connections": stats.get("connections"),
    }
    if apps > 1:
        result["kb_per_connection"] = (after - first) / (apps - 1)
    print(f"  {kind}: {json.dumps(result)}", flush=True)
    stack.sink_reset()
    return result


def http_request(stack: Stack, raw: bytes) -> None:
    """Send one raw HTTP/1.1 request to A's proxy and check its 200."""
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(raw)
        reply = sock.recv(65536)
    if not reply.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"{stack.name}: {reply[:200]!r}")


def put(stack: Stack, key: str) -> None:
    status, body = http("POST", f"{stack.url}/key/{key}", VALUE, timeout=10)
    if status != 200:
        raise RuntimeError(f"{stack.name}: put answered {status} {body[:200]!r}")


@contextmanager
def py_spy(pid: int, output: Path, rate: int = 200) -> Iterator[None]:
    """Sample ``pid``'s Python stacks with ``py-spy record`` (collapsed stacks to ``output``) for the
    block."""
    command = ["py-spy", "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
    spy = subprocess.Popen(
        [*command, "--nonblocking", "--output", str(output)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # attached
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(30)


LIBRARIES = {
    "HTTP/2 client (httpx, httpcore, h2, hpack, hyperframe)": (
        "httpx",
        "httpcore",
        "h2",
        "hpack",
        "hyperframe",
    ),
    "Trio": ("trio",),
    "TLS (ssl)": (),
    "trio_dht": ("trio_dht",),
}


@contextmanager
def py_spies(targets: list[tuple[int, Path]]) -> Iterator[None]:
    """:func:`py_spy` on each (pid, output) for the block."""
    with ExitStack() as stack:
        for pid, output in targets:
            stack.enter_context(py_spy(pid, output))
        yield


def where_time_goes(collapsed: Path, top: int = 20) -> dict[str, list[tuple[str, float]]]:
    """From a ``py-spy --format raw`` file: ``functions``, those the most samples were in (themselves or
    their callees; Trio's scheduler and the entry frames left out), and ``libraries``, the share of samples
    whose innermost frame is in each of :data:`LIBRARIES` (the rest: ``other``)."""
    inclusive: dict[str, int] = {}
    libraries = dict.fromkeys([*LIBRARIES, "other"], 0)
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, text = line.rpartition(" ")
        count = int(text)
        total += count
        frames = [frame.partition(" (") for frame in stack.split(";")]
        paths = [where.split(":")[0] for _, _, where in frames]
        names = {
            f"{name} ({'/'.join(path.split('/')[-2:])})"
            for (name, _, _), path in zip(frames, paths, strict=True)
        }
        for name in names:
            inclusive[name] = inclusive.get(name, 0) + count
        leaf = paths[-1].split("site-packages/")[-1]
        library = next((k for k, tops in LIBRARIES.items() if leaf.split("/")[0] in tops), None)
        if paths[-1].endswith(("/ssl.py", "/_ssl.py")):  # the stdlib's and Trio's SSL layers
            library = "TLS (ssl)"
        libraries[library or "other"] += count
    if not total:
        return {"functions": [], "libraries": []}
    skip = ("_core/", "runpy", "__main__", "<module>", "main (", "run_double (")
    ranked = sorted(inclusive.items(), key=lambda item: -item[1])
    functions = [(name, n / total) for name, n in ranked if not any(s in name for s in skip)][:top]
    return {"functions": functions, "libraries": [(k, n / total) for k, n in libraries.items()]}


# -- report --------------------------------------------------------------------------------------------------


def report(results: dict[str, dict]) -> str:
    names = [p for p in PROVIDERS if p in results]
    base = results.get("gorush", {}).get("dhtflood", {}).get("push_rate")
    rows = [
        "| measure | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]

    def row(label: str, cell: Callable[[dict], str]) -> None:
        rows.append(f"| {label} | " + " | ".join(cell(results[n]) for n in names) + " |")

    row(
        "**pushes/s**, one value over the DHT per subscribed key",
        lambda r: f"{r['dhtflood']['push_rate']:,.0f}",
    )
    if base:
        row("pushes/s / gorush path's", lambda r: f"**{r['dhtflood']['push_rate'] / base:.2f}**")
    row("subscribed keys (platform)", lambda r: f"{r['keys']:,} ({r['platform']})")
    row(
        "pushes received / distinct keys / provider requests",
        lambda r: (
            f"{r['dhtflood']['pushes']} / {r['dhtflood']['distinct_keys']} / "
            f"{r['dhtflood']['gorush_requests']}"
        ),
    )
    row("UDP puts answered/s in that run", lambda r: f"{r['dhtflood']['put_rate']:,.0f}")
    row(
        "CPU s in that run: A / B / double / client / others",
        lambda r: " / ".join(
            f"{r['dhtflood'][k]:.1f}" for k in ("a_cpu", "b_cpu", "sink_cpu", "client_cpu", "others")
        ),
    )
    row(
        "double's CPU s per 1,000 pushes",
        lambda r: f"{1000 * r['dhtflood']['sink_cpu'] / max(1, r['dhtflood']['pushes']):.2f}",
    )
    row(
        "A's CPU s per 1,000 pushes",
        lambda r: f"{1000 * r['dhtflood']['a_cpu'] / max(1, r['dhtflood']['pushes']):.2f}",
    )
    row(
        "memory per open provider connection, KB (VmRSS growth / extra connections)",
        lambda r: (
            f"{r['connection']['kb_per_connection']:,.0f}" if "kb_per_connection" in r["connection"] else "-"
        ),
    )
    if all("profile" in results[n]["dhtflood"] for n in names):
        for library in [*LIBRARIES, "other"]:
            row(
                f"A's samples (py-spy) in {library}",
                lambda r, library=library: f"{dict(r['dhtflood']['profile']['libraries'])[library]:.0%}",
            )
    row("VmRSS growth over the first push, KB", lambda r: f"{r['connection']['first_push_kb']:,.0f}")
    row(
        "VmRSS before the first push / after, MB",
        lambda r: f"{r['connection']['rss_before_mb']:.1f} / {r['connection']['rss_after_mb']:.1f}",
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--keys", type=int, default=10_000, help="subscribed keys of the flood")
    parser.add_argument("--apps", type=int, default=4, help="FCM/APNs apps, one connection each")
    parser.add_argument("--settle", type=float, default=5.0, help="wait before reading VmRSS or flooding")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 k keys, 2 apps, 0.5 s settles")
    parser.add_argument("--no-write", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--output", type=Path, default=HERE / "provider_results.json", help="results as JSON")
    parser.add_argument(
        "--double-max-requests",
        type=int,
        default=0,
        help="requests per HTTP/2 connection before the FCM/APNs double sends GOAWAY (default 0: no limit)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample A's and the double's stacks with py-spy during each flood",
    )
    parser.add_argument("--double", choices=("fcm", "apns"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.double:
        run_double(args.double, args.apps, args.dir, args.double_max_requests)
        return
    if args.quick:
        args.keys, args.apps, args.settle = min(args.keys, 1_000), min(args.apps, 2), 0.5
    providers = args.providers.split(",")
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / "provider_bench"
    workdir.mkdir(exist_ok=True)
    results: dict[str, dict] = {}
    for kind in providers:
        print(f"{kind}: connection memory, then {args.keys:,} pushes", flush=True)
        with open_stack(kind, args.apps, workdir, args.settle, args.double_max_requests) as stack:
            connection = scenario_connection(stack, args.apps, args.settle)
            spies = {"profile": (stack.a.pid, workdir / f"{kind}-A.py-spy.txt")}
            spies["double_profile"] = (stack.sink.pid, workdir / f"{kind}-double.py-spy.txt")
            profile = args.profile and shutil.which("py-spy")
            during = partial(py_spies, list(spies.values())) if profile else nullcontext
            flood = scenario_dhtflood(
                stack, args.keys, args.settle, subscribe=subscriptions(kind), during=during
            )
            print(f"  {json.dumps(flood)[:600]}", flush=True)
        if profile:
            for what, (_, path) in spies.items():
                flood[what] = where_time_goes(path)
                print(f"  {what}:")
                for name, share in flood[what]["libraries"] + flood[what]["functions"]:
                    print(f"  {share:6.1%} {name}")
        results[kind] = {
            "keys": args.keys,
            "platform": PLATFORM[kind],
            "connection": connection,
            "dhtflood": flood,
        }
    text = report(results)
    print(text)
    args.output.write_text(json.dumps({"machine": machine(), "results": results, "table": text}, indent=1))
    if args.quick or args.no_write:
        return
    command = "python bench/provider_bench.py " + " ".join(sys.argv[1:])
    section = (
        f"\n## Direct push providers: FCM and APNs against the gorush path, ours only "
        f"({time.strftime('%Y-%m-%d %H:%M')})\n\n"
        f"Machine: {machine()}. Each provider: our node A (`python -m trio_dht -U --proxyserver PORT`, with "
        "`--pushserver` to the gorush double or `--config` naming the FCM/APNs double) in a 2-node loopback "
        "DHT with `dhtnode -s -U`; each double in its own process.\n"
        f"Command: `{command.strip()}`.\n\n{text}\n"
    )
    append_to_results(section)


if __name__ == "__main__":
    main()
