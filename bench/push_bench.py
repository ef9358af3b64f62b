"""Push notifications: our proxy against Debian's ``dhtnode --proxyserver --pushserver`` 2.4.12, side by side.

Each server is the proxy of node A in a 2-node loopback DHT (A + a plain ``dhtnode -s -U`` node B), with a
fresh stack per scenario (``--quick``: one stack per server,
both started at once, for all scenarios: memory first, rate last). Both push to the same gorush double
(:class:`trio_dht.testing.gorush.GorushDouble`, strict decoding, sync replies), run in its own process
behind a lean keep-alive HTTP/1.1 loop (``--gorush-sink``) so that it is not what limits dhtnode's one
request per push. Scenarios:

* ``rate``: SUBSCRIBE a new random token to a new random key per request, ``wrk -t1 -c32``
  (``bench/wrk/subscribe_distinct.lua``), requests/s and latency.
* ``memory``: VmRSS of A before and after N distinct subscriptions (token and key; 32 connections of a
  Python client), after ``--settle`` seconds at each milestone: 10 k and 50 k (``--million``: ours also at
  1 M, reported separately); memory per subscription = RSS growth / N.
* ``latency``: 1,000 subscribed keys, one POST each, sequential, 10 ms apart: put sent -> gorush double got
  the push (same host, CLOCK_MONOTONIC), p50/p99/max. (With 200 puts, p99 was the second-worst sample, and
  the ratio of two servers at parity moved between 0.67 and 1.15 from run to run.)
* ``flood``: 10 k subscribed keys, one POST each over 32 connections: pushes/s = pushes received / (last
  push - first put), with the put rate and CPU of everyone.
* ``dhtflood``: the same, but each value arrives over the DHT (UDP ``put`` requests to A from 4 loopback
  peers, 64 in flight), as values from other devices reach a proxy: the push pipeline without the POST path.

The scenarios whose figures a noisy machine moves most (``rate``, ``latency``, ``dhtflood``) run ``--repeat``
times (3; ``--quick``: once), each time on fresh stacks, the servers' order alternating; the run with the
median figure (requests/s, p99, pushes/s) is reported, with every run's figure beside it.

    python bench/push_bench.py [--only rate,memory,latency,flood,dhtflood] [--servers dhtnode,trio_dht]
        [--million] [--seconds 10] [--settle 5] [--repeat 3] [--quick] [--no-write] [--output FILE]
    python bench/push_bench.py --million-direct   # ours to 1 M subscriptions in-process, no HTTP

Our proxy runs with the CLI: ``python -m trio_dht -p PORT --bind 127.0.0.1 --no-ipv6 -b 127.0.0.1:B
--proxyserver PORT --proxy-addr 127.0.0.1 --pushserver 127.0.0.1:G``; dhtnode with ``-s -U -p PORT
-b 127.0.0.1:B --proxyserver PORT --proxy-addr 127.0.0.1 --pushserver 127.0.0.1:G``. Ours runs its HTTP
worker process there (the default on 2 cores): A's CPU and VmRSS include the worker's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import selectors
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import msgpack
import udp_load
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
    rss_kb,
    spawn,
    start_all,
    start_b_nodes,
    tree_cpu_seconds,
    tree_rss_kb,
)
from proxy_bench import http, parse_duration_ms

SERVERS = ("dhtnode", "trio_dht")
QUICK_ORDER = ["memory", "latency", "flood", "dhtflood", "rate"]
REPEATED = {"rate": "rps", "latency": "p99", "dhtflood": "push_rate"}
"""Scenarios run ``--repeat`` times, and the figure that picks the median run."""
CONNS = 32
VALUE = b'{"data":"aGVsbG8=","type":0}'


# -- the gorush double, in its own process -------------------------------------------------------------------


def run_gorush_sink(port: int) -> None:
    """Serve a GorushDouble on 127.0.0.1:port; ``GET /bench/stats`` reports arrivals, ``POST /bench/reset``
    forgets them."""
    import trio

    from trio_dht.proxy.http1 import Head, Writer, read_head
    from trio_dht.testing.gorush import GorushDouble, RecordedRequest

    double = GorushDouble()
    writer = Writer((("Content-Type", "application/json"),))
    state = {"notifications": 0, "requests": 0, "first": {}, "last": 0.0}

    def record() -> None:
        now = time.monotonic()
        for note in double.notifications:
            key = (note.get("data") or {}).get("key") or (note.get("data") or {}).get("timeout")
            state["first"].setdefault(key, now)
            state["notifications"] += 1
            state["last"] = now
        double.notifications.clear()
        double.requests.clear()

    async def answer(head: Head, body: bytes) -> bytes:
        path = head.target.decode("latin-1")
        if path == "/bench/stats":
            return writer.reply(200, json.dumps(state).encode(), close=head.close)
        if path == "/bench/reset":
            state.update(notifications=0, requests=0, first={}, last=0.0)
            return writer.reply(200, b"{}", close=head.close)
        state["requests"] += 1
        reply = await double.handle(RecordedRequest(head.method, path, {}, body))
        record()
        return writer.reply(reply.status, reply.body, tuple(reply.headers.items()), close=head.close)

    async def connection(stream: trio.SocketStream) -> None:
        buffer = bytearray()
        async with stream:
            while True:
                head = read_head(buffer)
                if head is None:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                    continue
                if not isinstance(head, Head):
                    return
                while len(buffer) < head.size + head.content_length:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                body = bytes(buffer[head.size : head.size + head.content_length])
                del buffer[: head.size + head.content_length]
                try:
                    await stream.send_all(await answer(head, body))
                except trio.BrokenResourceError:
                    return
                if head.close:
                    return

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1", backlog=1024)
        print("ready", flush=True)
        await trio.serve_listeners(lambda s: connection(s), listeners)

    trio.run(main)


# -- a keep-alive HTTP/1.1 load client -----------------------------------------------------------------------


def parse_response(buffer: bytearray) -> int | None:
    """Take one complete response (Content-Length or chunked body) off ``buffer``; its status, or None while
    it is incomplete."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).lower()
    status = int(head[9:12])
    if b"transfer-encoding: chunked" in head:
        pos = end + 4
        while True:  # walk the chunks
            line_end = buffer.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(bytes(buffer[pos:line_end]).split(b";")[0], 16)
            if len(buffer) < line_end + 2 + size + 2:
                return None
            pos = line_end + 2 + size + 2
            if size == 0:
                del buffer[:pos]
                return status
    length = 0
    for line in head.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    if len(buffer) < end + 4 + length:
        return None
    del buffer[: end + 4 + length]
    return status


def drive(port: int, requests: Iterable[bytes], conns: int = CONNS) -> dict:
    """Send ``requests`` over ``conns`` keep-alive connections, one request at a time on each (selectors, no
    threads); returns status counts, latencies (ms) and the wall time."""
    it = iter(requests)
    sel = selectors.DefaultSelector()
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    started = time.monotonic()
    active = 0
    for _ in range(conns):
        request = next(it, None)
        if request is None:
            break
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request)
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, [bytearray(), time.monotonic(), request])
        active += 1
    while active:
        for key, _ in sel.select():
            sock, state = key.fileobj, key.data
            data = sock.recv(65536)
            if not data:  # closed after its last response (e.g. hypercorn's 1000 requests per connection)
                if state[0]:
                    raise ConnectionError("the server closed a connection in a response")
                sel.unregister(sock)
                sock.close()
                sock = socket.create_connection(("127.0.0.1", port))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(state[2])
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ, state)
                continue
            state[0] += data
            status = parse_response(state[0])
            if status is None:
                continue
            now = time.monotonic()
            latencies.append((now - state[1]) * 1000)
            statuses[status] = statuses.get(status, 0) + 1
            request = next(it, None)
            if request is None:
                sel.unregister(sock)
                sock.close()
                active -= 1
                continue
            state[1], state[2] = now, request
            sock.setblocking(True)
            sock.sendall(request)
            sock.setblocking(False)
    return {"statuses": statuses, "latencies": latencies, "seconds": time.monotonic() - started}


def subscribe_requests(
    keys: list[str], first_token: int = 0, platform: str = "android", topic: str = ""
) -> Iterator[bytes]:
    """One SUBSCRIBE per key, each with its own device token (``tok-N``; iOS: N as 64 hex digits, an APNs
    device token) and, if given, ``topic`` (which push app serves it)."""
    extra = b',"topic":"%s"' % topic.encode() if topic else b""
    for i, key in enumerate(keys):
        n = first_token + i
        token = b"%064x" % n if platform == "ios" else b"tok-%d" % n
        body = b'{"key":"%s","platform":"%s","client_id":"bench","session_id":"s"%s}' % (
            token,
            platform.encode(),
            extra,
        )
        yield (
            b"SUBSCRIBE /key/%s HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (key.encode(), len(body), body)
        )


def post_requests(keys: list[str]) -> Iterator[bytes]:
    for key in keys:
        yield (
            b"POST /key/%s HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (key.encode(), len(VALUE), VALUE)
        )


def random_keys(n: int) -> list[str]:
    return [os.urandom(20).hex() for _ in range(n)]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] if ordered else float("nan")


# -- stacks --------------------------------------------------------------------------------------------------


@dataclass
class Stack:
    name: str
    port: int
    a: subprocess.Popen
    b: subprocess.Popen
    sink: subprocess.Popen
    sink_port: int
    udp_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_kb(self) -> int:
        """A's VmRSS, with its HTTP worker's."""
        return tree_rss_kb(self.a.pid)

    def sink_stats(self) -> dict:
        return json.loads(http("GET", f"http://127.0.0.1:{self.sink_port}/bench/stats", timeout=30)[1])

    def sink_reset(self) -> None:
        http("POST", f"http://127.0.0.1:{self.sink_port}/bench/reset", b"")


def server_command(name: str, udp: int, port: int, b_port: int, gorush_port: int) -> list[str]:
    common = [
        "-U",
        "-p",
        str(udp),
        "-b",
        f"127.0.0.1:{b_port}",
        "--proxyserver",
        str(port),
        "--proxy-addr",
        "127.0.0.1",
        "--pushserver",
        f"127.0.0.1:{gorush_port}",
    ]
    if name == "dhtnode":
        return ["dhtnode", "-s", *common]
    return [*our_command(), "--bind", "127.0.0.1", "--no-ipv6", *common]


@contextmanager
def open_stacks(names: list[str], workdir: Path, settle: float = 1.0) -> Iterator[dict[str, Stack]]:
    """For each name, the gorush double, node B (dhtnode -U), then node A with its proxy; all doubles and Bs
    at once, then all As, each ready once a put succeeds; then left ``settle`` s."""
    env = our_env()
    with processes() as procs:
        sinks, sink_ports = {}, {}
        for name in names:
            sink_ports[name] = free_port(socket.SOCK_STREAM)
            sinks[name] = subprocess.Popen(
                [sys.executable, __file__, "--gorush-sink", str(sink_ports[name])],
                env=env,
                stdout=subprocess.PIPE,
                stderr=(workdir / f"{name}-sink.log").open("wb"),
            )
            procs.append(sinks[name])
        bs = start_b_nodes(procs, names, workdir)

        def spawner(name: str) -> Callable[[], tuple[subprocess.Popen, tuple[int, int]]]:
            def start() -> tuple[subprocess.Popen, tuple[int, int]]:
                port, udp = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
                cmd = server_command(name, udp, port, bs[name][1], sink_ports[name])
                return spawn(cmd, workdir / f"{name}-A.log", env), (port, udp)

            return start

        servers = start_all(procs, {name: spawner(name) for name in names}, lambda ports: is_ready(ports[0]))
        stacks = {}
        for name, (a, (port, udp)) in servers.items():
            sink = sinks[name]
            assert sink.stdout is not None and sink.stdout.readline().strip() == b"ready"
            stacks[name] = Stack(name, port, a, bs[name][0], sink, sink_ports[name], udp)
        time.sleep(settle)
        for stack in stacks.values():
            stack.sink_reset()
        yield stacks


def is_ready(port: int) -> bool:
    """A put succeeds."""
    try:
        status, _ = http("POST", f"http://127.0.0.1:{port}/key/{os.urandom(20).hex()}", VALUE, timeout=10)
    except (OSError, ValueError):
        return False
    return status == 200


class CpuMeter:
    """CPU seconds used by the stack's processes, this client, and everything else, over a block."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def __enter__(self) -> CpuMeter:
        s = self.stack
        self._start = [tree_cpu_seconds(s.a.pid), cpu_seconds(s.b.pid), cpu_seconds(s.sink.pid)]
        self._start += [time.process_time(), machine_busy_seconds()]
        return self

    def __exit__(self, *exc: object) -> None:
        s = self.stack
        end = [tree_cpu_seconds(s.a.pid), cpu_seconds(s.b.pid), cpu_seconds(s.sink.pid)]
        end += [time.process_time(), machine_busy_seconds()]
        a, b, sink, client, busy = (e - s0 for e, s0 in zip(end, self._start, strict=True))
        self.result = {
            "a_cpu": a,
            "b_cpu": b,
            "sink_cpu": sink,
            "client_cpu": client,
            "others": max(0.0, busy - a - b - sink - client),
        }


# -- scenarios -----------------------------------------------------------------------------------------------


def scenario_rate(stack: Stack, seconds: float, warm_up: bool = True) -> dict:
    script = HERE / "wrk" / "subscribe_distinct.lua"
    cmd = [
        "wrk",
        "-t1",
        f"-c{CONNS}",
        f"-d{seconds:g}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(script),
        stack.url + "/",
    ]
    if warm_up:
        subprocess.run([*cmd[:3], "-d1s", *cmd[4:]], capture_output=True, check=True)  # 1 s, not measured
    with CpuMeter(stack) as cpu:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = {"command": " ".join([*cmd[:-1], "URL"]), **cpu.result}
    result["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    result["requests"] = int(re.search(r"(\d+) requests in", out).group(1))
    for pct in ("50", "99"):
        result[f"p{pct}"] = parse_duration_ms(re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M).group(1))
    result["non2xx"] = int(re.search(r"non2xx=(\d+)", out).group(1))
    result["rss_mb"] = stack.rss_kb() / 1024
    return result


def scenario_memory(stack: Stack, milestones: list[int], settle: float) -> dict:
    time.sleep(settle)
    base = stack.rss_kb()
    result: dict = {"baseline_mb": base / 1024, "milestones": {}}
    done = 0
    for target in milestones:
        keys = random_keys(target - done)
        with CpuMeter(stack) as cpu:
            run = drive(stack.port, subscribe_requests(keys, first_token=done))
        done = target
        time.sleep(settle)
        rss = stack.rss_kb()
        ok = run["statuses"].get(200, 0)
        result["milestones"][target] = {
            "rss_mb": rss / 1024,
            "kb_per_sub": (rss - base) / target,
            "rate": len(keys) / run["seconds"],
            "non200": len(keys) - ok,
            **cpu.result,
        }
        print(
            f"  {stack.name} {target:>8} subs: RSS {rss / 1024:.1f} MB, {(rss - base) / target:.2f} KB/sub, "
            f"{len(keys) / run['seconds']:.0f} SUBSCRIBE/s, non-200 {len(keys) - ok}",
            flush=True,
        )
    return result


def scenario_latency(stack: Stack, count: int = 1_000, gap: float = 0.01, settle: float = 1.0) -> dict:
    keys = random_keys(count)
    drive(stack.port, subscribe_requests(keys))
    time.sleep(settle)
    stack.sink_reset()
    sent: dict[str, float] = {}
    post_ms: list[float] = []
    with socket.create_connection(("127.0.0.1", stack.port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = bytearray()
        for request, key in zip(post_requests(keys), keys, strict=True):
            sent[key] = time.monotonic()
            sock.sendall(request)
            while parse_response(buffer) is None:
                buffer += sock.recv(65536)
            post_ms.append((time.monotonic() - sent[key]) * 1000)
            time.sleep(gap)
    deadline = time.monotonic() + 10
    while (stats := stack.sink_stats())["notifications"] < count and time.monotonic() < deadline:
        time.sleep(0.2)
    lat = [(stats["first"][k] - sent[k]) * 1000 for k in keys if k in stats["first"]]
    return {
        "received": len(lat),
        "p50": percentile(lat, 50),
        "p90": percentile(lat, 90),
        "p99": percentile(lat, 99),
        "max": max(lat, default=float("nan")),
        "post_p50": percentile(post_ms, 50),
        "post_p99": percentile(post_ms, 99),
    }


def scenario_flood(stack: Stack, count: int = 10_000, settle: float = 5.0) -> dict:
    keys = random_keys(count)
    subs = drive(stack.port, subscribe_requests(keys))
    time.sleep(settle)
    stack.sink_reset()
    with CpuMeter(stack) as cpu:
        t0 = time.monotonic()
        puts = drive(stack.port, post_requests(keys))
        deadline = time.monotonic() + 30
        while (stats := stack.sink_stats())["notifications"] < count and time.monotonic() < deadline:
            time.sleep(0.1)
    received = stats["notifications"]
    span = (stats["last"] - t0) if received else float("nan")
    return {
        "subscribe_rate": count / subs["seconds"],
        "put_rate": count / puts["seconds"],
        "put_p50": percentile(puts["latencies"], 50),
        "put_p99": percentile(puts["latencies"], 99),
        "put_non200": count - puts["statuses"].get(200, 0),
        "pushes": received,
        "distinct_keys": len(stats["first"]),
        "gorush_requests": stats["requests"],
        "push_rate": received / span if received else 0.0,
        "rss_mb": stack.rss_kb() / 1024,
        **cpu.result,
    }


def scenario_dhtflood(
    stack: Stack,
    count: int = 10_000,
    settle: float = 5.0,
    sources: int = 4,
    subscribe: Callable[[list[str]], Iterable[bytes]] = subscribe_requests,
    during: Callable[[], AbstractContextManager] = nullcontext,
) -> dict:
    """10 k subscribed keys (``subscribe``: their SUBSCRIBE requests), then one value each arriving over the
    DHT: UDP ``put`` requests to A from ``sources`` peers (64 in flight), as values from other devices reach
    a proxy's node. Measures the push pipeline itself (value stored -> push delivered), without the proxy's
    POST path. ``during``: a context entered for the puts and the pushes (a profiler)."""
    keys = random_keys(count)
    drive(stack.port, subscribe(keys))
    time.sleep(settle)
    stack.sink_reset()
    addr = ("127.0.0.1", stack.udp_port)
    socks = [udp_load._socket(f"127.0.0.{2 + i}") for i in range(sources)]
    tokens = {sock: udp_load._token(sock, addr, bytes.fromhex(keys[0])) for sock in socks}
    for sock in socks:
        sock.setblocking(False)
    pending: dict[int, float] = {}
    replies = lost = 0
    with CpuMeter(stack) as cpu, during():
        t0 = time.monotonic()
        todo = iter(enumerate(keys, start=1000))
        exhausted = False
        while not exhausted or pending:
            now = time.monotonic()
            for tid in [t for t, at in pending.items() if now - at > 2.0]:
                del pending[tid]
                lost += 1
            while not exhausted and len(pending) < 64:
                item = next(todo, None)
                if item is None:
                    exhausted = True
                    break
                tid, key = item
                sock = socks[tid % sources]
                value = {"id": tid, "dat": {"body": {"type": 0, "data": b"pushed over the DHT"}}}
                args = {"h": bytes.fromhex(key), "values": [value], "token": tokens[sock]}
                sock.sendto(udp_load.request(tid, "put", args), addr)
                pending[tid] = time.monotonic()
            readable, _, _ = select.select(socks, [], [], 0.05)
            for data in udp_load._drain(readable):
                try:
                    tid = msgpack.unpackb(data, raw=False, strict_map_key=False).get("t")
                except Exception:
                    continue
                if pending.pop(tid, None) is not None:
                    replies += 1
        puts_done = time.monotonic()
        deadline = puts_done + 30
        while (stats := stack.sink_stats())["notifications"] < count and time.monotonic() < deadline:
            time.sleep(0.1)
    for sock in socks:
        sock.close()
    received = stats["notifications"]
    return {
        "put_rate": replies / (puts_done - t0),
        "put_replies": replies,
        "put_lost": lost,
        "pushes": received,
        "distinct_keys": len(stats["first"]),
        "gorush_requests": stats["requests"],
        "push_rate": received / (stats["last"] - t0) if received else 0.0,
        "rss_mb": stack.rss_kb() / 1024,
        **cpu.result,
    }


def memory_direct(milestones: list[int]) -> dict:
    """Memory per subscription without HTTP: our node (no peers) and a PushService in this process,
    ``service.subscribe`` called directly with distinct tokens and keys (the HTTP path runs ~800/s, so 1 M
    through it takes over 20 minutes); VmRSS read at each milestone after a garbage collection."""
    import gc

    import trio

    from trio_dht.infohash import InfoHash
    from trio_dht.node import open_node
    from trio_dht.push.dispatcher import Dispatcher
    from trio_dht.push.service import PushService

    result: dict = {"milestones": {}}

    async def main() -> None:
        async with open_node(port=0, host="127.0.0.1", host6=None) as node, trio.open_nursery() as nursery:
            dispatcher = Dispatcher({})
            service = PushService(node, dispatcher, lifetime=24 * 3600)
            await nursery.start(dispatcher.run)
            await nursery.start(service.run)
            await trio.sleep(1)
            gc.collect()
            base = result["baseline_mb"] = rss_kb() / 1024
            done, started = 0, time.monotonic()
            for target in milestones:
                while done < target:
                    body = (
                        b'{"key":"tok-%d","platform":"android","client_id":"bench","session_id":"s"}' % done
                    )
                    await service.subscribe(InfoHash(os.urandom(20)), body)
                    done += 1
                    if done % 1000 == 0:
                        await trio.sleep(0)
                await trio.sleep(1)
                gc.collect()
                rss = rss_kb() / 1024
                result["milestones"][target] = {
                    "rss_mb": rss,
                    "kb_per_sub": (rss - base) * 1024 / target,
                    "rate": done / (time.monotonic() - started),
                }
                print(
                    f"  direct {target:>8} subs: RSS {rss:.1f} MB, {(rss - base) * 1024 / target:.2f} KB/sub",
                    flush=True,
                )
            nursery.cancel_scope.cancel()

    trio.run(main)
    return result


@dataclass
class Scenarios:
    """How long and how much each scenario runs (the full run, or --quick)."""

    seconds: float
    settle: float
    milestones: list[int]
    latency_puts: int
    flood_keys: int
    quick: bool = False  # no wrk warm-up, 0.5 s instead of 1 s between subscribing and the latency puts

    def run(self, scenario: str, stack: Stack) -> dict:
        print(f"{stack.name}: {scenario}", flush=True)
        if scenario == "rate":
            r = scenario_rate(stack, self.seconds, warm_up=not self.quick)
        elif scenario == "memory":
            r = scenario_memory(stack, self.milestones, self.settle)
        elif scenario == "latency":
            r = scenario_latency(stack, self.latency_puts, settle=0.5 if self.quick else 1.0)
        elif scenario == "flood":
            r = scenario_flood(stack, self.flood_keys, self.settle)
        else:
            r = scenario_dhtflood(stack, self.flood_keys, self.settle)
        print(f"  {json.dumps(r, default=str)[:600]}", flush=True)
        return r


def median_run(runs: list[dict], figure: str | None) -> dict:
    """The run whose ``figure`` is the median (the lower middle one of an even count), with every run's
    figure as ``runs``; the only run when there is one."""
    if len(runs) == 1 or figure is None:
        return runs[0]
    ordered = sorted(runs, key=lambda run: run[figure])
    return {**ordered[(len(ordered) - 1) // 2], "runs": [run[figure] for run in runs]}


# -- report --------------------------------------------------------------------------------------------------


def report(results: dict[str, dict], scenarios: list[str], million: dict | None) -> str:
    d, o = results["dhtnode"], results["trio_dht"]
    rows = ["| measure | dhtnode | trio_dht | ours / dhtnode |", "|---|---:|---:|---:|"]

    def row(label: str, dv: float, ov: float, fmt: str = "{:,.0f}") -> None:
        rows.append(f"| {label} | {fmt.format(dv)} | {fmt.format(ov)} | **{ov / dv:.2f}** |")

    def every_run(scenario: str, fmt: str = "{:,.0f}") -> None:
        """The figure of each run, when the scenario ran more than once (the median one is reported)."""
        if "runs" in d[scenario] and "runs" in o[scenario]:
            dr, orr = (" / ".join(fmt.format(x) for x in r[scenario]["runs"]) for r in (d, o))
            what = {"rps": "req/s", "p99": "p99 ms", "push_rate": "pushes/s"}[REPEATED[scenario]]
            rows.append(f"| {what} of each run (the median run is the one above) | {dr} | {orr} | |")

    if "rate" in scenarios:
        row("SUBSCRIBE distinct keys, req/s (wrk, 32 conns)", d["rate"]["rps"], o["rate"]["rps"])
        rows.append(
            f"| SUBSCRIBE p50 / p99 ms | {d['rate']['p50']:.2f} / {d['rate']['p99']:.2f} "
            f"| {o['rate']['p50']:.2f} / {o['rate']['p99']:.2f} | |"
        )
        every_run("rate")
    if "memory" in scenarios:
        for n in d["memory"]["milestones"]:
            dm, om = d["memory"]["milestones"][n], o["memory"]["milestones"][n]
            row(
                f"memory per subscription at {n:,}, KB (VmRSS growth / N)",
                dm["kb_per_sub"],
                om["kb_per_sub"],
                "{:.2f}",
            )
            rows.append(
                f"| VmRSS at {n:,} (baseline), MB | {dm['rss_mb']:.1f} ({d['memory']['baseline_mb']:.1f}) "
                f"| {om['rss_mb']:.1f} ({o['memory']['baseline_mb']:.1f}) | |"
            )
    if "latency" in scenarios:
        dl, ol = d["latency"], o["latency"]
        rows.append(
            f"| put -> push latency p50 / p99 / max ms | {dl['p50']:.2f} / {dl['p99']:.2f} / "
            f"{dl['max']:.2f} | {ol['p50']:.2f} / {ol['p99']:.2f} / {ol['max']:.2f} | |"
        )
        rows.append(f"| pushes received (latency run) | {dl['received']} | {ol['received']} | |")
        every_run("latency", "{:.2f}")
    if "flood" in scenarios:
        df, of = d["flood"], o["flood"]
        row("**pushes/s**, 10 k subscribed keys, one put each (32 conns)", df["push_rate"], of["push_rate"])
        row("puts/s in that run", df["put_rate"], of["put_rate"])
        rows.append(
            f"| pushes received / distinct keys / gorush requests | {df['pushes']} / {df['distinct_keys']} / "
            f"{df['gorush_requests']} | {of['pushes']} / {of['distinct_keys']} / {of['gorush_requests']} | |"
        )
        rows.append(
            f"| CPU s in the flood: A / B / gorush double / client / others | "
            f"{df['a_cpu']:.1f} / {df['b_cpu']:.1f} / {df['sink_cpu']:.1f} / {df['client_cpu']:.1f} / "
            f"{df['others']:.1f} | {of['a_cpu']:.1f} / {of['b_cpu']:.1f} / {of['sink_cpu']:.1f} / "
            f"{of['client_cpu']:.1f} / {of['others']:.1f} | |"
        )
    if "dhtflood" in scenarios:
        df, of = d["dhtflood"], o["dhtflood"]
        row(
            "**pushes/s**, 10 k subscribed keys, one value each over the DHT (UDP put)",
            df["push_rate"],
            of["push_rate"],
        )
        every_run("dhtflood")
        row("UDP puts answered/s in that run", df["put_rate"], of["put_rate"])
        rows.append(
            f"| pushes received / gorush requests | {df['pushes']} / {df['gorush_requests']} "
            f"| {of['pushes']} / {of['gorush_requests']} | |"
        )
        rows.append(
            f"| CPU s in that run: A / B / gorush double / client / others | "
            f"{df['a_cpu']:.1f} / {df['b_cpu']:.1f} / {df['sink_cpu']:.1f} / {df['client_cpu']:.1f} / "
            f"{df['others']:.1f} | {of['a_cpu']:.1f} / {of['b_cpu']:.1f} / {of['sink_cpu']:.1f} / "
            f"{of['client_cpu']:.1f} / {of['others']:.1f} | |"
        )
    text = "\n".join(rows)
    if million:
        m = million["milestones"]
        text += "\n\nOurs alone, up to 1 M subscriptions (distinct tokens and keys):\n\n"
        text += "| subscriptions | VmRSS MB | KB per subscription | SUBSCRIBE/s (Python client) |\n"
        text += "|---:|---:|---:|---:|\n"
        text += "\n".join(
            f"| {n:,} | {v['rss_mb']:.1f} | {v['kb_per_sub']:.2f} | {v['rate']:,.0f} |" for n, v in m.items()
        )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="rate,memory,latency,flood,dhtflood")
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the wrk SUBSCRIBE run")
    parser.add_argument("--settle", type=float, default=5.0, help="wait before reading VmRSS")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help=f"runs of {', '.join(REPEATED)} per server; the median one is reported (not with --quick)",
    )
    parser.add_argument("--million", action="store_true", help="also ours up to 1 M subscriptions (slow)")
    parser.add_argument(
        "--million-direct",
        action="store_true",
        help="only ours up to 1 M subscriptions in this process, without HTTP (a few minutes), then exit",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: one stack per server, 1 s of wrk, 1 k/5 k, 50 and 1 k puts, 0.5 s settles",
    )
    parser.add_argument("--no-write", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--output", type=Path, default=HERE / "push_results.json", help="results as JSON")
    parser.add_argument("--gorush-sink", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gorush_sink:
        run_gorush_sink(args.gorush_sink)
        return
    if args.million_direct:
        direct = memory_direct([10_000, 100_000, 250_000, 500_000, 1_000_000])
        args.output.write_text(json.dumps({"million_direct": direct}, indent=1))
        return
    if shutil.which("wrk") is None or shutil.which("dhtnode") is None:
        sys.exit("needs wrk and dhtnode: apt-get install -y wrk dhtnode")
    scenarios = args.only.split(",")
    servers = args.servers.split(",")
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / "push_bench"
    workdir.mkdir(exist_ok=True)
    results: dict[str, dict] = {s: {} for s in servers}
    if args.quick:
        # one stack per server, smaller counts; memory first (a fresh baseline), rate last (its many
        # subscriptions slow dhtnode's puts)
        quick = Scenarios(1.0, 0.5, [1_000, 5_000], latency_puts=50, flood_keys=1_000, quick=True)
        with open_stacks(servers, workdir, settle=0.5) as stacks:
            for scenario in sorted(scenarios, key=QUICK_ORDER.index):
                for name in servers:
                    results[name][scenario] = quick.run(scenario, stacks[name])
    else:
        full = Scenarios(args.seconds, args.settle, [10_000, 50_000], latency_puts=1_000, flood_keys=10_000)
        for scenario in scenarios:
            runs: dict[str, list[dict]] = {name: [] for name in servers}
            for rep in range(args.repeat if scenario in REPEATED else 1):
                for name in servers if rep % 2 == 0 else servers[::-1]:
                    with open_stacks([name], workdir) as stacks:
                        runs[name].append(full.run(scenario, stacks[name]))
            for name in servers:
                results[name][scenario] = median_run(runs[name], REPEATED.get(scenario))
    million = None
    if args.million and "trio_dht" in servers:
        print("trio_dht: memory up to 1 M", flush=True)
        with open_stacks(["trio_dht"], workdir) as stacks:
            million = scenario_memory(
                stacks["trio_dht"], [10_000, 100_000, 250_000, 500_000, 1_000_000], args.settle
            )
    if set(servers) != set(SERVERS):
        args.output.write_text(json.dumps({"results": results, "million": million}, indent=1))
        return
    text = report(results, scenarios, million)
    print(text)
    args.output.write_text(
        json.dumps({"machine": machine(), "results": results, "million": million, "table": text}, indent=1)
    )
    if args.quick or args.no_write:
        return
    command = "python bench/push_bench.py " + " ".join(sys.argv[1:])
    section = (
        f"\n## Push notifications: trio_dht against dhtnode --proxyserver --pushserver "
        f"({time.strftime('%Y-%m-%d %H:%M')})\n\n"
        f"Machine: {machine()}. Each proxy is node A of a 2-node loopback DHT whose node B is "
        "`dhtnode -s -U`; "
        f"a fresh stack per scenario; both push to the same gorush double (`GorushDouble`, own process). "
        "Ours: `python -m trio_dht --bind 127.0.0.1 --no-ipv6 -U -p UDP -b 127.0.0.1:B --proxyserver PORT "
        "--proxy-addr 127.0.0.1 --pushserver 127.0.0.1:GORUSH`; dhtnode: `dhtnode -s -U -p UDP "
        "-b 127.0.0.1:B --proxyserver PORT --proxy-addr 127.0.0.1 --pushserver 127.0.0.1:GORUSH`.\n"
        f"Command: `{command.strip()}`.\n\n{text}\n"
    )
    append_to_results(section)


if __name__ == "__main__":
    main()
