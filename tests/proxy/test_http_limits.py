"""The budgets of an HTTP connection (trio_dht.proxy.conn_limits): their sans-IO rules, then each one at work
on the front end and in the HTTP worker, with a mock clock for the deadlines."""

from __future__ import annotations

import array
import contextlib
import errno
import json
import socket
from collections.abc import AsyncIterator

import pytest
import trio
from cli_process import read_to_end

from trio_dht.infohash import InfoHash
from trio_dht.limits import Limits
from trio_dht.proxy import ProxyConfig, asgi, connection, relay, serve_proxy
from trio_dht.proxy.conn_limits import AcceptPause, Budgets, Expiry, HttpCounters, PerAddress
from trio_dht.proxy.http_worker import HttpWorker, Settings
from trio_dht.testing.memory_dht import MemoryDht
from trio_dht.value import Value

KEY = InfoHash.get("limits")
INF = float("inf")

# -- the rules (sans-IO) -------------------------------------------------------------------------------------


def test_a_head_deadline_counts_from_its_first_byte() -> None:
    ends = socket.socketpair()
    conn = connection.Connection(ends[0], "127.0.0.1", Budgets(head=10, keep_alive=60))
    conn.wait_for_request(0.0)  # nothing waited for yet: the keep-alive time
    assert (conn.expiry, conn.deadline) == (Expiry.IDLE, 60.0)
    conn.wait_for_request(5.0)  # idle already: the keep-alive runs on
    assert conn.deadline == 60.0
    conn.buffer += b"G"
    conn.wait_for_request(7.0)  # a first byte: the head's deadline
    assert (conn.expiry, conn.deadline) == (Expiry.HEAD, 17.0)
    conn.buffer += b"ET /"
    conn.wait_for_request(9.0)  # more bytes do not move it
    assert conn.deadline == 17.0
    conn.buffer.clear()
    conn.deadline = INF  # the head was read and answered
    conn.wait_for_request(12.0)
    assert (conn.expiry, conn.deadline) == (Expiry.IDLE, 72.0)
    for end in ends:
        end.close()


def test_per_address_counts_ipv4_and_ipv6_per_64() -> None:
    book = PerAddress(2)
    assert book.acquire("10.0.0.1") and book.acquire("::ffff:10.0.0.1")  # IPv4-mapped is the same client
    assert not book.acquire("10.0.0.1") and book.refused == 1
    assert book.acquire("2001:db8::1") and book.acquire("2001:db8::ffff")
    assert not book.acquire("2001:db8::2") and book.acquire("2001:db8:0:1::1")
    assert book.acquire("127.0.0.1") and book.acquire("127.0.0.1") and not book.acquire("127.0.0.1")
    assert book.acquire("127.0.0.2")  # loopback: per address too
    assert book.acquire("not an address") and book.held("not an address") == 0
    book.release("10.0.0.1")
    assert book.held("10.0.0.1") == 1 and book.acquire("10.0.0.1")
    for host in ("10.0.0.1", "10.0.0.1", "10.0.0.1"):  # one release too many does no harm
        book.release(host)
    assert book.held("10.0.0.1") == 0 and "10.0.0.1" not in book._held


def test_accept_pauses_grow_and_the_log_stays_small() -> None:
    pause = AcceptPause()
    error = OSError(errno.EMFILE, "Too many open files")
    delay, line = pause.failed(error, now=0.0)
    assert delay == 0.1 and line is not None and "Too many open files" in line
    delays, lines = [], []
    now = 0.0
    for _ in range(1000):  # 1000 failures in a row, each after its pause
        now += delay
        delay, line = pause.failed(error, now)
        delays.append(delay)
        lines.append(line)
    assert delays[:4] == [0.2, 0.4, 0.8, 1.0] and max(delays) == 1.0
    logged = [line for line in lines if line is not None]
    assert len(logged) <= now / AcceptPause.LOG_EVERY + 1
    assert "such events since the last such line" in logged[0]
    pause.accepted()
    assert pause.failed(error, now + 100)[0] == 0.1 and pause.pauses == 1002


def test_counters_and_budgets() -> None:
    counters = HttpCounters(head_timeouts=1)
    counters.add([1, 2, 3])
    assert counters.as_json()["headTimeouts"] == 2 and counters.as_json()["sendTimeouts"] == 3
    budgets = Budgets.from_limits(Limits(http_head_timeout=2, http_send_timeout=8))
    assert budgets.sweep_interval == 0.5 and budgets.send == 8
    assert Budgets(head=300, body=300, send=300).sweep_interval == Budgets().keep_alive / 4


def test_worker_settings_round_trip() -> None:
    settings = Settings(Budgets(head=2.5, body=3, send=4, send_buffer=5000), 7, b"HTTP/1.1 408 x\r\n\r\n")
    assert Settings.parse(settings.argument()) == settings


# -- the front end (MockClock) -------------------------------------------------------------------------------


async def start(nursery: trio.Nursery, dht: MemoryDht, limits: Limits) -> int:
    config = ProxyConfig(host="127.0.0.1", port=0, limits=limits)
    urls = await nursery.start(serve_proxy, dht, config)
    return int(urls[0].rsplit(":", 1)[1])


async def stats(port: int) -> dict:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET /node/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    response = await read_to_end(stream)
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


LIMITS = Limits(http_head_timeout=10, http_body_timeout=20, http_send_timeout=30)


@pytest.fixture
def dht() -> MemoryDht:
    return MemoryDht()


async def test_a_head_sent_a_byte_at_a_time_is_cut_at_its_deadline(
    nursery: trio.Nursery, dht: MemoryDht, autojump_clock: object
) -> None:
    port = await start(nursery, dht, LIMITS)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    start_time = trio.current_time()
    closed_at = None

    async def trickle() -> None:
        for byte in b"GET /node/info HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
            await trio.sleep(1)
            try:
                await stream.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                return

    async with trio.open_nursery() as inner:
        inner.start_soon(trickle)
        response = await read_to_end(stream)
        closed_at = trio.current_time()
        inner.cancel_scope.cancel()
    assert response.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in response
    assert 10 <= closed_at - start_time <= 1 + 10 + 10 / 4 + 1  # first byte at 1 s, then the sweep's slack
    assert (await stats(port))["http"]["headTimeouts"] == 1


async def test_a_body_that_never_comes_is_cut_at_its_deadline(
    nursery: trio.Nursery, dht: MemoryDht, autojump_clock: object
) -> None:
    port = await start(nursery, dht, LIMITS)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(
        f"POST /key/{KEY.hex()} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{".encode()
    )
    start_time = trio.current_time()
    response = await read_to_end(stream)
    assert response.startswith(b"HTTP/1.1 408 ")
    assert 20 <= trio.current_time() - start_time <= 20 + 20 / 4 + 1
    counts = (await stats(port))["http"]
    assert counts["bodyTimeouts"] == 1 and counts["headTimeouts"] == 0


async def test_idle_keep_alive_is_not_a_head_timeout(
    nursery: trio.Nursery, dht: MemoryDht, autojump_clock: object
) -> None:
    """A connection with no byte of a request waits the keep-alive time, longer than a head's deadline."""
    port = await start(nursery, dht, LIMITS)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET /node/info HTTP/1.1\r\nHost: x\r\n\r\n")
    await stream.receive_some(65536)
    start_time = trio.current_time()
    assert await read_to_end(stream) == b""
    assert trio.current_time() - start_time >= Budgets().keep_alive
    assert (await stats(port))["http"]["headTimeouts"] == 0


async def test_a_get_whose_client_does_not_read_is_cut(
    nursery: trio.Nursery, dht: MemoryDht, autojump_clock: object
) -> None:
    """The response waits ``http_send_timeout`` for a client that does not read, then the connection closes;
    what is held meanwhile is bounded by ``http_send_buffer``."""
    for vid in range(1, 161):  # about 10 MB of JSON: more than the socket buffers take
        await dht.put(KEY, Value(data=bytes([vid]) * 48_000, id=vid))
    port = await start(nursery, dht, Limits(http_send_timeout=30, http_send_buffer=64 << 20))
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(f"GET /key/{KEY.hex()} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await trio.sleep(60)  # past the send deadline and the sweep
    assert (await stats(port))["http"]["sendTimeouts"] == 1
    data = await read_to_end(stream)
    assert not data.endswith(b"\r\n0\r\n\r\n")  # cut, not ended


async def test_a_get_past_the_send_buffer_is_cut(nursery: trio.Nursery, dht: MemoryDht) -> None:
    for vid in range(1, 161):
        await dht.put(KEY, Value(data=bytes([vid]) * 48_000, id=vid))
    port = await start(nursery, dht, Limits(http_send_buffer=1 << 20))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /key/{KEY.hex()} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    with trio.fail_after(5):
        while (await stats(port))["http"]["sendBufferOverflows"] != 1:
            await trio.sleep(0.05)
    sock.close()


async def test_connections_per_address(nursery: trio.Nursery, dht: MemoryDht) -> None:
    port = await start(nursery, dht, Limits(http_connections_per_ip=3))
    held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
    refused = await trio.open_tcp_stream("127.0.0.1", port)  # the kernel accepts it; the server closes it
    with trio.fail_after(5):
        assert await read_to_end(refused) == b""
    await held[0].aclose()
    with trio.fail_after(5):
        while True:  # the closed one is released once its task ends
            again = await trio.open_tcp_stream("127.0.0.1", port)
            await again.send_all(b"GET /node/info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if (await read_to_end(again)).startswith(b"HTTP/1.1 200"):
                break
            await trio.sleep(0.05)
    for stream in held[1:]:
        await stream.aclose()
    with trio.fail_after(5):
        while True:
            try:
                counts = (await stats(port))["http"]
                break
            except json.JSONDecodeError:
                await trio.sleep(0.05)
    assert counts["connectionsRefused"] >= 1


async def test_listens_per_address(nursery: trio.Nursery, dht: MemoryDht) -> None:
    port = await start(nursery, dht, Limits(http_listens_per_ip=2))
    streams = []
    for _ in range(2):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(f"GET /key/{KEY.hex()}/listen HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200")
        streams.append(stream)
    third = await trio.open_tcp_stream("127.0.0.1", port)
    await third.send_all(f"LISTEN /{KEY.hex()} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    response = await read_to_end(third)
    assert response.startswith(b"HTTP/1.1 429 ")
    assert json.loads(response.split(b"\r\n\r\n", 1)[1]) == {
        "err": "Too many listen streams from this address"
    }
    await streams[0].aclose()
    with trio.fail_after(5):
        while dht.listener_count(KEY) != 1:
            await trio.sleep(0.01)
    again = await trio.open_tcp_stream("127.0.0.1", port)
    await again.send_all(f"GET /key/{KEY.hex()}/listen HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert (await again.receive_some(65536)).startswith(b"HTTP/1.1 200")
    doc = await stats(port)
    assert doc["http"]["listensRefused"] == 1 and doc["listenCount"] == 2


# -- the HTTP worker (MockClock) -----------------------------------------------------------------------------


@pytest.fixture
async def worker(nursery: trio.Nursery) -> AsyncIterator[tuple[socket.socket, int]]:
    """A worker task with 10/20/30 s deadlines and 2 connections per address: (the front end's end of its
    channel, its port)."""
    front, theirs = relay.socket_pair()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    settings = Settings(Budgets(head=10, body=20, send=30), 2, b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    nursery.start_soon(HttpWorker(theirs, [listener], settings).run)
    yield front, listener.getsockname()[1]
    front.close()


async def next_frames(front: socket.socket) -> list[relay.Frame]:
    """The frames of the worker's next record (the sockets it carries are closed)."""
    while True:
        try:
            data, ancillary, _, _ = front.recvmsg(1 << 20, socket.CMSG_SPACE(4))
        except BlockingIOError:
            await trio.lowlevel.wait_readable(front)
            continue
        for _, _, raw in ancillary:
            for fd in array.array("i", raw):
                socket.socket(fileno=fd).close()
        return list(relay.frames(data))


async def worker_counts(front: socket.socket) -> HttpCounters:
    """The worker's counts from the next STATS frame it sends."""
    while True:
        for frame in await next_frames(front):
            if frame.kind == relay.STATS:
                counters = HttpCounters()
                counters.add(relay.parse_stats(frame.payload))
                return counters


async def test_the_worker_cuts_a_slow_head_and_a_missing_body(
    worker: tuple[socket.socket, int], autojump_clock: object
) -> None:
    front, port = worker
    head = await trio.open_tcp_stream("127.0.0.1", port)
    body = await trio.open_tcp_stream("127.0.0.1", port)
    start_time = trio.current_time()
    await body.send_all(
        f"SUBSCRIBE /key/{KEY.hex()} HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{{".encode()
    )

    async def trickle() -> None:
        for byte in b"SUBSCRIBE /key/" + b"a" * 100:
            await trio.sleep(1)
            try:
                await head.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                return

    async with trio.open_nursery() as inner:
        inner.start_soon(trickle)
        assert (await read_to_end(head)).startswith(b"HTTP/1.1 408")
        assert 10 <= trio.current_time() - start_time <= 1 + 10 + 10 / 4 + 1
        inner.cancel_scope.cancel()
    assert (await read_to_end(body)).startswith(b"HTTP/1.1 408")
    assert 20 <= trio.current_time() - start_time <= 20 + 10 / 4 + 1
    counts = await worker_counts(front)
    while counts.body_timeouts < 1:
        counts = await worker_counts(front)
    assert counts.head_timeouts == 1 and counts.body_timeouts == 1


async def test_the_worker_caps_connections_per_address(
    worker: tuple[socket.socket, int], autojump_clock: object
) -> None:
    """Two per address; a connection handed over to the front end is no longer the worker's to count."""
    front, port = worker
    held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
    refused = await trio.open_tcp_stream("127.0.0.1", port)
    assert await read_to_end(refused) == b""
    assert (await worker_counts(front)).connections_refused == 1
    await held[0].send_all(b"GET /node/info HTTP/1.1\r\nHost: x\r\n\r\n")
    while not any(frame.kind == relay.HAND_OVER for frame in await next_frames(front)):
        pass
    third = await trio.open_tcp_stream("127.0.0.1", port)
    await third.send_all(
        f"SUBSCRIBE /key/{KEY.hex()} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}".encode()
    )
    while not any(frame.kind == relay.RELAY for frame in await next_frames(front)):
        pass  # accepted and read: relayed
    await held[1].aclose()
    await third.aclose()


# -- connections hypercorn serves ----------------------------------------------------------------------------


async def test_hypercorn_connections_have_the_deadlines_too(
    nursery: trio.Nursery, dht: MemoryDht, autojump_clock: object
) -> None:
    """After a request the front end hands over (a chunked body), the connection is hypercorn's: a head begun
    and not ended gets a 408 within the head deadline (hypercorn's keep-alive wait), a body that never comes
    one within the body deadline."""
    chunked = b"Transfer-Encoding: chunked\r\n\r\n"
    port = await start(nursery, dht, LIMITS)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET /node/stats HTTP/1.1\r\nHost: x\r\n" + chunked + b"0\r\n\r\n")
    await trio.sleep(1)
    await stream.send_all(b"GET /node/stats HTTP/1.1\r\nHost:")
    start_time = trio.current_time()
    first, _, last = (await read_to_end(stream)).partition(b"HTTP/1.1 408")
    assert first.startswith(b"HTTP/1.1 200") and last
    assert trio.current_time() - start_time <= LIMITS.http_head_timeout + 1
    body = await trio.open_tcp_stream("127.0.0.1", port)
    await body.send_all(b"POST /node/pingPush HTTP/1.1\r\nHost: x\r\n" + chunked + b"64\r\n{")
    start_time = trio.current_time()
    assert (await read_to_end(body)).startswith(b"HTTP/1.1 408")
    assert LIMITS.http_body_timeout <= trio.current_time() - start_time <= LIMITS.http_body_timeout + 1
    counts = (await stats(port))["http"]
    assert counts["headTimeouts"] == 1 and counts["bodyTimeouts"] == 1


async def test_a_hypercorn_response_the_client_does_not_take_is_cut(
    nursery: trio.Nursery, dht: MemoryDht, autojump_clock: object
) -> None:
    for vid in range(1, 161):
        await dht.put(KEY, Value(data=bytes([vid]) * 48_000, id=vid))
    port = await start(nursery, dht, LIMITS)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    chunked = b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"  # unusual: hypercorn serves it
    await stream.send_all(f"GET /key/{KEY.hex()} HTTP/1.1\r\nHost: x\r\n".encode() + chunked)
    await trio.sleep(60)
    assert (await stats(port))["http"]["sendTimeouts"] == 1
    assert not (await read_to_end(stream)).endswith(b"\r\n0\r\n\r\n")


@pytest.mark.parametrize("quart", [False, True], ids=["raw-asgi", "quart"])
async def test_concurrent_listens_through_hypercorn_hold_the_cap(
    nursery: trio.Nursery, dht: MemoryDht, quart: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listens that hypercorn serves (a chunked request is handed over: the raw-ASGI path; or Quart's view of
    the route), five at once on a cap of 3: three streams, two 429s; once the three end, three may
    open again and no more (the count did not drift)."""
    if quart:
        monkeypatch.setattr(asgi, "match", lambda *args, **kwargs: None)  # every request to the Quart app
    config = ProxyConfig(host="127.0.0.1", port=0, limits=Limits(http_listens_per_ip=3))
    port = int((await nursery.start(serve_proxy, dht, config))[0].rsplit(":", 1)[1])
    request = f"GET /key/{KEY.hex()}/listen HTTP/1.1\r\nHost: x\r\n".encode()
    request += b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"

    async def burst() -> tuple[list[trio.SocketStream], int]:
        streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(5)]
        heads: list[bytes] = []

        async def one(stream: trio.SocketStream) -> None:
            await stream.send_all(request)
            heads.append(await stream.receive_some(65536))

        async with trio.open_nursery() as inner:
            for stream in streams:
                inner.start_soon(one, stream)
        assert sum(h.startswith(b"HTTP/1.1 200") for h in heads) == 3
        return streams, sum(h.startswith(b"HTTP/1.1 429") for h in heads)

    with trio.fail_after(10):
        streams, refused = await burst()
        assert refused == 2 and dht.listener_count(KEY) == 3
        for stream in streams:
            await stream.aclose()
        while dht.listener_count(KEY):
            await trio.sleep(0.01)
        streams, refused = await burst()
        assert refused == 2 and dht.listener_count(KEY) == 3
    doc = await stats(port)
    assert doc["http"]["listensRefused"] == 4 and doc["listenCount"] == 3


async def test_a_blocked_channel_keeps_hand_overs_counted_bounded_and_aged(
    nursery: trio.Nursery, autojump_clock: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the front end does not read its channel, a hand-over waiting in the worker still counts for its
    address; at MAX_HANDING_OVER the listeners are not watched; past the head deadline it is closed
    (``handOversDropped``)."""
    from trio_dht.proxy import http_worker

    monkeypatch.setattr(http_worker, "MAX_HANDING_OVER", 2)
    front, theirs = relay.socket_pair()
    with contextlib.suppress(BlockingIOError):  # the channel is full: the front end does not read
        while True:
            theirs.send(relay.frame(relay.READY))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    settings = Settings(Budgets(head=10, body=20, send=30), 2, b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    worker = HttpWorker(theirs, [listener], settings)
    nursery.start_soon(worker.run)
    handed = []
    for _ in range(2):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /node/info HTTP/1.1\r\nHost: x\r\n\r\n")  # handed over
        handed.append(stream)
        await trio.sleep(1)
    assert worker._handing_over == 2 and not worker._listening and not worker._clients
    assert worker._per_address.held("127.0.0.1") == 2  # counted until the front end has them
    start_time = trio.current_time()
    for stream in handed:
        assert await read_to_end(stream) == b""  # closed, never answered
    assert trio.current_time() - start_time <= 10 + 10 / 4 + 1
    assert worker._handing_over == 0 and worker._listening and worker._per_address.held("127.0.0.1") == 0
    counts = await worker_counts(front)
    while counts.hand_overs_dropped < 2:
        counts = await worker_counts(front)
    front.close()


def test_accept_errors_skip_or_pause_never_raise() -> None:
    pause = AcceptPause()
    assert pause.after(OSError(errno.ECONNABORTED, "aborted"), 0.0) == 0.0 and pause.pauses == 0
    assert pause.after(OSError(errno.EMFILE, "too many"), 0.0) == 0.1
    assert pause.after(OSError(errno.EINVAL, "unexpected"), 0.0) == 0.2  # unknown: a pause, not a spin
    assert pause.pauses == 2


async def test_an_accept_path_error_releases_the_address(
    nursery: trio.Nursery, dht: MemoryDht, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection whose setsockopt fails is closed without holding its address's count, and the accept loop
    goes on."""
    port = await start(nursery, dht, Limits(http_connections_per_ip=1))
    real = socket.socket.setsockopt
    failures = [OSError(errno.EINVAL, "gone")]

    def setsockopt(self: socket.socket, *args: object) -> None:
        if args[:2] == (socket.IPPROTO_TCP, socket.TCP_NODELAY) and failures:
            raise failures.pop()
        real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "setsockopt", setsockopt)
    first = await trio.open_tcp_stream("127.0.0.1", port)
    assert await read_to_end(first) == b""
    monkeypatch.undo()
    doc = await stats(port)  # the same address: admitted
    assert doc["http"]["connectionsRefused"] == 0
