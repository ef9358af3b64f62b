"""A lean keep-alive HTTP/1.1 client for one plain-HTTP origin: what the gorush gateway posts through.

httpx spends a few hundred microseconds of CPU on each request and writes a request's head and its body with
two system calls, each of which may wake the server; this client writes a whole POST with one and parses the
reply itself, since every gorush push is one such request. It does only what a gateway needs:
``POST`` with a body; replies framed by ``Content-Length``, ``chunked`` or the connection's end; keep-alive
connections reused last-in first-out (one the server has closed is dropped first); one deadline per request
as a whole (connect, send, the whole reply); a reply body over ``max_body`` bytes is not read further
(:class:`~trio_dht.push.gateway.ReplyTooLarge`, the connection closed). Other failures raise
:class:`httpx.TransportError` subclasses and replies are :class:`~trio_dht.push.gateway.Reply` objects, as
:func:`trio_dht.push.gateway.post` returns them, so a gateway handles this client's results as httpx's.
"""

from __future__ import annotations

import urllib.parse

import httpx
import trio

from trio_dht.push.gateway import Reply, ReplyTooLarge

MAX_HEAD = 65536
"""Longest reply head (status line and headers)."""
MAX_BODY = 64 * 1024
"""Longest reply body read by default (gorush's replies are a few KB)."""


class _BadReply(Exception):
    pass


class KeepAliveClient:
    """POSTs to one ``http://host[:port]`` origin over reused connections (no TLS, no proxies, no
    redirects)."""

    def __init__(self, url: str, *, timeout: float, user_agent: str, max_body: int = MAX_BODY) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not a plain http:// URL: {url!r}")
        self._host = parts.hostname
        self._port = parts.port or 80
        netloc = parts.netloc.rpartition("@")[2]
        self._head = f"Host: {netloc}\r\nUser-Agent: {user_agent}\r\nAccept: */*\r\n"
        self._timeout = timeout
        self._max_body = max_body
        self._idle: list[trio.SocketStream] = []

    async def post(self, path: str, body: bytes, content_type: str) -> Reply:
        """POST ``body`` to ``path``; the reply, read whole. Raises :class:`httpx.TransportError` or
        :class:`~trio_dht.push.gateway.ReplyTooLarge`."""
        request = (
            f"POST {path} HTTP/1.1\r\n{self._head}Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode("latin-1") + body
        try:
            with trio.fail_after(self._timeout):
                stream = self._idle_stream() or await trio.open_tcp_stream(self._host, self._port)
                try:
                    await stream.send_all(request)
                    response, reusable = await _read_response(stream, self._max_body)
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
                if reusable:
                    self._idle.append(stream)
                else:
                    await trio.aclose_forcefully(stream)
                return response
        except trio.TooSlowError:
            raise httpx.ReadTimeout(f"no reply in {self._timeout:g} s") from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise httpx.NetworkError(repr(exc)) from exc
        except _BadReply as exc:
            raise httpx.RemoteProtocolError(str(exc)) from None

    def close(self) -> None:
        """Close the idle connections."""
        for stream in self._idle:
            stream.socket.close()
        self._idle.clear()

    def _idle_stream(self) -> trio.SocketStream | None:
        while self._idle:
            stream = self._idle.pop()
            if not stream.socket.is_readable():  # readable while idle: the server closed it (or misbehaved)
                return stream
            stream.socket.close()
        return None


async def _read_response(stream: trio.SocketStream, max_body: int) -> tuple[Reply, bool]:
    """One reply (1xx interim replies skipped); ``(reply, the connection may be reused)``.

    Raises :class:`ReplyTooLarge` as soon as the body is known to exceed ``max_body``."""
    buffer = bytearray()
    while True:
        end = await _fill_until(stream, buffer, b"\r\n\r\n", MAX_HEAD)
        head = bytes(buffer[:end]).decode("latin-1")
        del buffer[: end + 4]
        status_line, *lines = head.split("\r\n")
        version, _, rest = status_line.partition(" ")
        try:
            status = int(rest[:3])
        except ValueError:
            raise _BadReply(f"bad status line {status_line[:100]!r}") from None
        if not version.startswith("HTTP/1.") or not 100 <= status <= 999:
            raise _BadReply(f"bad status line {status_line[:100]!r}")
        headers = []
        for line in lines:
            name, colon, value = line.partition(":")
            if not colon:
                raise _BadReply(f"bad header line {line[:100]!r}")
            headers.append((name.strip(), value.strip()))
        if status >= 200:
            break
    fields = {name.lower(): value.lower() for name, value in headers}
    reply_headers = httpx.Headers(headers)
    reusable = version == "HTTP/1.1" and "close" not in fields.get("connection", "")
    if status in (204, 304):
        body = b""
    elif "chunked" in fields.get("transfer-encoding", ""):
        body = await _read_chunked(stream, buffer, max_body)
        if body is None:
            raise ReplyTooLarge(status, reply_headers, max_body)
    elif "content-length" in fields:
        try:
            length = int(fields["content-length"])
        except ValueError:
            raise _BadReply("bad Content-Length") from None
        if length < 0:
            raise _BadReply("bad Content-Length")
        if length > max_body:
            raise ReplyTooLarge(status, reply_headers, max_body)
        await _fill(stream, buffer, length)
        body = bytes(buffer[:length])
        del buffer[:length]
    else:  # framed by the connection's end
        while data := await stream.receive_some(65536):
            buffer += data
            if len(buffer) > max_body:
                raise ReplyTooLarge(status, reply_headers, max_body)
        body, buffer, reusable = bytes(buffer), bytearray(), False
    return Reply(status, reply_headers, body), reusable and not buffer


async def _read_chunked(stream: trio.SocketStream, buffer: bytearray, max_body: int) -> bytes | None:
    """A chunked body; None as soon as it is known to exceed ``max_body`` (the rest is not read)."""
    body = bytearray()
    while True:
        end = await _fill_until(stream, buffer, b"\r\n", MAX_HEAD)
        size_text = bytes(buffer[:end]).split(b";", 1)[0].strip()
        del buffer[: end + 2]
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _BadReply("bad chunk size") from None
        if size == 0:
            while (end := await _fill_until(stream, buffer, b"\r\n", MAX_HEAD)) > 0:  # trailers
                del buffer[: end + 2]
            del buffer[:2]
            return bytes(body)
        if size < 0:
            raise _BadReply("bad chunk size")
        if len(body) + size > max_body:
            return None
        await _fill(stream, buffer, size + 2)
        body += buffer[:size]
        del buffer[: size + 2]


async def _fill_until(stream: trio.SocketStream, buffer: bytearray, mark: bytes, limit: int) -> int:
    """Read until ``buffer`` holds ``mark``; its offset."""
    start = 0
    while (end := buffer.find(mark, start)) < 0:
        if len(buffer) > limit:
            raise _BadReply("reply head too long")
        start = max(0, len(buffer) - len(mark) + 1)
        await _receive(stream, buffer)
    return end


async def _fill(stream: trio.SocketStream, buffer: bytearray, size: int) -> None:
    while len(buffer) < size:
        await _receive(stream, buffer)


async def _receive(stream: trio.SocketStream, buffer: bytearray) -> None:
    data = await stream.receive_some(65536)
    if not data:
        raise _BadReply("connection closed before the reply's end")
    buffer += data
