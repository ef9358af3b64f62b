"""The lean keep-alive HTTP/1.1 client the gorush gateway posts through, against scripted raw servers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

import httpx
import pytest
import trio

from trio_dht.push import keepalive
from trio_dht.push.gateway import ReplyTooLarge
from trio_dht.push.keepalive import KeepAliveClient

Handler = Callable[[trio.SocketStream, int], Awaitable[None]]


async def read_request(stream: trio.SocketStream, buffer: bytearray) -> tuple[bytes, bytes] | None:
    """One request (head, body) from the connection, or None at its end."""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data
    end = buffer.index(b"\r\n\r\n")
    head = bytes(buffer[:end])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(buffer) < end + 4 + length:
        buffer += await stream.receive_some(65536)
    body = bytes(buffer[end + 4 : end + 4 + length])
    del buffer[: end + 4 + length]
    return head, body


async def serve(nursery: trio.Nursery, handler: Handler) -> tuple[str, list[int]]:
    """A loopback server calling ``handler(stream, connection number)``; its URL and the connections'
    request counts."""
    counts: list[int] = []

    async def connection(stream: trio.SocketStream) -> None:
        counts.append(0)
        await handler(stream, len(counts) - 1)

    listeners = await nursery.start(partial(trio.serve_tcp, connection, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}", counts


def replying(*replies: bytes) -> Handler:
    """A handler answering each request on a connection with the next reply, then waiting for the next."""

    async def handler(stream: trio.SocketStream, _: int) -> None:
        buffer = bytearray()
        for reply in replies:
            if await read_request(stream, buffer) is None:
                return
            await stream.send_all(reply)
        await stream.aclose()

    return handler


def client(url: str, timeout: float = 5.0) -> KeepAliveClient:
    return KeepAliveClient(url, timeout=timeout, user_agent="test-agent")


OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


async def test_post_writes_one_request_and_reuses_the_connection():
    seen: list[bytes] = []

    async def handler(stream: trio.SocketStream, _: int) -> None:
        buffer = bytearray()
        while (request := await read_request(stream, buffer)) is not None:
            seen.append(request[0] + b"\r\n\r\n" + request[1])
            await stream.send_all(OK)

    async with trio.open_nursery() as nursery:
        url, counts = await serve(nursery, handler)
        http = client(url + "/base")
        for _ in range(3):
            response = await http.post("/api/push", b'{"n":1}', "application/json")
            assert response.status_code == 200 and response.json() == {"ok": True}
            assert response.headers["content-type"] == "application/json"
        assert len(counts) == 1  # one connection for the three requests
        host = url.removeprefix("http://")
        assert (
            seen[0]
            == (
                f"POST /api/push HTTP/1.1\r\nHost: {host}\r\nUser-Agent: test-agent\r\nAccept: */*\r\n"
                'Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{"n":1}'
            ).encode()
        )
        http.close()
        nursery.cancel_scope.cancel()


async def test_chunked_interim_and_until_close_replies():
    chunked = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\nRetry-After: 2\r\n\r\n"
        b"4;ext=1\r\nbusy\r\n3\r\n!!!\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )
    until_close = b"HTTP/1.0 200 OK\r\n\r\nall of it"
    async with trio.open_nursery() as nursery:
        url, counts = await serve(nursery, replying(chunked, until_close))
        http = client(url)
        response = await http.post("/", b"x", "text/plain")
        assert response.status_code == 503 and response.content == b"busy!!!"
        assert response.headers["retry-after"] == "2"
        response = await http.post("/", b"y", "text/plain")
        assert response.status_code == 200 and response.content == b"all of it"
        assert len(counts) == 1
        await http.post("/", b"z", "text/plain")  # the until-close reply ended that connection
        assert len(counts) == 2
        http.close()
        nursery.cancel_scope.cancel()


async def test_connection_close_and_a_server_closed_idle_connection_open_new_ones():
    closing = b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
    async with trio.open_nursery() as nursery:
        url, counts = await serve(nursery, replying(closing))
        http = client(url)
        assert (await http.post("/", b"", "text/plain")).status_code == 204
        assert (await http.post("/", b"", "text/plain")).status_code == 204
        assert len(counts) == 2
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        url, counts = await serve(nursery, replying(OK))  # answers once, then closes the connection
        http = client(url)
        await http.post("/", b"", "text/plain")
        await trio.sleep(0.05)  # the server's close reaches us while the connection is idle
        assert (await http.post("/", b"", "text/plain")).status_code == 200
        assert len(counts) == 2
        http.close()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "reply",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
async def test_bad_replies_are_protocol_errors(reply):
    async with trio.open_nursery() as nursery:
        url, _ = await serve(nursery, replying(reply))
        with pytest.raises(httpx.RemoteProtocolError):
            await client(url).post("/", b"", "text/plain")
        nursery.cancel_scope.cancel()


async def test_unreachable_and_silent_servers_are_transport_errors(autojump_clock):
    async with trio.open_nursery() as nursery:
        url, _ = await serve(nursery, replying())
        nursery.cancel_scope.cancel()
    with pytest.raises(httpx.TransportError):  # nothing listens there any more
        await client(url).post("/", b"", "text/plain")

    async def silent(stream: trio.SocketStream, _: int) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        url, _ = await serve(nursery, silent)
        with pytest.raises(httpx.ReadTimeout):
            await client(url, timeout=15).post("/", b"", "text/plain")
        nursery.cancel_scope.cancel()


def test_only_plain_http_urls():
    with pytest.raises(ValueError):
        client("https://gorush.example")


async def test_a_trickling_reply_hits_the_deadline_of_the_whole_request(autojump_clock):
    async def trickle(stream: trio.SocketStream, _: int) -> None:
        await read_request(stream, bytearray())
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000:
            await stream.send_all(bytes([byte]))
            await trio.sleep(1)  # well within any per-read timeout

    async with trio.open_nursery() as nursery:
        url, _ = await serve(nursery, trickle)
        start = trio.current_time()
        with pytest.raises(httpx.ReadTimeout):
            await client(url, timeout=10).post("/", b"", "text/plain")
        assert trio.current_time() - start == pytest.approx(10, abs=0.1)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n",  # refused before reading any of it
        b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\nRetry-After: 5\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\n",  # framed by the connection's end
    ],
)
async def test_a_body_over_the_cap_is_not_read_and_the_connection_not_reused(head):
    sent: list[int] = []

    async def huge(stream: trio.SocketStream, _: int) -> None:
        await read_request(stream, bytearray())
        await stream.send_all(head)
        chunked = b"chunked" in head
        try:
            for _ in range(3200):  # up to 200 MiB, as long as the client reads
                data = b"x" * 65536
                await stream.send_all(b"10000\r\n" + data + b"\r\n" if chunked else data)
                sent.append(len(data))
        except trio.BrokenResourceError:
            pass

    async with trio.open_nursery() as nursery:
        url, _ = await serve(nursery, huge)
        http = KeepAliveClient(url, timeout=5, user_agent="test-agent", max_body=100_000)
        with pytest.raises(ReplyTooLarge) as info:
            await http.post("/", b"", "text/plain")
        assert info.value.status_code == int(head.split()[1])
        await trio.sleep(0.2)
        assert sum(sent) < 8 * 1024 * 1024  # the server's sends stopped: the connection was closed
        assert not http._idle
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "reply",
    [
        OK,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\nabc",
    ],
)
async def test_a_reply_within_the_cap_builds_no_exception(reply, monkeypatch):
    """The per-reply path builds the oversized-reply error only when it raises it."""

    def built(*args):
        raise AssertionError("ReplyTooLarge built for a reply within the cap")

    monkeypatch.setattr(keepalive, "ReplyTooLarge", built)

    class Stream:
        def __init__(self):
            self.data = [reply]

        async def receive_some(self, _):
            return self.data.pop() if self.data else b""

    response, _ = await keepalive._read_response(Stream(), 1024)
    assert response.status_code == 200 and response.content in (b"abc", b'{"ok":true}')
