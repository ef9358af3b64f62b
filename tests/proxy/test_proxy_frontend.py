"""The plain-HTTP front end: its narrow HTTP/1.1 reader; the route table served beside hypercorn."""

from __future__ import annotations

import json
import socket
import struct

import pytest
import trio

from trio_dht.infohash import InfoHash
from trio_dht.limits import Limits
from trio_dht.proxy import ProxyConfig, RateLimit, connection, frontend, serve_proxy
from trio_dht.proxy.http1 import KEEP_ALIVE_TIMEOUT, UNUSUAL, Head, Writer, chunk, read_head
from trio_dht.proxy.replies import BASE_HEADERS
from trio_dht.rest.paths import Route, match, served_routes
from trio_dht.testing.memory_dht import MemoryDht
from trio_dht.value import Value

BOUND = 5.0
"""Safety bound on every wait (not a timing assertion)."""
KEY = InfoHash.get("front")


# -- the reader (sans-IO) ------------------------------------------------------------------------------------


def test_reads_a_plain_get() -> None:
    head = read_head(b"GET /node/info HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\nNEXT")
    assert head == Head("GET", b"/node/info", 49, 0, False)


def test_reads_a_post_with_length_and_close() -> None:
    raw = b"POST /key/abc HTTP/1.1\r\nhost: x\r\nContent-Length:  12 \r\nCONNECTION: Close\r\n\r\n"
    head = read_head(raw + b'{"data":"x"}')
    assert head == Head("POST", b"/key/abc", len(raw), 12, True)


def test_incomplete_head_waits() -> None:
    assert read_head(b"GET / HTTP/1.1\r\nHost: x\r\n") is None
    assert read_head(b"") is None


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -3\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: x\r\n\r\n",
        b"GET / HTTP/1.1\nHost: x\n\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
        b"G\xc3T / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: " + b"a" * 20000,
    ],
)
def test_anything_unusual_is_left_to_hypercorn(raw: bytes) -> None:
    assert read_head(raw) is UNUSUAL


def test_writer() -> None:
    writer = Writer(BASE_HEADERS)
    reply = writer.reply(200, b"{}\n", (("X-A", "1"),), close=True)
    assert reply == (
        b"HTTP/1.1 200 OK\r\nServer: trio-dht\r\nContent-Type: application/json\r\n"
        b"Access-Control-Allow-Origin: *\r\nX-A: 1\r\nConnection: close\r\nContent-Length: 3\r\n\r\n{}\n"
    )
    assert writer.stream_head().endswith(b"Transfer-Encoding: chunked\r\n\r\n")
    assert chunk(b"abc") == b"3\r\nabc\r\n"


H = KEY.hex()


@pytest.mark.parametrize(
    ("method", "target", "push", "handler"),
    [
        ("GET", f"/key/{H}", False, "get"),
        ("POST", f"/{H}", False, "put"),
        ("GET", f"/key/{H}/listen", False, "listen"),
        ("GET", "/KEY/front/listen/", False, "listen"),
        ("LISTEN", f"/{H}", False, "listen"),
        ("LISTEN", "/front", False, "listen"),
        ("LISTEN", f"/key/{H}", False, None),  # Quart's 405, as before
        ("POST", f"/key/{H}/listen", False, None),
        ("GET", f"/{H}/listen", False, None),
        ("SUBSCRIBE", f"/key/{H}", False, None),
        ("SUBSCRIBE", f"/key/{H}", True, "subscribe"),
        ("GET", "/node/info", False, "node_info"),
        ("GET", "/node/stats", False, "node_stats"),
        ("OPTIONS", f"/key/{H}/listen", False, "options"),
        ("GET", f"/KEY/{H}/Options/", False, "options"),
        ("POST", "/node/pingpush", False, "ping_push"),
        ("GET", "/node/pingPush", False, None),
    ],
)
def test_routes(method: str, target: str, push: bool, handler: str | None) -> None:
    route = match(method, target.encode(), served_routes(push=push))
    if handler is None:
        assert route is None
    else:
        assert route is not None and route[0] is Route[handler.upper()]
        assert route[1] == (None if handler.startswith(("node_", "ping_")) else KEY)


# -- the front end on a socket -------------------------------------------------------------------------------


@pytest.fixture
def dht() -> MemoryDht:
    return MemoryDht()


async def start(nursery: trio.Nursery, dht: MemoryDht, **config: object) -> int:
    urls = await nursery.start(serve_proxy, dht, ProxyConfig(host="127.0.0.1", port=0, **config))
    return int(urls[0].rsplit(":", 1)[1])


class Client:
    """One raw connection that reads whole responses (Content-Length or chunked)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def _more(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError
        self.buffer += data

    async def response(self) -> tuple[str, dict[str, str], bytes]:
        with trio.fail_after(BOUND):
            while b"\r\n\r\n" not in self.buffer:
                await self._more()
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            status, *lines = head.decode("latin-1").split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
            if "content-length" in headers:
                size = int(headers["content-length"])
                while len(self.buffer) < size:
                    await self._more()
                body, self.buffer = self.buffer[:size], self.buffer[size:]
                return status, headers, body
            body = b""
            while True:
                while b"\r\n" not in self.buffer:
                    await self._more()
                size_line, rest = self.buffer.split(b"\r\n", 1)
                size = int(size_line, 16)
                while len(rest) < size + 2:
                    await self._more()
                    rest = self.buffer.split(b"\r\n", 1)[1]
                body += rest[:size]
                self.buffer = rest[size + 2 :]
                if size == 0:
                    return status, headers, body

    async def at_eof(self, timeout: float = BOUND) -> bool:
        with trio.fail_after(timeout):
            try:
                while True:
                    await self._more()
            except EOFError:
                return True


async def connect(port: int) -> Client:
    return Client(await trio.open_tcp_stream("127.0.0.1", port))


async def test_keep_alive_then_hand_over_to_hypercorn(nursery: trio.Nursery, dht: MemoryDht) -> None:
    await dht.put(KEY, Value(data=b"v", id=7))
    client = await connect(await start(nursery, dht))
    for _ in range(3):
        await client.stream.send_all(b"GET /node/info HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = await client.response()
        assert status == "HTTP/1.1 200 OK" and json.loads(body)["public_ip"] == "127.0.0.1"
        assert headers["server"] == "trio-dht"
    await client.stream.send_all(f"GET /key/{KEY.hex()} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status, headers, body = await client.response()
    assert headers["transfer-encoding"] == "chunked" and json.loads(body)["id"] == "7"
    # A route of Quart's: the connection goes to hypercorn, which serves the rest of it.
    await client.stream.send_all(b"GET /node/stats HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = await client.response()
    assert status.startswith("HTTP/1.1 200") and "listenCount" in json.loads(body)
    await client.stream.send_all(b"GET /node/info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, _, body = await client.response()
    assert status.startswith("HTTP/1.1 200") and json.loads(body)["node_id"] == dht.node_id.hex()
    assert await client.at_eof()


async def test_pipelined_requests_and_a_body_in_pieces(nursery: trio.Nursery, dht: MemoryDht) -> None:
    client = await connect(await start(nursery, dht))
    post = f"POST /key/{KEY.hex()} HTTP/1.1\r\nHost: x\r\nContent-Length: 24\r\n\r\n".encode()
    await client.stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + post + b'{"data":"aGk=",')
    status, _, body = await client.response()
    assert status == "HTTP/1.1 200 OK" and "node_id" in json.loads(body)
    await trio.sleep(0.05)
    await client.stream.send_all(b'"id":"5"}' + b"GET /node/info HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await client.response()
    assert status == "HTTP/1.1 200 OK" and json.loads(body) == {"data": "aGk=", "id": "5", "type": 0}
    status, _, body = await client.response()
    assert "node_id" in json.loads(body)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /node/info HTTP/1.0\r\n\r\n", "HTTP/1.1 200"),
        (
            b"POST /key/k HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n"
            b"Connection: close\r\n\r\n{}",
            "",
        ),
        (b"GET /node/info HTTP/1.1\r\nBad Header\r\n\r\n", "HTTP/1.1 400"),
        (
            b"SUBSCRIBE /key/k HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
            "HTTP/1.1 405",
        ),
    ],
    ids=["http10", "expect", "malformed", "other-method"],
)
async def test_unusual_requests_get_hypercorns_answer(
    nursery: trio.Nursery, dht: MemoryDht, request_bytes: bytes, status: str
) -> None:
    client = await connect(await start(nursery, dht))
    await client.stream.send_all(request_bytes)
    with trio.fail_after(BOUND):
        while b"\r\n\r\n" not in client.buffer:
            await client._more()
    if status:
        assert client.buffer.startswith(status.encode())
    else:  # Expect: 100-continue: hypercorn's h11 answers the interim 100, then the put
        assert client.buffer.startswith(b"HTTP/1.1 100") or client.buffer.startswith(b"HTTP/1.1 200")


async def test_body_over_the_limit(nursery: trio.Nursery, dht: MemoryDht) -> None:
    client = await connect(await start(nursery, dht, max_body=100))
    await client.stream.send_all(b"POST /key/k HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n")
    status, headers, _ = await client.response()
    assert status.startswith("HTTP/1.1 413") and headers["connection"] == "close"
    assert await client.at_eof()


async def test_rate_limit(nursery: trio.Nursery, dht: MemoryDht) -> None:
    port = await start(nursery, dht, rate_limit=RateLimit(per_second=0.001, burst=2, loopback=True))
    statuses = []
    for _ in range(3):
        client = await connect(port)
        await client.stream.send_all(b"GET /node/info HTTP/1.1\r\nHost: x\r\n\r\n")
        statuses.append((await client.response())[0])
    assert statuses == ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK", "HTTP/1.1 429 Too Many Requests"]


async def test_shutdown_closes_idle_connections(dht: MemoryDht) -> None:
    async with trio.open_nursery() as nursery:
        port = await start(nursery, dht)
        client = await connect(port)
        await client.stream.send_all(b"GET /node/info HTTP/1.1\r\nHost: x\r\n\r\n")
        await client.response()
        nursery.cancel_scope.cancel()
    assert await client.at_eof()


async def test_idle_connections_time_out(
    nursery: trio.Nursery, dht: MemoryDht, autojump_clock: object
) -> None:
    client = await connect(await start(nursery, dht))
    await client.stream.send_all(b"GET /node/info HTTP/1.1\r\nHost: x\r\n\r\n")
    await client.response()
    start_time = trio.current_time()
    assert await client.at_eof(timeout=10 * KEEP_ALIVE_TIMEOUT)
    assert KEEP_ALIVE_TIMEOUT <= trio.current_time() - start_time <= 1.5 * KEEP_ALIVE_TIMEOUT


class SlowGetDht(MemoryDht):
    """A DHT whose get reports the first value at once, the others on ``more``, and ends on ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.more = trio.Event()
        self.release = trio.Event()
        self.cancelled = trio.Event()

    async def get(self, key, query=None, *, on_values=None):  # type: ignore[no-untyped-def]
        values = self.values(key, query)
        assert on_values is not None
        try:
            on_values(values[:1])
            await self.more.wait()
            on_values(values)
            await self.release.wait()
        except trio.Cancelled:
            self.cancelled.set()
            raise
        return values


async def test_get_streams_values_as_they_are_found(nursery: trio.Nursery) -> None:
    dht = SlowGetDht()
    await dht.put(KEY, Value(data=b"a", id=1))
    await dht.put(KEY, Value(data=b"b", id=2))
    client = await connect(await start(nursery, dht))
    await client.stream.send_all(f"GET /{KEY.hex()} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    with trio.fail_after(BOUND):  # the head and the first value arrive while the get still runs
        while b'"id":"1"' not in client.buffer:
            await client._more()
    dht.more.set()
    with trio.fail_after(BOUND):
        while b'"id":"2"' not in client.buffer:
            await client._more()
    assert b"\r\n0\r\n\r\n" not in client.buffer
    dht.release.set()
    status, headers, body = await client.response()
    assert status == "HTTP/1.1 200 OK" and headers["transfer-encoding"] == "chunked"
    assert [json.loads(line)["id"] for line in body.splitlines()] == ["1", "2"]  # each value once


async def test_a_client_gone_mid_get_cancels_it(nursery: trio.Nursery) -> None:
    dht = SlowGetDht()
    await dht.put(KEY, Value(data=b"a", id=1))
    await dht.put(KEY, Value(data=b"b", id=2))
    client = await connect(await start(nursery, dht))
    await client.stream.send_all(f"GET /key/{KEY.hex()} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    with trio.fail_after(BOUND):
        while b'"id":"1"' not in client.buffer:
            await client._more()
    client.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await client.stream.aclose()  # a reset: the next value cannot be written
    await trio.sleep(0.05)
    dht.more.set()
    with trio.fail_after(BOUND):
        await dht.cancelled.wait()


# -- the poller: requests answered without waking the connection's task -------------------------------------


async def test_a_head_in_pieces_and_close(nursery: trio.Nursery, dht: MemoryDht) -> None:
    client = await connect(await start(nursery, dht))
    await client.stream.send_all(b"GET /node/in")
    await trio.sleep(0.05)
    await client.stream.send_all(b"fo HTTP/1.1\r\nHost: x\r\n")
    await trio.sleep(0.05)
    await client.stream.send_all(
        b"\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    status, headers, body = await client.response()
    assert status == "HTTP/1.1 200 OK" and "connection" not in headers and "node_id" in json.loads(body)
    status, headers, body = await client.response()
    assert status == "HTTP/1.1 200 OK" and headers["connection"] == "close" and "node_id" in json.loads(body)
    assert await client.at_eof()  # the request after the close is not answered
    assert client.buffer == b""


async def test_replies_to_a_half_closed_connection(nursery: trio.Nursery, dht: MemoryDht) -> None:
    port = await start(nursery, dht)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /node/info HTTP/1.1\r\nHost: x\r\n\r\n" * 2)  # the requests and the end come together
    sock.shutdown(socket.SHUT_WR)
    sock.setblocking(False)
    client = Client(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
    for _ in range(2):
        status, _, body = await client.response()
        assert status == "HTTP/1.1 200 OK" and "node_id" in json.loads(body)
    assert await client.at_eof()


async def test_pipelined_replies_the_socket_takes_in_part(
    nursery: trio.Nursery, dht: MemoryDht, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replies the socket does not take at once are finished by the connection's task, in order, with GETs
    between them; a long run of pipelined requests is answered in turns.
    """
    send_now = connection.Connection.send_now

    def send_some(conn: connection.Connection, data: bytes) -> bytes:  # as a full socket buffer does
        return send_now(conn, data[:100]) + data[100:]

    monkeypatch.setattr(connection.Connection, "send_now", send_some)
    await dht.put(KEY, Value(data=b"v", id=7))
    client = await connect(await start(nursery, dht))
    info = b"GET /node/info HTTP/1.1\r\nHost: x\r\n\r\n"
    get = f"GET /key/{KEY.hex()} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    requests = [get if i in (5, 95) else info for i in range(100)]  # runs over ANSWERS_PER_TURN too
    await client.stream.send_all(b"".join(requests))
    for request in requests:
        status, headers, body = await client.response()
        assert status == "HTTP/1.1 200 OK"
        if request is get:
            assert headers["transfer-encoding"] == "chunked" and json.loads(body)["id"] == "7"
        else:
            assert "node_id" in json.loads(body)


async def test_node_info_is_cached_for_a_second(
    nursery: trio.Nursery, dht: MemoryDht, autojump_clock: object
) -> None:
    client = await connect(await start(nursery, dht))
    request = b"GET /node/info HTTP/1.1\r\nHost: x\r\n\r\n"
    await client.stream.send_all(request)
    assert json.loads((await client.response())[2])["ipv4"]["good"] == 8
    dht.good_nodes = 3
    await client.stream.send_all(request)
    assert json.loads((await client.response())[2])["ipv4"]["good"] == 8  # as OpenDHT's (2 minutes there)
    await trio.sleep(1.0)
    await client.stream.send_all(request)
    assert json.loads((await client.response())[2])["ipv4"]["good"] == 3
    other = await connect(await start(nursery, dht, node_info_cache=0))
    dht.good_nodes = 4
    await other.stream.send_all(request)
    assert json.loads((await other.response())[2])["ipv4"]["good"] == 4
    dht.good_nodes = 5
    await other.stream.send_all(request)
    assert json.loads((await other.response())[2])["ipv4"]["good"] == 5


# -- listen streams ------------------------------------------------------------------------------------------


async def read_until(client: Client, needle: bytes) -> None:
    with trio.fail_after(BOUND):
        while needle not in client.buffer:
            await client._more()


async def wait_for_no_listener(dht: MemoryDht) -> None:
    with trio.fail_after(BOUND):
        while dht.listener_count():
            await trio.sleep(0.01)


@pytest.mark.parametrize(
    "request_line", [f"GET /key/{KEY.hex()}/listen", f"LISTEN /{KEY.hex()}", "GET /KEY/front/Listen/"]
)
@pytest.mark.parametrize("end", ["half-close", "close"])
async def test_listen_is_served_by_the_front_end(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, request_line: str, end: str
) -> None:
    """Stored values, new ones and expirations as chunks; the client's end (even a half-close) cancels the
    listen; no hand-over to hypercorn.
    """

    async def no_hand_over(*args: object, **kwargs: object) -> None:
        raise AssertionError("handed over to hypercorn")

    monkeypatch.setattr(frontend.FrontEnd, "_hand_over", no_hand_over)
    dht = MemoryDht(lifetime=lambda value: 0.2 if value.type == 5 else 600.0)
    await nursery.start(dht.run)
    await dht.put(KEY, Value(data=b"old", id=1))
    port = await start(nursery, dht)
    client = await connect(port)
    await client.stream.send_all(f"{request_line} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await read_until(client, b'"id":"1"')
    head, body = client.buffer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nTransfer-Encoding: chunked" in head
    assert b"\r\nAccess-Control-Allow-Origin: *" in head and b"\r\nContent-Type: application/json" in head
    assert body == chunk(b'{"data":"b2xk","id":"1","type":0}\n')
    client.buffer = b""
    await dht.put(KEY, Value(data=b"new", id=2, type=5))
    await read_until(client, b'"expired":true')
    assert client.buffer == chunk(b'{"data":"bmV3","id":"2","type":5}\n') + chunk(
        b'{"data":"bmV3","expired":true,"id":"2","type":5}\n'
    )
    assert dht.listener_count(KEY) == 1
    if end == "half-close":
        await client.stream.send_eof()
    else:
        await client.stream.aclose()
    await wait_for_no_listener(dht)
    if end == "half-close":
        assert await client.at_eof()


async def test_listen_count_and_a_listen_that_others_share(nursery: trio.Nursery, dht: MemoryDht) -> None:
    port = await start(nursery, dht)
    clients = [await connect(port) for _ in range(3)]
    for client in clients:
        await client.stream.send_all(f"GET /key/{KEY.hex()}/listen HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await read_until(client, b"\r\n\r\n")
    stats = await connect(port)
    await stats.stream.send_all(b"GET /node/stats HTTP/1.1\r\nHost: x\r\n\r\n")
    assert json.loads((await stats.response())[2])["listenCount"] == 3
    value = Value(data=b"all", id=5)
    await dht.put(KEY, value)
    for client in clients:
        await read_until(client, b'"id":"5"')
    assert value._json is not None  # encoded once, for all three
    for client in clients:
        await client.stream.aclose()
    await wait_for_no_listener(dht)
    await stats.stream.send_all(b"GET /node/stats HTTP/1.1\r\nHost: x\r\n\r\n")
    assert json.loads((await stats.response())[2])["listenCount"] == 0


async def test_a_listen_whose_client_does_not_read_is_cut(nursery: trio.Nursery, dht: MemoryDht) -> None:
    """Past Limits.http_send_buffer bytes held (beyond what the socket took), the stream ends: bounded memory
    (counted)."""
    port = await start(nursery, dht, limits=Limits(http_send_buffer=200_000))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /key/{KEY.hex()}/listen HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    with trio.fail_after(BOUND):
        while not dht.listener_count():
            await trio.sleep(0.01)
    big = b"x" * 50_000
    for vid in range(1, 1000):
        await dht.put(KEY, Value(data=big, id=vid))
        if not dht.listener_count():
            break
        await trio.sleep(0)
    assert dht.listener_count() == 0 and vid < 1000
    sock.setblocking(False)
    client = Client(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
    with pytest.raises((EOFError, trio.BrokenResourceError)), trio.fail_after(BOUND):  # cut, no last chunk
        while True:
            await client._more()
            if client.buffer.endswith(b"\r\n0\r\n\r\n"):
                raise AssertionError("the stream ended cleanly")
            client.buffer = client.buffer[-16:]
