"""The gateways' HTTP requests (:func:`trio_dht.push.gateway.post` through the shared httpx client, and the
gorush gateway's whole-request deadline), against scripted raw servers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

import httpx
import pytest
import trio

from trio_dht.limits import Limits
from trio_dht.push import gateway
from trio_dht.push.gateway import TIMED_OUT, ReplyTooLarge, TemporaryGatewayError, new_http_client
from trio_dht.push.gorush import GorushGateway
from trio_dht.push.payloads import Platform, Push, PushKind

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
    """A handler answering each request on a connection with the next reply, then closing it."""

    async def handler(stream: trio.SocketStream, _: int) -> None:
        buffer = bytearray()
        for reply in replies:
            if await read_request(stream, buffer) is None:
                return
            await stream.send_all(reply)
        await stream.aclose()

    return handler


async def post(
    client: httpx.AsyncClient, url: str, body: bytes = b"", max_bytes: int = 65536
) -> gateway.Reply:
    return await gateway.post(
        client, url, content=body, headers={"Content-Type": "text/plain"}, max_bytes=max_bytes
    )


def push() -> Push:
    return Push(1, PushKind.VALUES, "t", Platform.ANDROID, "", {"key": "ab" * 20}, True)


OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


async def test_post_sends_the_body_and_reuses_the_connection():
    seen: list[tuple[bytes, bytes]] = []

    async def handler(stream: trio.SocketStream, _: int) -> None:
        buffer = bytearray()
        while (request := await read_request(stream, buffer)) is not None:
            seen.append(request)
            await stream.send_all(OK)

    async with trio.open_nursery() as nursery, new_http_client() as client:
        url, counts = await serve(nursery, handler)
        for _ in range(3):
            response = await gateway.post(
                client,
                url + "/api/push",
                content=b'{"n":1}',
                headers={"Content-Type": "application/json"},
                max_bytes=65536,
            )
            assert response.status_code == 200 and response.json() == {"ok": True}
            assert response.headers["content-type"] == "application/json"
        assert len(counts) == 1  # one connection for the three requests
        head, body = seen[0]
        lines = head.decode("latin-1").split("\r\n")
        fields = {
            name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])
        }
        assert lines[0] == "POST /api/push HTTP/1.1" and body == b'{"n":1}'
        assert fields["host"] == url.removeprefix("http://") and fields["user-agent"] == gateway.USER_AGENT
        assert fields["content-type"] == "application/json" and fields["content-length"] == "7"
        assert fields["accept-encoding"] == "identity"  # a reply is never decompressed past its cap
        nursery.cancel_scope.cancel()


async def test_chunked_interim_and_until_close_replies():
    chunked = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\nRetry-After: 2\r\n\r\n"
        b"4;ext=1\r\nbusy\r\n3\r\n!!!\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )
    until_close = b"HTTP/1.0 200 OK\r\n\r\nall of it"
    async with trio.open_nursery() as nursery, new_http_client() as client:
        url, counts = await serve(nursery, replying(chunked, until_close))
        response = await post(client, url, b"x")
        assert response.status_code == 503 and response.content == b"busy!!!"
        assert response.headers["retry-after"] == "2"
        response = await post(client, url, b"y")
        assert response.status_code == 200 and response.content == b"all of it"
        assert len(counts) == 1
        await post(client, url, b"z")  # the until-close reply ended that connection
        assert len(counts) == 2
        nursery.cancel_scope.cancel()


async def test_connection_close_and_a_server_closed_idle_connection_open_new_ones():
    closing = b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
    async with trio.open_nursery() as nursery, new_http_client() as client:
        url, counts = await serve(nursery, replying(closing))
        assert (await post(client, url)).status_code == 204
        assert (await post(client, url)).status_code == 204
        assert len(counts) == 2
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery, new_http_client() as client:
        url, counts = await serve(nursery, replying(OK))  # answers once, then closes the connection
        await post(client, url)
        await trio.sleep(0.05)  # the server's close reaches us while the connection is idle
        assert (await post(client, url)).status_code == 200
        assert len(counts) == 2
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
    async with trio.open_nursery() as nursery, new_http_client() as client:
        url, _ = await serve(nursery, replying(reply))
        with pytest.raises(httpx.RemoteProtocolError):
            await post(client, url)
        nursery.cancel_scope.cancel()


async def test_unreachable_and_silent_gorush_are_temporary_errors(autojump_clock):
    limits = Limits(push_request_timeout=15)
    async with trio.open_nursery() as nursery:
        url, _ = await serve(nursery, replying())
        nursery.cancel_scope.cancel()
    async with new_http_client(limits) as client:
        with pytest.raises(httpx.TransportError):  # nothing listens there any more
            await post(client, url)
        with pytest.raises(TemporaryGatewayError) as info:
            await GorushGateway(client, url, limits=limits).send([push()])
        assert info.value.reason is None

    async def silent(stream: trio.SocketStream, _: int) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery, new_http_client(limits) as client:
        url, _ = await serve(nursery, silent)
        start = trio.current_time()
        with pytest.raises(TemporaryGatewayError) as info:
            await GorushGateway(client, url, limits=limits).send([push()])
        assert info.value.reason == TIMED_OUT
        assert trio.current_time() - start == pytest.approx(15, abs=0.1)
        nursery.cancel_scope.cancel()


async def test_a_trickling_reply_hits_the_deadline_of_the_whole_request(autojump_clock):
    async def trickle(stream: trio.SocketStream, _: int) -> None:
        await read_request(stream, bytearray())
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000:
            await stream.send_all(bytes([byte]))
            await trio.sleep(1)  # well within any per-read timeout

    limits = Limits(push_request_timeout=10)
    async with trio.open_nursery() as nursery, new_http_client(limits) as client:
        url, _ = await serve(nursery, trickle)
        start = trio.current_time()
        with pytest.raises(TemporaryGatewayError) as info:
            await GorushGateway(client, url, limits=limits).send([push()])
        assert info.value.reason == TIMED_OUT
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

    async def huge_then_ok(stream: trio.SocketStream, index: int) -> None:
        if index:
            await replying(OK)(stream, index)
            return
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

    async with trio.open_nursery() as nursery, new_http_client() as client:
        url, counts = await serve(nursery, huge_then_ok)
        with pytest.raises(ReplyTooLarge) as info:
            await post(client, url, max_bytes=100_000)
        assert info.value.status_code == int(head.split()[1])
        await trio.sleep(0.2)
        assert sum(sent) < 8 * 1024 * 1024  # the server's sends stopped: the connection was closed
        assert (await post(client, url)).status_code == 200
        assert len(counts) == 2  # on a new connection
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

    monkeypatch.setattr(gateway, "ReplyTooLarge", built)
    async with trio.open_nursery() as nursery, new_http_client() as client:
        url, _ = await serve(nursery, replying(reply))
        response = await post(client, url, max_bytes=1024)
        assert response.status_code == 200 and response.content in (b"abc", b'{"ok":true}')
        nursery.cancel_scope.cancel()
