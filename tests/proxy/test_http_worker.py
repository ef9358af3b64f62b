"""HTTP worker processes: the relay records (sans-IO), a worker driven in-process by a test playing the front
end, and the proxy with a real worker process (relaying, hand-over, restart, fallback, shutdown).

The push routes' own tests (``test_push_routes.py``) run through a worker too, as their ``worker`` case.
"""

from __future__ import annotations

import array
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio
from test_proxy_frontend import Client, connect
from test_push_routes import RecordingGateway, body

from trio_dht.infohash import InfoHash
from trio_dht.proxy import ProxyConfig, RateLimit, http_worker, relay, serve_proxy, worker_link
from trio_dht.proxy.http1 import KEEP_ALIVE_TIMEOUT
from trio_dht.proxy.push_hooks import CountingGateway, ProxyPushHooks, PushCounts
from trio_dht.push.dispatcher import DeliveryQueue, Dispatcher
from trio_dht.push.payloads import Platform
from trio_dht.push.service import PushService
from trio_dht.testing.memory_dht import MemoryDht
from trio_dht.value import Value

BOUND = 10.0
"""Safety bound on every wait (not a timing assertion); a worker process takes about a second to start."""
KEY = InfoHash.get("hello")


def request(method: str, path: str, content: bytes = b"", close: bool = False) -> bytes:
    extra = "Connection: close\r\n" if close else ""
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(content)}\r\n{extra}\r\n"
    return head.encode() + content


# -- the records (sans-IO) -----------------------------------------------------------------------------------


def test_a_relayed_request_round_trips() -> None:
    data = relay.relay_frame(7, relay.SUBSCRIBE, True, bytes(KEY), "::ffff:10.0.0.1", b'{"key":"t"}')
    data += relay.frame(relay.READY)
    first, second = relay.frames(data)
    assert (first.kind, first.request_id) == (relay.RELAY, 7) and second == relay.Frame(relay.READY, 0, b"")
    assert relay.parse_relayed(first.payload) == relay.Relayed(
        relay.SUBSCRIBE, True, bytes(KEY), "::ffff:10.0.0.1", b'{"key":"t"}'
    )


def test_a_long_response_is_sent_in_parts() -> None:
    response = bytes(range(256)) * 1000  # 256,000 bytes: three parts and the end
    parts = [frame for data in relay.response_frames(9, True, response) for frame in relay.frames(data)]
    assert [frame.kind for frame in parts] == [relay.PART] * 3 + [relay.RESPONSE]
    assert {frame.request_id for frame in parts} == {9}
    assert all(len(frame.payload) <= relay.MAX_RECORD + 1 for frame in parts)
    close, end = relay.parse_response(parts[-1].payload)
    assert close and b"".join(frame.payload for frame in parts[:-1]) + end == response
    [short] = relay.response_frames(1, False, b"HTTP/1.1 200 OK\r\n\r\n")
    assert relay.parse_response(next(relay.frames(short)).payload) == (False, b"HTTP/1.1 200 OK\r\n\r\n")


@pytest.mark.parametrize(
    "record",
    [
        b"\x01\x00",  # a header cut short
        relay.frame(relay.RELAY, 1, b"x" * 10)[:-1],  # a payload cut short
    ],
)
def test_a_record_that_does_not_parse(record: bytes) -> None:
    with pytest.raises(relay.BadRecord):
        list(relay.frames(record))


@pytest.mark.parametrize(
    "payload", [b"\x01\x00", b"\x09\x00" + bytes(20) + b"\x00", b"\x01\x00" + bytes(20) + b"\x05ab"]
)
def test_a_relayed_request_that_does_not_parse(payload: bytes) -> None:
    with pytest.raises(relay.BadRecord):
        relay.parse_relayed(payload)


def test_the_record_writer_seals_records_at_the_size_limit() -> None:
    writer = relay.RecordWriter()
    assert not writer and writer.take() == []
    small = relay.frame(relay.READY)
    big = b"x" * (relay.MAX_RECORD - 4)
    for data in (small, big, small, small):
        writer.add(data)
    assert writer.frames == 4
    assert writer.take() == [small, big, small + small]
    writer.add(big)
    writer.add(big)
    assert writer.take() == [big, big] and writer.frames == 0


def test_the_record_writer_keeps_frames_in_order() -> None:
    writer = relay.RecordWriter()
    frames = [relay.frame(relay.READY, i, b"y" * 30_000) for i in range(5)]
    for data in frames:
        writer.add(data)
    records = writer.take()
    assert b"".join(records) == b"".join(frames) and len(records) == 3
    assert all(len(record) <= relay.MAX_RECORD for record in records)


# -- a worker in this process, with the test as its front end ------------------------------------------------


@dataclass
class WorkerRig:
    """An :class:`~trio_dht.proxy.http_worker.HttpWorker` task; ``front`` is the front end's end of its
    channel, read and written by the test."""

    front: socket.socket
    port: int
    done: trio.Event

    async def record(self) -> tuple[bytes, list[socket.socket]]:
        """The next record from the worker, with the sockets it carries."""
        with trio.fail_after(BOUND):
            while True:
                try:
                    data, ancillary, _, _ = self.front.recvmsg(1 << 20, socket.CMSG_SPACE(4))
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.front)
                    continue
                fds = [fd for _, _, raw in ancillary for fd in array.array("i", raw)]
                return data, [socket.socket(fileno=fd) for fd in fds]

    async def frames(self) -> tuple[list[relay.Frame], list[socket.socket]]:
        data, socks = await self.record()
        return list(relay.frames(data)), socks

    def send(self, *frames: bytes) -> None:
        self.front.send(b"".join(frames))


@pytest.fixture
async def rig(nursery: trio.Nursery) -> AsyncIterator[WorkerRig]:
    front, theirs = relay.socket_pair()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    done = trio.Event()

    async def run() -> None:
        try:
            await http_worker.HttpWorker(theirs, [listener]).run()
        finally:
            done.set()

    nursery.start_soon(run)
    worker = WorkerRig(front, listener.getsockname()[1], done)
    [ready], _ = await worker.frames()
    assert ready.kind == relay.READY
    yield worker
    front.close()


async def test_the_worker_relays_subscribe_and_hands_over_the_rest(rig: WorkerRig) -> None:
    client = await connect(rig.port)
    get = request("GET", f"/key/{KEY.hex()}")
    await client.stream.send_all(request("SUBSCRIBE", "/key/hello", body()) + get)
    [relayed], _ = await rig.frames()
    assert relayed.kind == relay.RELAY
    assert relay.parse_relayed(relayed.payload) == relay.Relayed(
        relay.SUBSCRIBE, False, bytes(KEY), "127.0.0.1", body()
    )
    rig.send(
        *relay.response_frames(relayed.request_id, False, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n{}\n")
    )
    assert await client.response() == ("HTTP/1.1 200 OK", {"content-length": "3"}, b"{}\n")
    # The GET that came behind it: the connection, and the bytes the worker read, come over.
    [handed], [sock] = await rig.frames()
    assert handed == relay.Frame(relay.HAND_OVER, 0, get)
    with sock:
        sock.setblocking(True)
        sock.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
    assert (await client.response())[0] == "HTTP/1.1 204 No Content"


async def test_one_request_at_a_time_per_connection_in_order(rig: WorkerRig) -> None:
    client = await connect(rig.port)
    await client.stream.send_all(
        request("SUBSCRIBE", "/key/hello", body())
        + request("UNSUBSCRIBE", f"/{KEY.hex()}", body(), close=True)
    )
    [first], _ = await rig.frames()
    with trio.move_on_after(0.2):  # the second waits for the first's response
        await rig.record()
        pytest.fail("a second request was relayed before the first was answered")
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"z" * 200_000
    rig.send(*relay.response_frames(first.request_id, False, big))
    [second], _ = await rig.frames()
    assert relay.parse_relayed(second.payload).method == relay.UNSUBSCRIBE
    assert relay.parse_relayed(second.payload).close
    _, _, content = await client.response()
    assert content == b"z" * 200_000
    rig.send(*relay.response_frames(second.request_id, True, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    assert (await client.response())[0] == "HTTP/1.1 200 OK"
    assert await client.at_eof()


async def test_unusual_and_large_requests_are_handed_over(rig: WorkerRig) -> None:
    for raw in (
        b"SUBSCRIBE /key/hello HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}",  # not plain HTTP/1.1
        request("SUBSCRIBE", "/key/hello", b"x" * (relay.MAX_RELAYED_BODY + 1))[:100],  # a body too long
        request("SUBSCRIBE", "/key/hello/listen", body()),  # not a key's push route
        request("GET", "/node/info"),
    ):
        client = await connect(rig.port)
        await client.stream.send_all(raw)
        [handed], [sock] = await rig.frames()
        sock.close()
        assert handed.kind == relay.HAND_OVER and handed.payload == raw


async def test_a_client_gone_with_a_request_relayed(rig: WorkerRig) -> None:
    client = await connect(rig.port)
    await client.stream.send_all(request("SUBSCRIBE", "/key/hello", body()))
    [relayed], _ = await rig.frames()
    await client.stream.aclose()
    await trio.sleep(0.05)
    rig.send(
        *relay.response_frames(relayed.request_id, False, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    )
    other = await connect(rig.port)  # the worker goes on
    await other.stream.send_all(request("UNSUBSCRIBE", "/key/hello", body()))
    [next_one], _ = await rig.frames()
    assert relay.parse_relayed(next_one.payload).method == relay.UNSUBSCRIBE


async def test_drain_waits_for_the_responses_then_ends(rig: WorkerRig) -> None:
    idle, busy = await connect(rig.port), await connect(rig.port)
    await idle.stream.send_all(request("GET", "/node/info")[:10])  # half a head: closed at once
    await busy.stream.send_all(request("SUBSCRIBE", "/key/hello", body()))
    [relayed], _ = await rig.frames()
    rig.send(relay.frame(relay.DRAIN))
    assert await idle.at_eof()
    with pytest.raises(OSError):
        await connect(rig.port)  # it no longer listens
    assert not rig.done.is_set()
    rig.send(
        *relay.response_frames(relayed.request_id, True, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    )
    assert (await busy.response())[0] == "HTTP/1.1 200 OK"
    assert await busy.at_eof()
    with trio.fail_after(BOUND):
        await rig.done.wait()


async def test_the_worker_ends_when_the_front_end_does(rig: WorkerRig) -> None:
    client = await connect(rig.port)
    await client.stream.send_all(request("SUBSCRIBE", "/key/hello", body()))
    await rig.frames()
    rig.front.close()
    with trio.fail_after(BOUND):
        await rig.done.wait()
    assert await client.at_eof()


async def test_idle_connections_time_out(rig: WorkerRig, autojump_clock: object) -> None:
    idle, busy = await connect(rig.port), await connect(rig.port)
    await busy.stream.send_all(request("SUBSCRIBE", "/key/hello", body()))
    [relayed], _ = await rig.frames()
    start_time = trio.current_time()
    assert await idle.at_eof(timeout=10 * KEEP_ALIVE_TIMEOUT)
    assert KEEP_ALIVE_TIMEOUT <= trio.current_time() - start_time <= 1.5 * KEEP_ALIVE_TIMEOUT
    rig.send(
        *relay.response_frames(relayed.request_id, False, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    )
    assert (await busy.response())[0] == "HTTP/1.1 200 OK"  # kept while its request was relayed


# -- the proxy with a worker process -------------------------------------------------------------------------


@dataclass
class Proxy:
    dht: MemoryDht
    gateway: RecordingGateway
    service: PushService
    port: int


async def push_proxy(nursery: trio.Nursery, **config: object) -> Proxy:
    dht = MemoryDht()
    gateway = RecordingGateway()
    counts = PushCounts()
    dispatcher = Dispatcher(
        dict.fromkeys(Platform, CountingGateway(gateway, counts)), queue=DeliveryQueue(batch_window=0.001)
    )
    service = PushService(dht, dispatcher)
    for task in (dht.run, dispatcher.run, service.run):
        await nursery.start(task)
    settings = {"host": "127.0.0.1", "port": 0, "http_workers": 1, **config}
    hooks = ProxyPushHooks(service, dispatcher, counts)
    serve = partial(serve_proxy, dht, ProxyConfig(**settings), push=hooks)
    (url,) = await nursery.start(serve)
    return Proxy(dht, gateway, service, int(url.rsplit(":", 1)[1]))


def worker_pids() -> list[int]:
    """This process's HTTP worker processes."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and b"http_worker" in cmdline and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


async def subscribe(
    client: Client, key: str = "hello", **fields: object
) -> tuple[str, dict[str, str], bytes]:
    await client.stream.send_all(request("SUBSCRIBE", f"/key/{key}", body(**fields)))
    return await client.response()


async def node_stats(port: int) -> dict:
    client = await connect(port)
    await client.stream.send_all(request("GET", "/node/stats", close=True))
    return json.loads((await client.response())[2])


pytestmark_linux = pytest.mark.skipif(sys.platform != "linux", reason="HTTP workers are Linux only (epoll)")


@pytestmark_linux
async def test_a_worker_serves_every_route_with_the_front_end(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await push_proxy(nursery)
    assert len(worker_pids()) == 1
    big = [Value(bytes([i]) * 60_000, id=i + 1) for i in range(3)]  # a response longer than a record
    for value in big:
        await proxy.dht.put(KEY, value)
    client = await connect(proxy.port)
    assert (await subscribe(client))[2] == b"{}\n"
    _, headers, content = await subscribe(client)  # again, without refresh: the values
    assert headers["transfer-encoding"] == "chunked"
    assert sorted(json.loads(line)["id"] for line in content.splitlines()) == ["1", "2", "3"]
    # A GET behind it moves the connection to the front end, which serves the rest of it.
    await client.stream.send_all(
        request("GET", f"/key/{KEY.hex()}") + request("GET", "/node/stats") + request("GET", "/node/none")
    )
    assert len((await client.response())[2].splitlines()) == 3
    assert "listenCount" in json.loads((await client.response())[2])
    assert (await client.response())[0] == "HTTP/1.1 404 "  # Quart's: a request of no route moved it there
    assert (await subscribe(client, key="other"))[0] == "HTTP/1.1 200 "  # served there too
    assert len(proxy.service.book) == 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytestmark_linux
async def test_relayed_requests_keep_the_limits(nursery: trio.Nursery) -> None:
    proxy = await push_proxy(
        nursery, max_body=100, rate_limit=RateLimit(per_second=0.001, burst=2, loopback=True)
    )
    client = await connect(proxy.port)
    await client.stream.send_all(request("SUBSCRIBE", "/key/hello", body(key="t" * 100)))
    status, headers, _ = await client.response()
    assert status.startswith("HTTP/1.1 413") and headers["connection"] == "close"
    assert await client.at_eof()
    statuses = []
    for _ in range(2):
        client = await connect(proxy.port)
        statuses.append((await subscribe(client))[0])
    assert statuses == ["HTTP/1.1 200 OK", "HTTP/1.1 429 Too Many Requests"]


@pytestmark_linux
async def test_a_dead_worker_is_replaced(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    proxy = await push_proxy(nursery)
    client = await connect(proxy.port)
    assert (await subscribe(client))[0] == "HTTP/1.1 200 OK"
    [pid] = worker_pids()
    os.kill(pid, signal.SIGKILL)
    assert await client.at_eof()  # its connections end with it
    with trio.fail_after(BOUND):
        while True:
            pids = worker_pids()
            if pids and pids != [pid]:
                break
            await trio.sleep(0.05)
    client = await connect(proxy.port)
    assert (await subscribe(client, key="other"))[0] == "HTTP/1.1 200 OK"
    assert len(proxy.service.book) == 2  # nothing was lost
    assert any("HTTP worker ended" in r.message for r in caplog.records)
    with trio.fail_after(BOUND):
        while (stats := await node_stats(proxy.port))["httpWorkers"]["serving"] != 1:
            await trio.sleep(0.05)
    assert stats["httpWorkers"] == {"serving": 1, "restarts": 1, "droppedHandOvers": 0}


@pytestmark_linux
async def test_a_worker_that_cannot_start_leaves_the_sockets_to_the_front_end(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(
        worker_link, "worker_command", lambda *_: [sys.executable, "-c", "raise SystemExit(3)"]
    )
    proxy = await push_proxy(nursery)
    client = await connect(proxy.port)
    assert (await subscribe(client))[0] == "HTTP/1.1 200 OK"
    assert any("could not start (exit code 3)" in r.message for r in caplog.records)


@pytestmark_linux
async def test_shutdown_drains_the_worker() -> None:
    async with trio.open_nursery() as nursery:
        proxy = await push_proxy(nursery)
        client = await connect(proxy.port)
        assert (await subscribe(client))[0] == "HTTP/1.1 200 OK"
        assert len(worker_pids()) == 1
        nursery.cancel_scope.cancel()
    assert await client.at_eof()
    assert worker_pids() == []


def fake_worker(code: str) -> object:
    """A ``worker_command`` that runs ``code`` with the channel's end as ``channel``."""
    prelude = "import socket, sys, time; channel = socket.socket(fileno=int(sys.argv[1])); "
    return lambda channel_fd, listener_fds, *_: [sys.executable, "-c", prelude + code, str(channel_fd)]


@pytestmark_linux
@pytest.mark.parametrize(
    ("code", "logged"),
    [
        ("channel.send(b'\\x01\\x02'); time.sleep(60)", "sent a bad record"),  # then killed
        ("time.sleep(60)", "did not start within 0.5 s"),
    ],
    ids=["bad-record", "silent"],
)
async def test_a_worker_that_misbehaves_is_stopped(
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    code: str,
    logged: str,
) -> None:
    monkeypatch.setattr(worker_link, "worker_command", fake_worker(code))
    monkeypatch.setattr(worker_link, "STARTUP_TIMEOUT", 0.5)
    monkeypatch.setattr(worker_link, "STOP_TIMEOUT", 0.5)
    proxy = await push_proxy(nursery)
    client = await connect(proxy.port)
    assert (await subscribe(client))[0] == "HTTP/1.1 200 OK"  # served by the front end itself
    messages = [r.message for r in caplog.records]
    assert any(logged in m for m in messages) and any("serving here" in m for m in messages)


@pytestmark_linux
async def test_relayed_subscriptions_count_for_the_client_address(nursery: trio.Nursery) -> None:
    """The worker relays the client's address with each SUBSCRIBE: the per-source cap counts the client."""
    proxy = await push_proxy(nursery)
    assert len(worker_pids()) == 1
    proxy.service.book.per_source = 2
    client = await connect(proxy.port)
    assert (await subscribe(client, client_id="a"))[0] == "HTTP/1.1 200 OK"
    assert (await subscribe(client, client_id="b"))[0] == "HTTP/1.1 200 OK"
    status, _, content = await subscribe(client, client_id="c")
    assert status.startswith("HTTP/1.1 429") and json.loads(content) == {
        "err": "Too many push subscriptions from this address"
    }
    assert (await subscribe(client, client_id="a", refresh=True))[0] == "HTTP/1.1 200 OK"  # a refresh
    assert proxy.service.book.held_by("127.0.0.1") == 2 and proxy.service.book.source_count == 1
    stats = await node_stats(proxy.port)
    assert stats["pushSubscriptions"]["refusedPerSource"] == 1 and stats["pushSubscriptions"]["sources"] == 1
