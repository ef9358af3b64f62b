"""The proxy's two streaming bodies: a GET (values as the DHT finds them) and a LISTEN (never ends).

Both are Quart ``ResponseBody`` objects, so a Quart handler returns them as they are, and the raw-ASGI fast
path drives them the same way: ``async with body as chunks: async for chunk in chunks: ...``. Each chunk is
one or more NDJSON lines. A GET's lines come from :func:`get_lines`, which the plain-HTTP front end calls
directly (it writes from the callback: no task, no channel).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

import trio
from quart.wrappers.response import ResponseBody

from trio_dht.api import Dht, ValueEvent
from trio_dht.infohash import InfoHash
from trio_dht.proxy.value_json import value_line
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
        self._stack = AsyncExitStack()
        self._send, self._receive = trio.open_memory_channel[bytes](math.inf)

    async def __aenter__(self) -> GetStream:
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


class ListenStream(ResponseBody):
    """A ``dht.listen`` on ``key``: current values, then new ones and ``"expired":true`` lines, until the
    client goes away (the listen is then cancelled) or :meth:`close` ends it cleanly.

    While open it is in ``registry`` (``listenCount``; closed on shutdown).
    """

    def __init__(self, dht: Dht, key: InfoHash, registry: set[Any]) -> None:
        self.dht = dht
        self.key = key
        self.registry = registry
        self._stack = AsyncExitStack()
        self._events: Any = None
        self._scope: trio.CancelScope | None = None
        self._closed = False

    async def __aenter__(self) -> ListenStream:
        try:
            events = await self._stack.enter_async_context(self.dht.listen(self.key))
        except Exception:
            log.exception("proxy listen on %s failed", self.key)
            self._closed = True
            return self
        self._events = events.__aiter__()
        self.registry.add(self)
        self._stack.callback(self.registry.discard, self)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.__aexit__(exc_type, exc, tb)

    def __aiter__(self) -> ListenStream:
        return self

    async def __anext__(self) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        with trio.CancelScope() as self._scope:
            try:
                event: ValueEvent = await self._events.__anext__()
            except StopAsyncIteration:
                raise
            except Exception:
                log.exception("proxy listen on %s failed", self.key)
                raise StopAsyncIteration from None
            return value_line(event.value, expired=event.expired)
        raise StopAsyncIteration  # closed while waiting

    def close(self) -> None:
        """End the stream: the client gets the last chunk, and the DHT listen is cancelled."""
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()
