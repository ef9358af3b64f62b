"""The push service (Trio shell): runs the subscription book against a DHT and hands pushes to the dispatcher.

The HTTP routes call :meth:`PushService.subscribe` and :meth:`PushService.unsubscribe` with the key and the
raw body, and write the :class:`PushReply` they get back. :meth:`PushService.run` must be running (started
with ``await nursery.start(service.run)``) in the proxy's nursery; it supervises:

- one timer task driving the book's deadline heap (timeout pushes a margin before each deadline, expiry at
  it); an expiry or an unsubscribe that leaves a key without subscriptions cancels the key's DHT listen.

Each key that has subscriptions has one DHT listen, shared by them: a callback listen
(:meth:`~trio_dht.api.Dht.add_listener`), so it costs no task, only the node's shared per-key state and a
small :class:`_Watch` here. A key's values and expirations become one wake-up per subscription (the dispatcher
coalesces bursts). The deadlines live in the book's heap (see :mod:`~trio_dht.push.subscriptions`), so a
subscription costs a few hundred bytes on top of its key's listen.

With a :class:`~trio_dht.persist.StateStore`, a SUBSCRIBE or UNSUBSCRIBE is written to it before the book
changes: if the write fails, nothing changes and the reply is a 503. Changes the timers make (a timeout push
sent, an expiry, a pruned token) are written as well as the file allows (a failure is logged and counted: an
expired row is dropped on load anyway). :meth:`run` restores subscriptions
with their absolute deadlines and their sources. Restored listens and overdue timeout pushes
are spread at ``startup_rate`` per second, so a restart does not burst the gateways.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import trio

from trio_dht.api import Dht, ListenHandle, ValueEvent
from trio_dht.infohash import InfoHash
from trio_dht.limits import DEFAULT as DEFAULT_LIMITS
from trio_dht.limits import Limits
from trio_dht.persist import UNAVAILABLE, PersistError, StateStore, StoredSubscription
from trio_dht.push import ssrf
from trio_dht.push.dispatcher import Dispatcher
from trio_dht.push.payloads import Dialect, Platform
from trio_dht.push.subscribe_bodies import BadRequest, parse_subscribe, parse_unsubscribe
from trio_dht.push.subscriptions import (
    DEFAULT_LIFETIME,
    Change,
    Subscription,
    SubscriptionBook,
    SubscriptionState,
    Transition,
)
from trio_dht.value import Value

log = logging.getLogger(__name__)

_EMPTY_OBJECT = b"{}\n"


@dataclass(frozen=True, slots=True)
class PushReply:
    """What a SUBSCRIBE or UNSUBSCRIBE route answers.

    Write ``status`` with ``Content-Type: application/json``; if ``chunked``, stream the response
    (``Transfer-Encoding: chunked``): ``body`` (if any) then, if ``values`` is not None, one value JSON per
    line; otherwise send ``body`` with a ``Content-Length``. ``fetch_values``: the values are those now under
    the key, which the HTTP layer gets from the DHT (:func:`trio_dht.proxy.routes.subscribe`).
    """

    status: int
    body: bytes = b""
    chunked: bool = False
    values: list[Value] | None = None
    fetch_values: bool = False

    def with_values(self, values: list[Value]) -> PushReply:
        """This reply, chunked, with ``values`` after its body."""
        return replace(self, chunked=True, values=values, fetch_values=False)


_CREATED = PushReply(200, _EMPTY_OBJECT)
_REFRESHED = PushReply(200, _EMPTY_OBJECT, chunked=True)
_FETCH_VALUES = PushReply(200, chunked=True, fetch_values=True)
_STATE_UNAVAILABLE = PushReply(503, BadRequest(UNAVAILABLE, 503).body)


class _Watch:
    """The DHT listen of one key, and its callback: its handle (None until started) and the ids, with their
    priorities, of the values it has seen (None while there are none: most keys never hold a value)."""

    __slots__ = ("handle", "key", "live", "service")

    def __init__(self, service: PushService, key: InfoHash) -> None:
        self.service = service
        self.key = key
        self.handle: ListenHandle | None = None
        self.live: dict[int, int] | None = None

    def __call__(self, event: ValueEvent) -> None:
        self.service._on_event(self.key, self, event)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


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
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self._dht = dht
        self._dispatcher = dispatcher
        self.book = SubscriptionBook(
            lifetime=lifetime,
            margin=margin,
            per_source=limits.subscriptions_per_source,
            total=limits.subscriptions_total,
        )
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
                restored = self._restore()
                nursery.start_soon(self._drive_timers)
                if restored:
                    nursery.start_soon(self._start_restored, restored)
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None
                for watch in self._watches.values():
                    watch.cancel()
                self._watches.clear()

    # -- HTTP entry points -----------------------------------------------------------------------------------

    async def subscribe(self, key: InfoHash, body: bytes, source: str = "") -> PushReply:
        """Handle ``SUBSCRIBE /key/{key}`` (or ``/{key}``) with this raw body (:meth:`subscribe_now`, and the
        values it asks for)."""
        reply = self.subscribe_now(key, body, source)
        return reply.with_values(await self._dht.get(key)) if reply.fetch_values else reply

    def subscribe_now(self, key: InfoHash, body: bytes, source: str = "") -> PushReply:
        """Handle ``SUBSCRIBE`` from ``source`` (the client's address bucket; ``""`` if unknown) without
        waiting: a repeated subscription without ``refresh`` is answered with the key's values, which the
        reply's ``fetch_values`` leaves to the caller to get. 429 if it is new and ``source`` holds
        ``Limits.subscriptions_per_source`` already; 503 if it is new and the book holds
        ``Limits.subscriptions_total``, or if the state file cannot take it."""
        if self._nursery is None:
            raise RuntimeError("PushService.run is not running")
        try:
            request = parse_subscribe(body)
            if request.platform is Platform.UNIFIEDPUSH:
                try:
                    ssrf.parse_endpoint(request.token, allow_private=self._allow_private)
                except ssrf.ForbiddenEndpoint as exc:
                    raise BadRequest(f"Bad endpoint: {exc}") from None
            change = self.book.prepare(key, request, trio.current_time(), source)
        except BadRequest as exc:
            return PushReply(exc.status, exc.body)
        if not self._save(change.sub, change):
            return _STATE_UNAVAILABLE
        sub = self.book.commit(change)
        created = change.created
        self.stats["subscribed" if created else "refreshed"] += 1
        watch = self._watches.get(key)
        if watch is None:
            watch = self._watches[key] = _Watch(self, key)
            self._start_watch(key, watch)
        elif created and watch.live:  # a late joiner hears of the values already there
            high = any(prio == 0 for prio in watch.live.values())
            self._dispatcher.submit(self.book.values_push(sub, t_ms=self._now_ms(), high_priority=high))
        if sub.due < self._timer_due:
            self._timer_wake.set()
        if sub.dialect is Dialect.SEED:
            return PushReply(200, json.dumps({"token": sub.sid}).encode() + b"\n")
        if created:
            return _CREATED
        if request.refresh:
            return _REFRESHED
        return _FETCH_VALUES

    def unsubscribe(self, key: InfoHash, body: bytes) -> PushReply:
        """Handle ``UNSUBSCRIBE /key/{key}`` (or ``/{key}``): 200 with an empty body, even if nothing
        matched."""
        try:
            request = parse_unsubscribe(body)
        except BadRequest as exc:
            return PushReply(exc.status, exc.body)
        sub = self.book.named(key, request)
        if sub is not None:
            if not self._delete([sub]):
                return _STATE_UNAVAILABLE
            self.book.remove(sub)
            self.stats["unsubscribed"] += 1
            self._ended([sub], deleted=True)
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

    def _update_watch(self, key: InfoHash, *, start: bool = True) -> None:
        """Start or stop the listen of ``key`` to match whether it has subscriptions (``start=False``: only
        record the watch; :meth:`_start_restored` starts it later)."""
        watch = self._watches.get(key)
        if not self.book.watched(key):
            if watch is not None:
                watch.cancel()
                del self._watches[key]
        elif watch is None:
            watch = self._watches[key] = _Watch(self, key)
            if start:
                self._start_watch(key, watch)

    def _start_watch(self, key: InfoHash, watch: _Watch) -> None:
        try:
            watch.handle = self._dht.add_listener(key, watch)
        except Exception:
            log.exception("push listen on %s failed", key.hex())

    async def _start_restored(self, keys: list[InfoHash]) -> None:
        """Start the listens of restored keys at ``startup_rate`` per second, so a restart does not burst
        the gateways with the pushes of values found under them."""
        for i, key in enumerate(keys):
            if i:
                await trio.sleep(1 / self._startup_rate)
            watch = self._watches.get(key)
            if watch is not None and watch.handle is None:
                self._start_watch(key, watch)

    def _on_event(self, key: InfoHash, watch: _Watch, event: ValueEvent) -> None:
        value = event.value
        if event.expired:
            if watch.live is not None:
                watch.live.pop(value.id, None)
        else:
            if watch.live is None:
                watch.live = {}
            watch.live[value.id] = value.prio
        high = not event.expired and value.prio == 0
        expired_id = value.id if event.expired else None
        t_ms = self._now_ms()
        for sub in self.book.on_key(key):
            push = self.book.values_push(sub, t_ms=t_ms, high_priority=high, expired_id=expired_id)
            self._dispatcher.submit(push)

    # -- endings, pruning, persistence -----------------------------------------------------------------------

    def _ended(self, subs: list[Subscription], *, deleted: bool = False) -> None:
        """Clean up after subscriptions the book removed: pending pushes, stored rows (unless ``deleted``
        already), listens."""
        if not subs:
            return
        for sub in subs:
            self._dispatcher.discard(sub.sid)
        if not deleted:
            self._delete(subs)
        for key in {sub.key for sub in subs}:
            self._update_watch(key)

    def _prune_token(self, token: str) -> None:
        removed = self.book.remove_token(token)
        self.stats["pruned"] += len(removed)
        self._ended(removed)

    def _now_ms(self) -> int:
        return int(self._wall_clock() * 1000)

    def _delete(self, subs: list[Subscription]) -> bool:
        """Delete the stored rows of ``subs``; False if the state file refused (logged and counted by it)."""
        if self._store is None:
            return True
        try:
            self._store.delete_subscriptions([sub.sid for sub in subs])
        except PersistError:
            self.stats["save-errors"] += 1
            return False
        return True

    def _save(self, sub: Subscription, change: Change | None = None) -> bool:
        """Store ``sub`` as it is, or as ``change`` makes it; False if the state file refused (logged and
        counted by it)."""
        if self._store is None:
            return True
        if change is None:
            change = Change(sub, False, sub.platform, sub.topic, sub.session_id, sub.deadline)
            state = sub.state
        else:
            state = SubscriptionState.ACTIVE
        wall_deadline = change.deadline - trio.current_time() + self._wall_clock()
        try:
            self._store.save_subscription(
                StoredSubscription(
                    sid=sub.sid,
                    dialect=sub.dialect.value,
                    token=sub.token,
                    key=bytes(sub.key),
                    client_id=sub.client_id,
                    session_id=change.session_id,
                    platform=change.platform.value,
                    topic=change.topic,
                    deadline=wall_deadline,
                    state=state.value,
                    source=sub.source,
                )
            )
        except PersistError:
            self.stats["save-errors"] += 1
            return False
        return True

    def _restore(self) -> list[InfoHash]:
        """Load stored subscriptions into the book; the keys whose listens :meth:`_start_restored` starts."""
        if self._store is None:
            return []
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
                    source=row.source,
                )
            except ValueError as exc:
                log.warning("skipping stored subscription %d: %s", row.sid, exc)
                self._store.skipped += 1
                stale.append(row.sid)
                continue
            if not self.book.restore(sub, now, delay=delay):
                stale.append(row.sid)
                continue
            first_delay.setdefault(sub.key, delay)
        if stale:
            try:
                self._store.delete_subscriptions(stale)
            except PersistError:  # logged by the store; the rows are stale again at the next start
                self.stats["save-errors"] += 1
        for key in first_delay:
            self._update_watch(key, start=False)
        self.stats["restored"] += len(self.book)
        log.info("restored %d push subscriptions (%d stale)", len(self.book), len(stale))
        return list(first_delay)
