"""hypercorn inside the front end: the ASGI lifespan, and the connections the front end gives to hypercorn
(TLS, and the requests its narrow reader leaves alone), held to the same deadlines as its own.

* The head: hypercorn's keep-alive wait runs from a connection's start (or its last response) to the end of
  the next request's head, and ``hypercorn_config`` caps it at ``Limits.http_head_timeout``. Past it, a head
  begun gets a 408 (counted) before the connection closes (:class:`_Connection`).
* The body: Quart's ``BODY_TIMEOUT`` and the raw-ASGI path's own deadline (``Limits.http_body_timeout``).
* A response the client does not take: hypercorn shields its sends from cancellation, so the deadline
  (``Limits.http_send_timeout``) is inside the stream it writes to (:class:`_DeadlineStream`): past it the
  connection breaks (counted). These routes are off the hot path: a cancel scope per send costs little here.

Requires hypercorn 0.18's ``TCPServer``, ``WorkerContext`` and ``Lifespan`` (pinned in pyproject.toml).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app

from trio_dht.proxy.conn_limits import HttpCounters

_SEND_ERRORS = (trio.BusyResourceError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass(frozen=True, slots=True)
class HypercornLink:
    """What a front end's hypercorn connections share: the app, hypercorn's config and worker context, the
    send deadline, the counters, and the 408 response."""

    asgi: AppWrapper
    config: Config
    context: WorkerContext
    send_timeout: float
    counters: HttpCounters
    timeout_response: bytes

    @classmethod
    def create(
        cls, app: Any, config: Config, send_timeout: float, counters: HttpCounters, timeout_response: bytes
    ) -> HypercornLink:
        """The link of one front end serving the ASGI ``app`` with hypercorn's ``config``."""
        asgi = wrap_app(app, config.wsgi_max_body_size, "asgi")
        return cls(asgi, config, WorkerContext(None), send_timeout, counters, timeout_response)

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Run the ASGI lifespan around the block, as hypercorn runs it."""
        lifespan = Lifespan(self.asgi, self.config, {})
        async with trio.open_nursery() as nursery:
            await nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            yield
            await lifespan.wait_for_shutdown()
            nursery.cancel_scope.cancel()

    async def close_idle(self) -> None:
        """Close the idle connections hypercorn serves (those in a request finish it first)."""
        await self.context.terminated.set()

    async def serve(self, sock: socket.socket, read: bytes, ssl_context: ssl.SSLContext | None) -> None:
        """Serve ``sock`` until it closes, starting with the bytes already ``read`` (plain HTTP only)."""
        stream: Any = _DeadlineStream(trio.SocketStream(trio.socket.from_stdlib_socket(sock)), self, read)
        if ssl_context is not None:
            stream = trio.SSLStream(stream, ssl_context, server_side=True, https_compatible=True)
        await _Connection(self, stream).run()


class _Connection(TCPServer):
    """hypercorn's connection, whose keep-alive wait answers a head begun and not ended with a 408, counted,
    before it closes."""

    def __init__(self, link: HypercornLink, stream: Any) -> None:
        super().__init__(link.asgi, link.config, link.context, ConnectionState({}), stream)
        self._link = link

    async def _idle_timeout(self) -> None:
        with trio.move_on_after(self.config.keep_alive_timeout):
            await self.context.terminated.wait()
        h11_connection = getattr(getattr(self.protocol, "protocol", None), "connection", None)
        trailing = getattr(h11_connection, "trailing_data", (b"", False))
        if trailing[0] and not self.context.terminated.is_set():  # a head begun: the client is late
            self._link.counters.head_timeouts += 1
            with trio.CancelScope(shield=True), trio.move_on_after(1.0), contextlib.suppress(*_SEND_ERRORS):
                await self.stream.send_all(self._link.timeout_response)
        with trio.CancelScope(shield=True):
            await self._initiate_server_close()


class PrefixedStream(trio.abc.HalfCloseableStream):
    """A socket stream whose first read returns the bytes already taken off the socket (``prefix``): what a
    server read to decide how to serve a connection, handed to hypercorn with the rest."""

    def __init__(self, stream: trio.SocketStream, prefix: bytes = b"") -> None:
        self._stream = stream
        self._prefix = prefix
        self.socket = stream.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            await trio.lowlevel.checkpoint()
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()

    def setsockopt(self, *args: Any) -> None:
        self._stream.setsockopt(*args)


class _DeadlineStream(PrefixedStream):
    """A :class:`PrefixedStream` whose sends break the connection (counted) when the client does not take
    them in time."""

    def __init__(self, stream: trio.SocketStream, link: HypercornLink, prefix: bytes = b"") -> None:
        super().__init__(stream, prefix)
        self._link = link

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with trio.move_on_after(self._link.send_timeout):
            await self._stream.send_all(data)
            return
        self._link.counters.send_timeouts += 1
        await self._stream.aclose()
        raise trio.BrokenResourceError("the client did not take the response in time")


def url(sock: socket.socket, scheme: str) -> str:
    """The URL a listening socket serves, as hypercorn logs it."""
    return f"{scheme}://{repr_socket_addr(sock.family, sock.getsockname())}"
