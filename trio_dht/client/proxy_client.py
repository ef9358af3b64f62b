"""The device side of OpenDHT's REST proxy (Trio shell): ``async with open_proxy_client(url) as dht``.

:class:`ProxyClient` implements :class:`trio_dht.api.Dht` over HTTP, so code written for a node runs on a
phone through a proxy. The logic lives in sans-IO modules (:mod:`.push_state`, :mod:`.value_cache`,
:mod:`.health`, :mod:`.ndjson`); :mod:`.http` makes the requests (each bounded as a whole by ``timeout``) and
:mod:`.listen_stream` keeps stream-mode listens open. This module owns the clock and the tasks:

- a health task: ``GET /`` every 15 min while connected, every minute otherwise, at once after a request
  failed at the connection level or a push arrived while not connected. A move back to *connected* restarts
  every LISTEN stream, retries failed subscriptions, re-fetches the others and re-POSTs permanent puts: what
  happened while the proxy was unreachable or isolated (answering with no peers) is not trusted to have
  reached us;
- one task per listened key: in stream mode (no push token) its LISTEN stream; in push mode its SUBSCRIBE,
  re-SUBSCRIBEd before the proxy's deadline even without a timeout push, and retried with backoff when it
  fails;
- a task re-POSTing permanent puts before the proxy forgets them.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import trio

from trio_dht.api import GetCallback, NodeInfo, ValueEvent
from trio_dht.backoff import Backoff
from trio_dht.client.health import ProxyHealth, ProxyStatus, health_from_info, unreachable
from trio_dht.client.http import (
    DEFAULT_TIMEOUT,
    ProxyError,
    ProxyHttp,
    ProxyHTTPError,
    ProxyTimeout,
    check_status,
    key_path,
    new_http_client,
    normalize_url,
)
from trio_dht.client.listen_stream import WatchTask, run_listen_stream
from trio_dht.client.ndjson import value_events
from trio_dht.client.push_state import (
    RESUBSCRIBE_GUARD,
    SUBSCRIPTION_REFRESH,
    HeldPut,
    ListenBook,
    Listener,
    PushDecision,
    PushResult,
    SubscriptionState,
    Watch,
    parse_notification,
)
from trio_dht.infohash import InfoHash
from trio_dht.push.payloads import Dialect
from trio_dht.rest.value_json import ValueJsonError, dumps, value_from_json, value_to_json
from trio_dht.value import Query, Value

log = logging.getLogger(__name__)

DEFAULT_CLIENT_ID = "trio-dht"
HEALTH_INTERVAL_CONNECTED = 15 * 60.0
HEALTH_INTERVAL_OTHERWISE = 60.0
PUT_RETRY = 60.0
"""A permanent put whose re-POST failed is tried again this much later."""

__all__ = [
    "DEFAULT_CLIENT_ID",
    "DEFAULT_TIMEOUT",
    "ProxyClient",
    "ProxyError",
    "ProxyHTTPError",
    "ProxyTimeout",
    "normalize_url",
    "open_proxy_client",
]


class ProxyClient:
    """A :class:`trio_dht.api.Dht` through an OpenDHT REST proxy. Made by :func:`open_proxy_client`."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        nursery: trio.Nursery,
        base_url: str,
        book: ListenBook,
        *,
        push_token: str | None,
        platform: str,
        topic: str,
        timeout: float,
        stream_backoff: Backoff | None = None,
    ) -> None:
        self._http = ProxyHttp(client, base_url, timeout, self._check_health_soon)
        self._nursery = nursery
        self.base_url = base_url
        self.book = book
        self._push_token = push_token or ""
        self.platform = platform
        self.topic = topic
        self.timeout = timeout
        self._stream_backoff = stream_backoff
        self._tasks: dict[InfoHash, WatchTask] = {}
        self._health = ProxyHealth()
        self._health_wake = trio.Event()
        self._puts_wake = trio.Event()
        self._checked = False

    # -- state -----------------------------------------------------------------------------------------------

    @property
    def push_token(self) -> str | None:
        return self._push_token or None

    @property
    def push_mode(self) -> bool:
        """Listens SUBSCRIBE (a push token is set) rather than stream."""
        return bool(self._push_token)

    @property
    def session_id(self) -> str:
        return self.book.session_id

    @property
    def client_id(self) -> str:
        return self.book.client_id

    @property
    def health(self) -> ProxyHealth:
        """The last health check of the proxy."""
        return self._health

    @property
    def status(self) -> ProxyStatus:
        return self._health.status

    @property
    def connected(self) -> bool:
        """Whether the proxy answered and its node has good peers (an isolated proxy is not connected)."""
        return self._health.connected

    @property
    def node_id(self) -> InfoHash:
        """The proxy's node id (zeroes until the proxy has answered)."""
        return self._health.node_id or InfoHash()

    def info(self) -> NodeInfo:
        return self._health.node_info()

    async def check_health(self) -> ProxyHealth:
        """Check the proxy now (``GET /``)."""
        await self._check_health()
        return self._health

    def connectivity_changed(self) -> None:
        """The device's network changed (Wi-Fi/4G, VPN, wake from doze): check the proxy at once and restart
        every LISTEN stream, whose socket may have died without a sign."""
        for task in self._tasks.values():
            if not self.push_mode:
                task.restart_stream()
        self._health_wake.set()

    @property
    def _closed(self) -> bool:
        return self._http.closed

    def _check_health_soon(self) -> None:
        self._health_wake.set()

    # -- get / put -------------------------------------------------------------------------------------------

    async def get(
        self, key: InfoHash, query: Query | None = None, *, on_values: GetCallback | None = None
    ) -> list[Value]:
        """``GET /key/{key}``: every value the proxy finds (``query`` applied here, as OpenDHT's client does).

        Raises :class:`ProxyError` (:class:`ProxyTimeout` after :attr:`timeout` seconds in all).
        """
        found: dict[int, Value] = {}

        def take(lines: list[bytes]) -> None:
            batch = [
                ev.value
                for ev in value_events(lines, self.base_url)
                if not ev.expired and (query is None or query.matches(ev.value))
            ]
            for value in batch:
                found[value.id] = value
            if batch and on_values is not None:
                on_values(batch)

        await self._http.get_lines(key_path(key), take)
        return list(found.values())

    async def put(self, key: InfoHash, value: Value, *, permanent: bool = False) -> bool:
        """``POST /key/{key}``; True once the proxy's node stored it, False if the proxy says it failed (502).

        ``value.id`` is set from the reply when it had none. A permanent put is re-POSTed before the proxy's
        24 h run out, with this client's push details when it has a push token, until :meth:`cancel_put`.
        Raises :class:`ProxyError` when the proxy cannot be reached or refuses the value.
        """
        ok = await self._post(key, value, permanent=permanent)
        if permanent and value.id:
            self.book.hold_put(key, value, trio.current_time())
            self._puts_wake.set()
        return ok

    async def put_signed(self, key: InfoHash, value: Value, *, permanent: bool = False) -> bool:
        """``POST /key/{key}/sign``: the proxy's node signs ``value`` and puts it (404 from a proxy whose node
        has no identity). Returns and raises as :meth:`put`. ValueError for ``permanent``: a proxy holds a
        permanent put as posted, so sign it here and :meth:`put` it."""
        if permanent:
            raise ValueError("a proxy holds no permanent signed puts: sign the value and put() it")
        return await self._post(key, value, permanent=False, suffix="/sign")

    async def put_encrypted(self, key: InfoHash, value: Value, to: Any, *, permanent: bool = False) -> bool:
        """``POST /key/{key}/encrypt``: as :meth:`put_signed`, the value also encrypted for ``to`` (a
        :class:`~trio_dht.crypto.PublicKey`, sent as its key id, a 20-byte key id or a 32-byte long id);
        False when the proxy's node finds no certificate of it (502). ValueError for another ``to``."""
        if permanent:
            raise ValueError("a proxy holds no permanent encrypted puts: encrypt the value and put() it")
        recipient = to if isinstance(to, bytes) else getattr(to, "id", None)
        if not isinstance(recipient, bytes) or len(recipient) not in (20, 32):
            raise ValueError(f"to must be a public key, a 20-byte key id or a 32-byte long id, not {to!r}")
        return await self._post(key, value, permanent=False, suffix="/encrypt", to=recipient.hex())

    async def _post(
        self, key: InfoHash, value: Value, *, permanent: bool, suffix: str = "", to: str | None = None
    ) -> bool:
        body = value_to_json(value)
        if permanent:
            body["permanent"] = self._permanent_push() or True
        if to is not None:
            body["to"] = to
        path = key_path(key, suffix)
        what = f"POST {path}"
        response = await self._http.request("POST", path, dumps(body))
        if response.status_code == 502:
            return False
        check_status(response, what)
        try:
            stored = value_from_json(response.json())
        except (ValueError, ValueJsonError) as exc:
            raise ProxyError(f"{what}: the reply is not a value: {exc}") from None
        if not value.id:
            value.id = stored.id
        return True

    def _permanent_push(self) -> dict[str, str] | None:
        if not self._push_token:
            return None
        return {
            "client_id": self.client_id,
            "key": self._push_token,
            "platform": self.platform,
            "session_id": self.session_id,
            "topic": self.topic,
        }

    def cancel_put(self, key: InfoHash, value_id: int) -> bool:
        """Stop re-POSTing a permanent put (the proxy has no way to cancel it: it lapses within 24 h)."""
        return self.book.drop_put(key, value_id)

    async def _run_put_refresh(self) -> None:
        while True:
            with trio.move_on_at(self.book.next_put_refresh()):
                await self._puts_wake.wait()
            self._puts_wake = trio.Event()
            for held in self.book.puts_due(trio.current_time()):
                await self._repost(held)

    async def _repost(self, held: HeldPut) -> bool:
        try:
            ok = await self._post(held.key, held.value, permanent=True)
        except ProxyError as exc:
            log.warning("re-POST of permanent put %d on %s failed: %s", held.value.id, held.key, exc)
            ok = False
        if (held.key, held.value.id) in self.book.puts:
            if ok:
                self.book.put_refreshed(held, trio.current_time())
            else:
                held.refresh_at = trio.current_time() + PUT_RETRY
        self._puts_wake.set()
        return ok

    # -- listen ----------------------------------------------------------------------------------------------

    @asynccontextmanager
    async def listen(
        self, key: InfoHash, query: Query | None = None
    ) -> AsyncIterator[AsyncIterator[ValueEvent]]:
        """``async with dht.listen(key) as events: async for event in events``: current values first, then
        every change (``event.expired`` for values that went away), each exactly once.

        Push mode SUBSCRIBEs and learns of changes from :meth:`push_notification_received`; stream mode
        keeps a LISTEN stream open. Either way entering returns once the first attempt was made: if the proxy
        cannot be reached, the listen keeps retrying in the background.
        """
        if self._closed:
            raise ProxyError("listen: the proxy client is closed")
        send, receive = trio.open_memory_channel[ValueEvent](math.inf)

        def deliver(event: ValueEvent) -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                send.send_nowait(event)

        listener = Listener(query, deliver)
        watch, created = self.book.add_listener(key, listener)
        if created:
            task = self._tasks[key] = WatchTask()
            # One watch per key serves every listener of it, so no one listener can own its task.
            await self._nursery.start(self._run_watch, watch, task)
        try:
            async with receive:
                yield receive
        finally:
            ended = self.book.remove_listener(key, listener)
            send.close()
            if ended is not None:
                task = self._tasks.pop(key)
                task.scope.cancel()
                await self._unsubscribe(ended)

    async def _run_watch(self, watch: Watch, task: WatchTask, task_status: trio.TaskStatus[None]) -> None:
        with task.scope:
            if self.push_mode:
                await self._run_subscription(watch, task, task_status)
            else:
                backoff = self._stream_backoff or Backoff()
                await run_listen_stream(self._http, watch, task, backoff, self.get, task_status)

    # push mode

    async def _run_subscription(
        self, watch: Watch, task: WatchTask, task_status: trio.TaskStatus[None]
    ) -> None:
        await self._subscribe(watch, task)
        task_status.started()
        while True:
            with trio.move_on_at(self.book.next_subscription_action(watch)):
                await task.wake.wait()
            task.wake = trio.Event()
            await self._subscribe(watch, task, only_if_due=True)

    async def _subscribe(self, watch: Watch, task: WatchTask, *, only_if_due: bool = False) -> bool:
        """SUBSCRIBE ``watch`` with the current token; then deliver its values (from the reply, or a GET
        when it was not subscribed before). Failures are recorded for a retry, not raised.

        ``only_if_due``: only if a SUBSCRIBE is due (checked under the lock, so that the timer and a new
        token do not both send one).
        """
        async with task.lock:
            if self.book.watches.get(watch.key) is not watch:
                return False  # its last listener left meanwhile
            token = self._push_token
            if only_if_due and not self.book.subscription_due(watch, token, trio.current_time()):
                return True
            was_subscribed = watch.state is SubscriptionState.SUBSCRIBED and watch.token == token
            body = self.book.subscribe_body(
                watch,
                token,
                platform=self.platform,
                topic=self.topic,
                refresh=watch.subscribed_at > -math.inf,
            )
            path = key_path(watch.key)
            try:
                response = await self._http.request("SUBSCRIBE", path, dumps(body))
                check_status(response, f"SUBSCRIBE {path}")
                snapshot = self.book.subscribed(watch, token, response.content, trio.current_time())
            except (ProxyError, ValueError) as exc:
                retry = self.book.subscribe_failed(watch, trio.current_time())
                delay = retry - trio.current_time()
                log.warning("SUBSCRIBE %s failed (retry in %.0f s): %s", watch.key, delay, exc)
                return False
            finally:
                task.wake.set()
        if snapshot is not None:
            watch.publish(watch.cache.reconcile(snapshot))
        elif not was_subscribed:
            await self._fetch_quietly(watch)
        return True

    async def _unsubscribe(self, watch: Watch) -> None:
        body = self.book.unsubscribe_body(watch)
        if body is None:
            return
        path = key_path(watch.key)
        with trio.CancelScope(shield=True):
            try:
                response = await self._http.request("UNSUBSCRIBE", path, dumps(body))
                check_status(response, f"UNSUBSCRIBE {path}")
            except ProxyError as exc:
                log.info("UNSUBSCRIBE %s: %s", watch.key, exc)

    async def _fetch(self, watch: Watch, t: int | None = None) -> None:
        values = await self.get(watch.key)
        watch.publish(watch.cache.reconcile(values, t))

    async def _fetch_quietly(self, watch: Watch) -> None:
        try:
            await self._fetch(watch)
        except ProxyError as exc:
            log.warning("GET %s for its listeners failed: %s", watch.key, exc)

    async def set_push_token(self, token: str) -> None:
        """Use a new push token: re-SUBSCRIBE every listened key with it, then UNSUBSCRIBE the old one (which
        OpenDHT leaves pushing to a dead token for up to 24 h). A failed re-SUBSCRIBE is retried later."""
        if token == self._push_token:
            return
        if not token or not self._push_token:
            raise ValueError("switching between push and stream mode needs a new client")
        self._push_token = token
        old = [(watch, self.book.unsubscribe_body(watch)) for watch in self.book.watches.values()]
        async with trio.open_nursery() as nursery:
            for watch, _ in old:
                nursery.start_soon(partial(self._subscribe, watch, self._tasks[watch.key], only_if_due=True))
        for watch, body in old:
            if body is not None:
                path = key_path(watch.key)
                try:
                    await self._http.request("UNSUBSCRIBE", path, dumps(body))
                except ProxyError as exc:
                    log.info("UNSUBSCRIBE %s of the old token: %s", watch.key, exc)

    # -- push notifications ----------------------------------------------------------------------------------

    async def push_notification_received(self, notification: str | bytes | Mapping[str, Any]) -> PushResult:
        """Handle a push's data (a JSON string, or a mapping as mobile push libraries give it, values as
        strings) and return what was done.

        A wake-up GETs the key and delivers only real changes; an ``exp`` push expires those values; a
        timeout push re-SUBSCRIBEs (or, with ``vid``, re-POSTs that permanent put); a push for another
        session fetches and re-SUBSCRIBEs instead of being dropped. Raises
        :class:`~trio_dht.client.push_state.InvalidPushNotification` for something that is not a JSON object,
        and :class:`ProxyError` when a request it needed failed (its listeners resync once the proxy is back).
        """
        data = parse_notification(notification)
        now = trio.current_time()
        decision = self.book.interpret(data, now, push_mode=self.push_mode, stopped=self._closed)
        if decision.result is PushResult.IGNORED_STOPPED:
            return decision.result
        if not self.connected:
            self._health_wake.set()  # a push while not connected: the proxy may be back, check at once
        await self._carry_out(decision)
        return decision.result

    async def _carry_out(self, decision: PushDecision) -> None:
        if decision.expire is not None:
            key, ids = decision.expire
            watch = self.book.watches.get(key)
            if watch is not None:
                watch.publish(watch.cache.expire_ids(ids, decision.t))
        for key in decision.fetch:
            watch = self.book.watches.get(key)
            if watch is not None:
                await self._fetch(watch, decision.t)
        for key in decision.resubscribe:
            watch, task = self.book.watches.get(key), self._tasks.get(key)
            if watch is not None and task is not None and not await self._subscribe(watch, task):
                raise ProxyError(f"SUBSCRIBE {key_path(key)} failed (retried later)")
        if decision.refresh_put is not None:
            held = self.book.puts.get(decision.refresh_put)
            if held is not None and not await self._repost(held):
                raise ProxyError(f"re-POST of permanent put {held.value.id} failed (retried later)")

    # -- health ----------------------------------------------------------------------------------------------

    async def _run_health(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._check_health()
        task_status.started()
        while True:
            interval = HEALTH_INTERVAL_CONNECTED if self.connected else HEALTH_INTERVAL_OTHERWISE
            with trio.move_on_after(interval):
                await self._health_wake.wait()
            self._health_wake = trio.Event()
            await self._check_health()

    async def _check_health(self) -> None:
        try:
            response = await self._http.request("GET", "/")
            check_status(response, "GET /")
            health = health_from_info(response.json())
        except ProxyError as exc:
            health = unreachable(str(exc))
        except ValueError:
            health = unreachable("GET /: the reply is not JSON")
        self._health_wake = trio.Event()  # this check answers the wake-ups so far
        old, self._health = self._health, health
        first, self._checked = not self._checked, True
        if health.status is old.status:
            return
        if health.connected:
            log.info("proxy %s connected (%d good nodes)", self.base_url, health.good)
        else:
            log.warning("proxy %s is %s: %s", self.base_url, health.status.value, health.error)
        if health.connected and not first:
            self._resync_all()

    def _resync_all(self) -> None:
        """The proxy is connected again: do not trust that nothing was missed meanwhile."""
        now = trio.current_time()
        for key, task in self._tasks.items():
            watch = self.book.watches.get(key)
            if watch is None:
                continue
            if not self.push_mode:
                task.restart_stream()
            elif watch.state is SubscriptionState.SUBSCRIBED:
                self._nursery.start_soon(self._fetch_quietly, watch)
            else:
                self.book.retry_now(watch, now)
                task.wake.set()
        for held in self.book.puts.values():
            held.refresh_at = now
        self._puts_wake.set()

    # -- closing ---------------------------------------------------------------------------------------------

    async def _close(self) -> None:
        """Stop: UNSUBSCRIBE what is still subscribed (bounded by the timeout), then refuse further work."""
        watches = list(self.book.watches.values())
        for watch in watches:
            task = self._tasks.pop(watch.key, None)
            if task is not None:
                task.scope.cancel()
        async with trio.open_nursery() as nursery:
            for watch in watches:
                nursery.start_soon(self._unsubscribe, watch)
        self._http.closed = True


@asynccontextmanager
async def open_proxy_client(
    url: str,
    push_token: str | None = None,
    platform: str = "android",
    topic: str | None = None,
    client_id: str = DEFAULT_CLIENT_ID,
    *,
    dialect: Dialect | str = Dialect.CURRENT,
    session_id: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    subscription_refresh: float = SUBSCRIPTION_REFRESH,
    resubscribe_guard: float = RESUBSCRIBE_GUARD,
    stream_backoff: Backoff | None = None,
    verify: Any = True,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[ProxyClient]:
    """A :class:`ProxyClient` for the proxy at ``url``, until the block ends.

    ``push_token`` (the device's FCM/APNs token, or a UnifiedPush endpoint URL) turns on push mode, with
    ``platform`` (``android``, ``ios``, ``unifiedpush``) and ``topic``; ``client_id`` names the app or account
    (it comes back as ``to`` in pushes). A push for another session re-SUBSCRIBEs at most every
    ``resubscribe_guard`` seconds (it always fetches). ``dialect`` is ``"current"`` (OpenDHT today) or
    ``"seed"`` (subscriptions named by ``callback_id``, SUBSCRIBE replying ``{"token": x}``). ``timeout``
    bounds every request. ``transport`` replaces the HTTP transport (tests: ``httpx.MockTransport``).

    Entering checks the proxy once (``GET /``) but does not fail if it is down: see
    :attr:`ProxyClient.health`. On exit, subscriptions still open are UNSUBSCRIBEd.
    """
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    book = ListenBook(
        dialect=Dialect(dialect),
        client_id=client_id,
        session_id=session_id,
        subscription_refresh=subscription_refresh,
        resubscribe_guard=resubscribe_guard,
    )
    async with (
        new_http_client(timeout, verify=verify, transport=transport) as http,
        trio.open_nursery() as nursery,
    ):
        client = ProxyClient(
            http,
            nursery,
            normalize_url(url),
            book,
            push_token=push_token,
            platform=platform,
            topic=topic or "",
            timeout=timeout,
            stream_backoff=stream_backoff,
        )
        await nursery.start(client._run_health)
        nursery.start_soon(client._run_put_refresh)
        try:
            yield client
        finally:
            await client._close()
            nursery.cancel_scope.cancel()
