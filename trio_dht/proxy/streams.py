"""The proxy's two streaming bodies: a GET (values as the DHT finds them) and a LISTEN (never ends).

Both are Quart ``ResponseBody`` objects, so a Quart view returns them as they are, and the raw-ASGI path
drives them the same way: ``async with body as chunks: async for chunk in chunks: ...``. Each chunk is one or
more NDJSON lines. The plain-HTTP front end writes them from callbacks instead (no task per event, no
channel): :meth:`GetStream.run` and :meth:`ListenStream.open_feed`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

import trio
from quart.wrappers.response import ResponseBody

from trio_dht.api import Dht, ListenHandle, ValueEvent
from trio_dht.infohash import InfoHash
from trio_dht.proxy.conn_limits import PerAddress
from trio_dht.rest.value_json import value_line
from trio_dht.value import Value

log = logging.getLogger(__name__)


async def get_lines(dht: Dht, key: InfoHash, on_lines: Callable[[bytes], None]) -> None:
    """One ``dht.get`` on ``key``: ``on_lines`` gets the NDJSON of each batch of values not seen before, as
    the DHT finds them. Returns when the get ends; a failed get is logged and ends it.
    """
    sent: set[int] = set()

    def on_values(values: list[Value]) -> None:
        fresh = [v for v in values if v.id not in sent]
        if fresh:
            sent.update(v.id for v in fresh)
            on_lines(b"".join(value_line(v) for v in fresh))

    try:
        values = await dht.get(key, on_values=on_values)
    except Exception:
        log.exception("proxy get on %s failed", key)
        return
    on_values(values)  # a backend that does not call on_values (or misses some)


class GetStream(ResponseBody):
    """One ``dht.get`` on ``key``, each batch of values a chunk, ending when the get does (or fails)."""

    def __init__(self, dht: Dht, key: InfoHash) -> None:
        self.dht = dht
        self.key = key

    async def run(self, on_lines: Callable[[bytes], None]) -> None:
        """The get, for a writer that takes the lines from a callback: ``on_lines`` gets each batch; returns
        when the get ends."""
        await get_lines(self.dht, self.key, on_lines)

    async def __aenter__(self) -> GetStream:
        self._stack = AsyncExitStack()
        self._send, self._receive = trio.open_memory_channel[bytes](math.inf)
        nursery = await self._stack.enter_async_context(trio.open_nursery())
        self._stack.callback(nursery.cancel_scope.cancel)  # runs first on exit: stop a get nobody reads
        nursery.start_soon(self._run)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._receive.close()
        await self._stack.__aexit__(exc_type, exc, tb)

    def __aiter__(self) -> GetStream:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def _run(self) -> None:
        with self._send:
            await get_lines(self.dht, self.key, self._on_lines)

    def _on_lines(self, lines: bytes) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):  # the client is gone
            self._send.send_nowait(lines)


class ListenRegistry:
    """The open listen streams (their :class:`ListenFeed`), counted per client address (IPv6 per /64): at
    most ``per_address`` each. A stream's slot is taken when it is admitted (:meth:`reserve`) and given back
    once, when its feed stops (or by :meth:`release` when it never starts). ``max_backlog``: bytes of lines a
    stream may hold for a client that does not read them (past what its socket took); beyond, the stream ends.
    """

    def __init__(self, per_address: int = 64, max_backlog: int = 4 * 1024 * 1024) -> None:
        self.max_backlog = max_backlog
        self.overflows = 0
        """Streams ended because their client did not read."""
        self._feeds: set[Any] = set()
        self._clients = PerAddress(per_address)

    @property
    def refused(self) -> int:
        """Listens refused: their client held ``per_address`` streams already."""
        return self._clients.refused

    def reserve(self, client: str | None) -> bool:
        """Take a slot for one more stream of ``client``; False (counted) when it holds ``per_address``."""
        return client is None or self._clients.acquire(client)

    def release(self, client: str | None) -> None:
        """Give back a slot :meth:`reserve` took for a stream that never started."""
        if client is not None:
            self._clients.release(client)

    def held(self, client: str) -> int:
        """Slots ``client``'s address holds."""
        return self._clients.held(client)

    def add(self, feed: Any) -> None:
        """``feed`` runs, on the slot reserved for its ``client``."""
        self._feeds.add(feed)

    def discard(self, feed: Any) -> None:
        """``feed`` stopped: its slot is given back (once)."""
        if feed in self._feeds:
            self._feeds.discard(feed)
            self.release(getattr(feed, "client", None))

    def __len__(self) -> int:
        return len(self._feeds)

    def __contains__(self, feed: object) -> bool:
        return feed in self._feeds

    def __iter__(self) -> Iterator[Any]:
        return iter(self._feeds)


class ListenFeed:
    """The source of one listen stream on ``key``, whatever HTTP layer writes it: a ``dht.add_listener``
    (no task) whose events become NDJSON lines (current values first, then new ones and ``"expired":true``
    lines), held until the writer takes them.

    ``on_ready`` is called (from the DHT's callback) when lines arrive and when the feed ends: the writer
    then takes the lines (:meth:`take`), and ends the stream once :attr:`ended`. It ends on :meth:`close` (the
    shutdown: end cleanly, with the last chunk), if the listen fails, or when more than the registry's
    ``max_backlog`` bytes wait (:attr:`overflowed`: the client does not read). While it runs it is in
    ``registry`` (``listenCount``; closed on shutdown), on the slot the caller reserved for ``client``
    (:meth:`ListenRegistry.reserve`), which it gives back when it stops. :meth:`cancel` when the stream is
    over.
    """

    def __init__(
        self,
        dht: Dht,
        key: InfoHash,
        registry: ListenRegistry,
        on_ready: Callable[[], None],
        client: str | None = None,
    ) -> None:
        self.key = key
        self.client = client
        self.registry = registry
        self.ended = False
        self.overflowed = False
        self._on_ready = on_ready
        self._lines: list[bytes] = []
        self._size = 0
        self._handle: ListenHandle | None = None
        registry.add(self)
        try:
            self._handle = dht.add_listener(key, self._on_event)
        except Exception:
            log.exception("proxy listen on %s failed", key)
            self.close()

    @property
    def ready(self) -> bool:
        """Lines wait, or the feed has ended."""
        return bool(self._lines) or self.ended

    def take(self) -> bytes:
        """The lines waiting (possibly none), now the writer's."""
        lines = b"".join(self._lines) if len(self._lines) != 1 else self._lines[0]
        self._lines.clear()
        self._size = 0
        return lines

    def _on_event(self, event: ValueEvent) -> None:
        if self.ended:
            return
        line = value_line(event.value, expired=event.expired)
        self._lines.append(line)
        self._size += len(line)
        if self._size > self.registry.max_backlog:
            self.overflow()
            return
        self._on_ready()

    def overflow(self) -> None:
        """End the stream because its client does not read (counted): no last chunk, the connection is cut."""
        if self.overflowed:
            return
        log.info("listen stream on %s ends: its client does not read", self.key)
        self.registry.overflows += 1
        self.overflowed = True
        self._lines.clear()
        self._size = 0
        self.close()

    def close(self) -> None:
        """End the stream cleanly: the writer sends what waits and the last chunk; the listen is cancelled."""
        if self.ended:
            return
        self.ended = True
        self._stop()
        self._on_ready()

    def cancel(self) -> None:
        """The stream is over (or the client gone): stop listening, leave the registry (idempotent)."""
        self.ended = True
        self._stop()

    def _stop(self) -> None:
        self.registry.discard(self)
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class ListenStream(ResponseBody):
    """A :class:`ListenFeed` as a Quart response body (the routes hypercorn serves: TLS, handed-over
    connections): each chunk is the lines that arrived since the last one; it ends when the feed does. The
    client going away cancels the body's task, which cancels the feed.

    It holds the slot reserved for ``client`` in ``registry`` from its creation: the feed takes it over on
    entry; a stream never entered gives it back on :meth:`release` (or when it is collected).
    """

    def __init__(self, dht: Dht, key: InfoHash, registry: ListenRegistry, client: str | None = None) -> None:
        self.dht = dht
        self.key = key
        self.registry = registry
        self.client = client
        self._feed: ListenFeed | None = None
        self._ready = trio.Event()
        self._reserved = True

    async def __aenter__(self) -> ListenStream:
        if not self._reserved:
            raise RuntimeError("a listen stream is entered once, before its slot is released")
        self.open_feed(self._wake)
        return self

    def open_feed(self, on_ready: Callable[[], None]) -> ListenFeed:
        """Start the stream's listen, for a writer that takes the lines from its feed when ``on_ready`` is
        called (the feed takes over the reserved slot; :meth:`ListenFeed.cancel` when the stream is over)."""
        self._reserved = False
        self._feed = ListenFeed(self.dht, self.key, self.registry, on_ready, self.client)
        return self._feed

    def release(self) -> None:
        """Give back the slot of a stream that was never entered (idempotent; nothing once entered)."""
        if self._reserved:
            self._reserved = False
            self.registry.release(self.client)

    def __del__(self) -> None:
        self.release()

    def _wake(self) -> None:
        self._ready.set()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._feed is not None:
            self._feed.cancel()

    def __aiter__(self) -> ListenStream:
        return self

    async def __anext__(self) -> bytes:
        feed = self._feed
        assert feed is not None, "use the stream with async with"
        while not feed.ready:
            await self._ready.wait()
            self._ready = trio.Event()
        lines = feed.take()
        if lines:
            return lines
        raise StopAsyncIteration  # ended, nothing left
