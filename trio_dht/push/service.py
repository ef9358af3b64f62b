"""The push service (Trio shell): runs the subscription book against a DHT and hands pushes to the dispatcher.

The HTTP routes call :meth:`PushService.subscribe` and :meth:`PushService.unsubscribe` with the key and the
raw body, and write the :class:`PushReply` they get back. :meth:`PushService.run` must be running (started
with ``await nursery.start(service.run)``) in the proxy's nursery; it supervises:

- one timer task driving the book's deadline heap (timeout pushes a margin before each deadline, expiry at
  it);
- one DHT listen task per key that has subscriptions, shared by them, inside a cancel scope whose deadline is
  the latest of their deadlines: without a refresh the listen ends when the last subscription does. A key's
  values and expirations become one wake-up per subscription (the dispatcher coalesces bursts).

A task per *key* rather than per subscription keeps memory near one task per watched key (about 3 KB) plus a
few hundred bytes per subscription; the deadlines themselves live in the book's heap (see
:mod:`~trio_dht.push.subscriptions`).

With a :class:`~trio_dht.persist.StateStore`, every change is committed before the reply acknowledges it, and
:meth:`run` restores subscriptions with their absolute deadlines. Restored listens and overdue timeout pushes
are spread at ``startup_rate`` per second, so a restart does not burst the gateways.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import trio

from trio_dht.api import Dht, ValueEvent
from trio_dht.infohash import InfoHash
from trio_dht.persist import StateStore, StoredSubscription
from trio_dht.push import ssrf
from trio_dht.push.dispatcher import Dispatcher
from trio_dht.push.payloads import Dialect, Platform
from trio_dht.push.requests import BadRequest, parse_subscribe, parse_unsubscribe
from trio_dht.push.subscriptions import (
    DEFAULT_LIFETIME,
    Subscription,
    SubscriptionBook,
    SubscriptionState,
    Transition,
)
from trio_dht.value import Value

log = logging.getLogger(__name__)

LISTEN_RETRY_DELAY = 5.0
"""Pause before a DHT listen that failed or ended is started again."""
_EMPTY_OBJECT = b"{}\n"
_INTERNAL_ERROR = b'{"err":"Internal server error"}\n'


@dataclass(frozen=True, slots=True)
class PushReply:
    """What a SUBSCRIBE or UNSUBSCRIBE route answers.

    Write ``status`` with ``Content-Type: application/json``; if ``chunked``, stream the response
    (``Transfer-Encoding: chunked``): ``body`` (if any) then, if ``values`` is not None, one value JSON per
    line; otherwise send ``body`` with a ``Content-Length``.
    """

    status: int
    body: bytes = b""
    chunked: bool = False
    values: list[Value] | None = None


class _Watch:
    """The DHT listen of one key: its cancel scope and the ids (with priorities) of the values it has seen."""

    __slots__ = ("live", "scope")

    def __init__(self, deadline: float) -> None:
        self.scope = trio.CancelScope(deadline=deadline)
        self.live: dict[int, int] = {}


class PushService:
    """Push subscriptions of one proxy: SUBSCRIBE/UNSUBSCRIBE, deadlines, DHT listens, pushes."""

    def __init__(
        self,
        dht: Dht,
        dispatcher: Dispatcher,
        *,
        lifetime: float = DEFAULT_LIFETIME,
        margin: float | None = None,
        store: StateStore | None = None,
        allow_private_endpoints: bool = False,
        startup_rate: float = 200.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._dht = dht
        self._dispatcher = dispatcher
        self.book = SubscriptionBook(lifetime=lifetime, margin=margin)
        self._store = store
        self._allow_private = allow_private_endpoints
        self._startup_rate = startup_rate
        self._wall_clock = wall_clock
        self._watches: dict[InfoHash, _Watch] = {}
        self._nursery: trio.Nursery | None = None
        self._timer_wake = trio.Event()
        self._timer_due = math.inf
        self.stats: Counter[str] = Counter()
        dispatcher.on_token_gone(self._prune_token)

    @property
    def push_listeners_count(self) -> int:
        """Distinct device tokens with a subscription (OpenDHT's ``pushListenersCount``)."""
        return self.book.token_count

    @property
    def watched_keys(self) -> int:
        return len(self._watches)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Restore stored subscriptions, then run timers and listens until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                self._restore()
                nursery.start_soon(self._drive_timers)
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    # -- HTTP entry points -----------------------------------------------------------------------------------

    async def subscribe(self, key: InfoHash, body: bytes) -> PushReply:
        """Handle ``SUBSCRIBE /key/{key}`` (or ``/{key}``) with this raw body."""
        if self._nursery is None:
            raise RuntimeError("PushService.run is not running")
        try:
            request = parse_subscribe(body)
            if request.platform is Platform.UNIFIEDPUSH:
                try:
                    ssrf.parse_endpoint(request.token, allow_private=self._allow_private)
                except ssrf.ForbiddenEndpoint as exc:
                    raise BadRequest(f"Bad endpoint: {exc}") from None
            sub, created = self.book.subscribe(key, request, trio.current_time())
        except BadRequest as exc:
            return PushReply(exc.status, exc.body)
        if not self._save(sub):
            if created:
                self.book.remove(sub)
            return PushReply(500, _INTERNAL_ERROR)
        self.stats["subscribed" if created else "refreshed"] += 1
        watch = self._watches.get(key)
        if created and watch is not None and watch.live:
            high = any(prio == 0 for prio in watch.live.values())
            self._dispatcher.submit(self.book.values_push(sub, t_ms=self._now_ms(), high_priority=high))
        self._update_watch(key)
        if sub.due < self._timer_due:
            self._timer_wake.set()
        if sub.dialect is Dialect.SEED:
            return PushReply(200, json.dumps({"token": sub.sid}).encode() + b"\n")
        if created:
            return PushReply(200, _EMPTY_OBJECT)
        if request.refresh:
            return PushReply(200, _EMPTY_OBJECT, chunked=True)
        return PushReply(200, chunked=True, values=await self._dht.get(key))

    def unsubscribe(self, key: InfoHash, body: bytes) -> PushReply:
        """Handle ``UNSUBSCRIBE /key/{key}`` (or ``/{key}``): 200 with an empty body, even if nothing
        matched."""
        try:
            request = parse_unsubscribe(body)
        except BadRequest as exc:
            return PushReply(exc.status, exc.body)
        removed = self.book.unsubscribe(key, request)
        self.stats["unsubscribed"] += len(removed)
        self._ended(removed)
        return PushReply(200)

    # -- timers ----------------------------------------------------------------------------------------------

    async def _drive_timers(self) -> None:
        while True:
            for transition in self.book.advance(trio.current_time()):
                self._on_transition(transition)
            due = self.book.next_due()
            self._timer_due = math.inf if due is None else due
            self._timer_wake = trio.Event()
            with trio.move_on_at(self._timer_due):
                await self._timer_wake.wait()

    def _on_transition(self, transition: Transition) -> None:
        sub = transition.subscription
        if transition.state is SubscriptionState.TIMEOUT_PUSH_SENT:
            self.stats["timeout-pushes"] += 1
            self._dispatcher.submit(self.book.timeout_push(sub))
            self._save(sub)
        else:
            self.stats["expired"] += 1
            self._ended([sub])

    # -- DHT listens -----------------------------------------------------------------------------------------

    def _update_watch(self, key: InfoHash, *, start_delay: float = 0.0) -> None:
        """Start, move or stop the listen of ``key`` to match the deadlines of its subscriptions."""
        deadline = self.book.key_deadline(key)
        watch = self._watches.get(key)
        if deadline is None:
            if watch is not None:
                watch.scope.cancel()
                del self._watches[key]
        elif watch is None:
            assert self._nursery is not None
            watch = self._watches[key] = _Watch(deadline)
            self._nursery.start_soon(self._run_watch, key, watch, start_delay)
        else:
            watch.scope.deadline = deadline

    async def _run_watch(self, key: InfoHash, watch: _Watch, start_delay: float) -> None:
        with watch.scope:
            await trio.sleep(start_delay)
            while True:
                try:
                    async with self._dht.listen(key) as events:
                        async for event in events:
                            self._on_event(key, watch, event)
                except Exception:
                    log.exception("push listen on %s failed; restarting", key.hex())
                    self.stats["listen-failures"] += 1
                await trio.sleep(LISTEN_RETRY_DELAY)
        if self._watches.get(key) is watch:
            del self._watches[key]

    def _on_event(self, key: InfoHash, watch: _Watch, event: ValueEvent) -> None:
        value = event.value
        if event.expired:
            watch.live.pop(value.id, None)
        else:
            watch.live[value.id] = value.prio
        high = not event.expired and value.prio == 0
        expired_id = value.id if event.expired else None
        t_ms = self._now_ms()
        for sub in self.book.on_key(key):
            push = self.book.values_push(sub, t_ms=t_ms, high_priority=high, expired_id=expired_id)
            self._dispatcher.submit(push)

    # -- endings, pruning, persistence -----------------------------------------------------------------------

    def _ended(self, subs: list[Subscription]) -> None:
        """Clean up after subscriptions the book removed: pending pushes, stored rows, listens."""
        if not subs:
            return
        for sub in subs:
            self._dispatcher.discard(sub.sid)
        if self._store is not None:
            try:
                self._store.delete_subscriptions([sub.sid for sub in subs])
            except sqlite3.Error:
                log.exception("cannot delete %d stored subscriptions", len(subs))
        for key in {sub.key for sub in subs}:
            self._update_watch(key)

    def _prune_token(self, token: str) -> None:
        removed = self.book.remove_token(token)
        self.stats["pruned"] += len(removed)
        self._ended(removed)

    def _now_ms(self) -> int:
        return int(self._wall_clock() * 1000)

    def _save(self, sub: Subscription) -> bool:
        if self._store is None:
            return True
        wall_deadline = sub.deadline - trio.current_time() + self._wall_clock()
        try:
            self._store.save_subscription(
                StoredSubscription(
                    sid=sub.sid,
                    dialect=sub.dialect.value,
                    token=sub.token,
                    key=bytes(sub.key),
                    client_id=sub.client_id,
                    session_id=sub.session_id,
                    platform=sub.platform.value,
                    topic=sub.topic,
                    deadline=wall_deadline,
                    state=sub.state.value,
                )
            )
        except sqlite3.Error:
            log.exception("cannot store subscription %d", sub.sid)
            return False
        return True

    def _restore(self) -> None:
        if self._store is None:
            return
        now, wall = trio.current_time(), self._wall_clock()
        stale: list[int] = []
        first_delay: dict[InfoHash, float] = {}
        for row in self._store.load_subscriptions():
            delay = len(first_delay) / self._startup_rate
            try:
                sub = Subscription(
                    sid=row.sid,
                    dialect=Dialect(row.dialect),
                    token=row.token,
                    key=InfoHash(row.key),
                    client_id=row.client_id,
                    session_id=row.session_id,
                    platform=Platform(row.platform),
                    topic=row.topic,
                    deadline=row.deadline - wall + now,
                    state=SubscriptionState(row.state),
                )
            except ValueError:
                stale.append(row.sid)
                continue
            if not self.book.restore(sub, now, delay=delay):
                stale.append(row.sid)
                continue
            first_delay.setdefault(sub.key, delay)
        if stale:
            self._store.delete_subscriptions(stale)
        for key, delay in first_delay.items():
            self._update_watch(key, start_delay=delay)
        self.stats["restored"] += len(self.book)
        log.info("restored %d push subscriptions (%d stale)", len(self.book), len(stale))
