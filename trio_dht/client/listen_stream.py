"""Stream-mode listens (Trio shell): one ``GET /key/{h}/listen`` per watched key, kept open.

A LISTEN stream can die after it opened (OpenDHT's proxy ends long-open streams, and a connection can go
silent): it is reopened with backoff, at once when asked (:meth:`WatchTask.restart_stream`), and a stream that
stayed up counts as a success. A reopened stream replays the key's values: they are deduplicated by the
watch's :class:`~trio_dht.client.value_cache.ValueCache`, and a GET beside it finds the values that vanished
meanwhile, which are then expired.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import httpx
import trio

from trio_dht.backoff import Backoff
from trio_dht.client.http import ProxyError, ProxyHttp, close_response, key_path
from trio_dht.client.ndjson import LineSplitter, LineTooLong, value_events
from trio_dht.client.push_state import Watch
from trio_dht.infohash import InfoHash
from trio_dht.value import Value

log = logging.getLogger(__name__)


class WatchTask:
    """The Trio side of one watch: its task's cancel scope, a wake-up, and a lock serialising SUBSCRIBEs."""

    __slots__ = ("lock", "restart_requested", "scope", "stream_scope", "wake")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.stream_scope: trio.CancelScope | None = None
        self.wake = trio.Event()
        self.lock = trio.Lock()
        self.restart_requested = False

    def restart_stream(self) -> None:
        """Drop the current LISTEN stream (maybe a zombie) and open a new one at once."""
        self.restart_requested = True
        if self.stream_scope is not None:
            self.stream_scope.cancel()
        self.wake.set()


Get = Callable[[InfoHash], Awaitable[list[Value]]]


async def run_listen_stream(
    http: ProxyHttp,
    watch: Watch,
    task: WatchTask,
    backoff: Backoff,
    get: Get,
    task_status: trio.TaskStatus[None],
) -> None:
    """Keep ``watch``'s LISTEN stream open until cancelled; ``get`` lists the key after a reopening.

    ``task_status.started()`` once the first stream opened or failed."""
    announced = False

    def announce() -> None:
        nonlocal announced
        if not announced:
            announced = True
            task_status.started()

    while True:
        began = trio.current_time()
        opened = False
        try:
            with trio.CancelScope() as task.stream_scope:
                opened = await _stream_once(http, watch, get, announce)
        except ProxyError as exc:
            log.info("LISTEN %s: %s", watch.key, exc)
        finally:
            task.stream_scope = None
        announce()
        if task.restart_requested:
            task.restart_requested = False
            backoff.succeeded()
            continue
        delay = backoff.ended(trio.current_time() - began) if opened else backoff.failed()
        log.debug("LISTEN %s ended; reopening in %.2f s", watch.key, delay)
        with trio.move_on_after(delay):
            await task.wake.wait()
        task.wake = trio.Event()


async def _stream_once(http: ProxyHttp, watch: Watch, get: Get, on_open: Callable[[], None]) -> bool:
    """Open one LISTEN stream and read it until it ends; whether it had opened (HTTP 200)."""
    path = key_path(watch.key, "/listen")
    what = f"GET {path}"
    response = await http.open_stream(path)
    try:
        resync = len(watch.cache) > 0
        on_open()
        async with trio.open_nursery() as nursery:
            if resync:
                watch.cache.begin_resync()
                nursery.start_soon(_resync, watch, get)
            splitter = LineSplitter()
            try:
                async for chunk in response.aiter_bytes():
                    events = value_events(splitter.feed(chunk), http.base_url)
                    watch.publish([out for ev in events if (out := watch.cache.apply(ev)) is not None])
            except httpx.HTTPError as exc:
                raise http.failed(f"{what} (stream)", exc) from None
            except LineTooLong as exc:
                raise ProxyError(f"{what}: {exc}") from None
            finally:
                nursery.cancel_scope.cancel()
        http.check_health()  # the proxy ended the stream: restarted, or going away?
        return True
    finally:
        await close_response(response)


async def _resync(watch: Watch, get: Get) -> None:
    """After a LISTEN restart: a GET listing, then expire what neither it nor the new stream showed."""
    try:
        values = await get(watch.key)
    except ProxyError as exc:
        log.info("resync of %s failed: %s", watch.key, exc)
        return
    events = [ev for value in values if (ev := watch.cache.update(value)) is not None]
    events.extend(watch.cache.end_resync())
    watch.publish(events)
