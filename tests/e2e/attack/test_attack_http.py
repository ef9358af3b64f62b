"""A stranger's slow or greedy HTTP connections, against the real program and its default HTTP worker.

* A request head sent one byte a second, and a POST (or a relayed SUBSCRIBE) whose body never comes, are
  answered 408 and closed within their deadline (``--limit http_head_timeout=2``, ``http_body_timeout=2``)
  plus the sweep's slack, however the bytes trickle.
* A client that GETs a key holding megabytes of values and never reads: resident memory stays bounded and
  the connection is closed after ``http_send_timeout``.
* Connections and listen streams per client address are capped (the next connection is closed at accept,
  the next listen is a 429 with a JSON error).
* Out of file descriptors (a low ``RLIMIT_NOFILE``), accepting pauses: the log stays a few lines, and the
  server serves again once the connections close.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import sys
import time

import httpx
import pytest
import trio
from cli_process import LOOPBACK_NODE, free_tcp_port, read_to_end, trio_dht_process
from conftest import Target, attacked

from trio_dht.infohash import InfoHash
from trio_dht.proxy.http1 import KEEP_ALIVE_TIMEOUT

KEY = InfoHash.get("attacked http key").hex()
FAST = ("--limit", "http_head_timeout=2", "--limit", "http_body_timeout=2", "--limit", "http_send_timeout=2")
CUT_WITHIN = 12.0
"""A connection past its 2 s deadline is closed well before the 60 s keep-alive would have closed it; the
margin is for a loaded 2-core machine running the whole suite."""


async def open_raw(target: Target, rcvbuf: int | None = None) -> trio.SocketStream:
    sock = trio.socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", target.http_port))
    return trio.SocketStream(sock)


async def http_stats(target: Target) -> dict:
    return (await target.stats())["http"]


async def test_slow_heads_and_missing_bodies_are_cut() -> None:
    async with attacked(*FAST) as target:
        slow_head = await open_raw(target)
        post = await open_raw(target)  # handed over by the worker: the front end waits for the body
        subscribe = await open_raw(target)  # relayed by the worker: the worker waits for the body
        start = time.monotonic()
        await post.send_all(f"POST /key/{KEY} HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{{".encode())
        body = b"SUBSCRIBE /key/%s HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{" % KEY.encode()
        await subscribe.send_all(body)
        answers: dict[str, tuple[bytes, float]] = {}

        async def trickle() -> None:
            for byte in b"GET /node/info HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 60:
                try:
                    await slow_head.send_all(bytes([byte]))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                await trio.sleep(1)

        async def wait_end(name: str, stream: trio.SocketStream) -> None:
            answers[name] = (await read_to_end(stream), time.monotonic() - start)

        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                for name, stream in (("head", slow_head), ("post", post), ("subscribe", subscribe)):
                    nursery.start_soon(wait_end, name, stream)
                while len(answers) < 3:
                    await trio.sleep(0.1)
                nursery.cancel_scope.cancel()
        for name, (data, elapsed) in answers.items():
            assert data.startswith(b"HTTP/1.1 408 "), (name, data[:100])
            assert elapsed <= CUT_WITHIN < KEEP_ALIVE_TIMEOUT, (name, elapsed)
        with trio.fail_after(5):
            while True:
                counts = await http_stats(target)
                if counts["headTimeouts"] >= 1 and counts["bodyTimeouts"] >= 2:
                    break
                await trio.sleep(0.2)
        # Honest clients are still served.
        async with httpx.AsyncClient(base_url=target.url, timeout=5) as http:
            assert (await http.get("/node/info")).status_code == 200


async def test_a_client_that_does_not_read_a_big_get_is_cut() -> None:
    value = base64.b64encode(b"x" * 60_000).decode()
    async with attacked(*FAST, "--limit", "http_send_buffer=64M") as target:
        async with httpx.AsyncClient(base_url=target.url, timeout=10) as http:
            for i in range(60):  # about 5 MB of JSON under one key
                reply = await http.post(f"/key/{KEY}", json={"data": value, "id": str(i + 1)})
                assert reply.status_code == 200
        rss_before = target.rss_kb()
        greedy = []
        for _ in range(4):
            stream = await open_raw(target, rcvbuf=4096)
            await stream.send_all(f"GET /key/{KEY} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            greedy.append(stream)
        await trio.sleep(1)
        rss_during = target.rss_kb()
        with trio.fail_after(10):
            while (await http_stats(target))["sendTimeouts"] < len(greedy):
                await trio.sleep(0.2)
        await trio.sleep(0.5)
        assert target.rss_kb() - rss_before < 80_000, (rss_before, rss_during, target.rss_kb())
        for stream in greedy:
            with trio.fail_after(5):
                assert not (await read_to_end(stream)).endswith(b"\r\n0\r\n\r\n")  # cut: no last chunk


async def test_connections_and_listens_per_address_are_capped() -> None:
    flags = ("--limit", "http_connections_per_ip=40", "--limit", "http_listens_per_ip=3")
    async with attacked(*flags) as target:
        held = [await open_raw(target) for _ in range(40)]  # idle: the worker holds them
        refused = [await open_raw(target) for _ in range(10)]
        with trio.fail_after(5):
            for stream in refused:
                assert await read_to_end(stream) == b""
        for stream in held:
            await stream.aclose()
        with trio.fail_after(10):
            while (await http_stats(target))["connectionsRefused"] < 10:
                await trio.sleep(0.2)
        listens = []
        for _ in range(3):
            stream = await open_raw(target)
            await stream.send_all(f"GET /key/{KEY}/listen HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            with trio.fail_after(5):
                assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200")
            listens.append(stream)
        async with httpx.AsyncClient(base_url=target.url, timeout=5) as http:
            reply = await http.get(f"/key/{KEY}/listen")
            assert reply.status_code == 429 and reply.headers["content-type"] == "application/json"
            assert reply.json() == {"err": "Too many listen streams from this address"}
            await listens[0].aclose()
            with trio.fail_after(5):
                while (await target.stats())["listenCount"] != 2:
                    await trio.sleep(0.1)
            async with http.stream("GET", f"/key/{KEY}/listen") as stream_reply:
                assert stream_reply.status_code == 200
        assert (await http_stats(target))["listensRefused"] == 1


@pytest.mark.parametrize("workers", ["1", "0"], ids=["worker", "front-end"])
async def test_out_of_file_descriptors_the_log_stays_small(workers: str) -> None:
    port = free_tcp_port()
    command = [
        "prlimit",
        "--nofile=120:120",
        sys.executable,
        "-m",
        "trio_dht",
        *LOOPBACK_NODE,
        "--proxyserver",
        str(port),
        "--proxy-addr",
        "127.0.0.1",
        "--http-workers",
        workers,
    ]
    async with trio_dht_process(command) as proc:
        lines_before = len(proc.lines)
        socks = []
        for _ in range(300):  # far past the limit: the kernel completes them, the server cannot accept
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", port))
            socks.append(sock)
        await trio.sleep(4)
        new_lines = proc.lines[lines_before:]
        assert 1 <= len([line for line in new_lines if "accept failed" in line]) <= 4, new_lines[:20]
        assert len(new_lines) <= 10, new_lines[:20]
        for sock in socks:
            sock.close()
        async with httpx.AsyncClient(timeout=5) as http:
            with trio.fail_after(10):
                while True:
                    try:
                        reply = await http.get(f"http://127.0.0.1:{port}/node/stats")
                        break
                    except httpx.HTTPError:
                        await trio.sleep(0.2)
        assert reply.status_code == 200 and json.loads(reply.content)["http"]["acceptPauses"] >= 1
        assert proc.process.returncode is None
