"""Delivery users can trust: batching, coalescing, retries with backoff, ``Retry-After``, and token pruning.

:class:`DeliveryQueue` is the sans-IO core; :class:`Dispatcher` is its Trio shell, which owns the gateways,
the clock and the worker tasks. Neither knows any provider's JSON: a gateway renders, the queue decides when.

- **Coalescing.** At most one push per slot (subscription, kind) waits in the queue: a newer one is merged
  into it (:meth:`~trio_dht.push.payloads.Push.merged_with`), so a gateway outage costs one entry per
  subscription, never a backlog, and after recovery each subscription gets exactly one wake-up.
- **Batching.** Pushes wait in a lane (``(gateway, gateway.lane(push))``) for at most ``batch_window``
  seconds, or until a full batch of ``gateway.max_batch`` is ready. One batch per lane is in flight at a time.
- **Retries.** A failed request (:class:`~trio_dht.push.gateway.TemporaryGatewayError`) puts its pushes back
  (merged with anything newer) and backs the lane off: exponential with jitter from ``backoff_base`` to
  ``backoff_cap``, or the gateway's ``Retry-After``. Such retries never give up: an outage loses no wake-up.
  A push that fails alone (``Outcome.RETRY``) is retried after its own backoff, at most ``max_attempts``
  times.
- **Pruning.** ``Outcome.TOKEN_GONE`` reports the token to the owner (the service drops its subscriptions).

Lanes are few (one per gorush connection, one per Web Push host), so picking the next batch scans the lanes
that have work; the pending pushes of a lane are an insertion-ordered dict, so every step is O(1) per push.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field

import trio

from trio_dht.push.gateway import Gateway, Outcome, PermanentGatewayError, TemporaryGatewayError
from trio_dht.push.payloads import Platform, Push, PushKind

log = logging.getLogger(__name__)

Slot = tuple[int, PushKind]
LaneKey = tuple[str, Hashable]


@dataclass(slots=True)
class _Entry:
    push: Push
    attempts: int = 0


@dataclass(slots=True)
class _Lane:
    max_batch: int
    pending: dict[Slot, _Entry] = field(default_factory=dict)
    delayed: list[tuple[float, int, Slot]] = field(default_factory=list)
    """Pushes retried alone, parked until their time: ``(when, seq, slot)`` (entry stays in ``parked``)."""
    parked: dict[Slot, _Entry] = field(default_factory=dict)
    first_pending_at: float = math.inf
    not_before: float = -math.inf
    failures: int = 0
    busy: bool = False

    def empty(self) -> bool:
        return not self.pending and not self.parked and not self.busy


@dataclass(frozen=True, slots=True)
class Batch:
    """Pushes of one lane handed to one gateway request."""

    lane: LaneKey
    pushes: list[Push]
    attempts: list[int]


class DeliveryQueue:
    """What to send, when, and what to do with the result (sans-IO: every method takes ``now``)."""

    def __init__(
        self,
        *,
        batch_window: float = 0.05,
        backoff_base: float = 1.0,
        backoff_cap: float = 300.0,
        max_attempts: int = 5,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.batch_window = batch_window
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_attempts = max_attempts
        self._rng = rng
        self._lanes: dict[LaneKey, _Lane] = {}
        self._where: dict[Slot, LaneKey] = {}
        """The lane of every queued (pending or parked) slot."""
        self._in_flight: dict[Slot, LaneKey] = {}
        self._seq = 0
        self.stats: Counter[str] = Counter()

    def __len__(self) -> int:
        """Queued pushes (not counting those in flight)."""
        return len(self._where)

    # -- input -----------------------------------------------------------------------------------------------

    def submit(self, push: Push, lane: LaneKey, max_batch: int, now: float) -> None:
        """Queue ``push``, merging it into the push already waiting in its slot, if any."""
        self.stats["submitted"] += 1
        self._enqueue(_Entry(push), lane, max_batch, now)

    def discard(self, sid: int) -> None:
        """Forget every push of a subscription that ended (queued ones now, in-flight ones when they
        return)."""
        for kind in PushKind:
            slot = (sid, kind)
            self._in_flight.pop(slot, None)
            key = self._where.pop(slot, None)
            if key is None:
                continue
            lane = self._lanes[key]
            lane.pending.pop(slot, None)
            lane.parked.pop(slot, None)
            self._drop_if_empty(key)

    # -- scheduling ------------------------------------------------------------------------------------------

    def next_batch(self, now: float) -> Batch | None:
        """A batch that may be sent now (marking its lane busy), or None."""
        for key, lane in self._lanes.items():
            self._unpark(lane, now)
            if lane.busy or not lane.pending or now < lane.not_before:
                continue
            if len(lane.pending) < lane.max_batch and now < lane.first_pending_at + self.batch_window:
                continue
            slots = []
            for slot in lane.pending:
                slots.append(slot)
                if len(slots) == lane.max_batch:
                    break
            entries = [lane.pending.pop(slot) for slot in slots]
            for slot in slots:
                del self._where[slot]
                self._in_flight[slot] = key
            lane.busy = True
            lane.first_pending_at = now if lane.pending else math.inf
            return Batch(key, [e.push for e in entries], [e.attempts for e in entries])
        return None

    def next_due(self) -> float:
        """When :meth:`next_batch` may next return something (``inf``: only after new input)."""
        due = math.inf
        for lane in self._lanes.values():
            if lane.busy:
                continue
            if lane.pending:
                ready = lane.first_pending_at + self.batch_window
                if len(lane.pending) >= lane.max_batch:
                    ready = -math.inf
                due = min(due, max(ready, lane.not_before))
            if lane.delayed:
                due = min(due, max(lane.delayed[0][0], lane.not_before))
        return due

    # -- results ---------------------------------------------------------------------------------------------

    def batch_done(self, batch: Batch, outcomes: list[Outcome], now: float) -> list[str]:
        """Record a gateway's per-push outcomes; returns the tokens reported gone."""
        lane = self._lanes[batch.lane]
        lane.busy = False
        lane.failures = 0
        lane.not_before = -math.inf
        gone: list[str] = []
        for push, attempts, outcome in zip(batch.pushes, batch.attempts, outcomes, strict=True):
            if self._in_flight.pop(push.slot, None) is None:
                self.stats["discarded"] += 1
                continue
            self.stats[outcome.value] += 1
            if outcome is Outcome.TOKEN_GONE:
                gone.append(push.token)
            elif outcome is Outcome.RETRY:
                if attempts + 1 >= self.max_attempts:
                    self.stats["gave-up"] += 1
                else:
                    self._park(
                        _Entry(push, attempts + 1), batch.lane, lane, now + self._backoff(attempts + 1)
                    )
        self._drop_if_empty(batch.lane)
        return gone

    def batch_failed(self, batch: Batch, now: float, retry_after: float | None = None) -> None:
        """A temporary failure of the whole request: requeue its pushes and back the lane off."""
        lane = self._lanes[batch.lane]
        lane.busy = False
        lane.failures += 1
        delay = retry_after if retry_after is not None else self._backoff(lane.failures)
        lane.not_before = now + delay
        self.stats["batch-failed"] += 1
        for push, attempts in zip(batch.pushes, batch.attempts, strict=True):
            if self._in_flight.pop(push.slot, None) is not None:
                self._enqueue(_Entry(push, attempts), batch.lane, lane.max_batch, now, returning=True)
        self._drop_if_empty(batch.lane)

    def batch_dropped(self, batch: Batch) -> None:
        """A permanent failure of the whole request: its pushes are dropped (and counted)."""
        lane = self._lanes[batch.lane]
        lane.busy = False
        for push in batch.pushes:
            if self._in_flight.pop(push.slot, None) is not None:
                self.stats["dropped"] += 1
        self._drop_if_empty(batch.lane)

    # -- internals -------------------------------------------------------------------------------------------

    def _backoff(self, failures: int) -> float:
        delay = min(self.backoff_cap, self.backoff_base * 2 ** min(failures - 1, 30))
        return delay * (0.5 + 0.5 * self._rng())

    def _enqueue(
        self, entry: _Entry, key: LaneKey, max_batch: int, now: float, *, returning: bool = False
    ) -> None:
        slot = entry.push.slot
        old_key = self._where.get(slot)
        if old_key is not None:
            old_lane = self._lanes[old_key]
            old = old_lane.pending.get(slot) or old_lane.parked[slot]
            # ``returning``: ``entry`` came back from a failed request, so the queued one is the newer.
            merged = entry.push.merged_with(old.push) if returning else old.push.merged_with(entry.push)
            entry = _Entry(merged, min(entry.attempts, old.attempts))
            self.stats["coalesced"] += 1
            if old_key == key and slot in old_lane.pending:
                old_lane.pending[slot] = entry  # keeps its place in the batch order and the lane's window
                return
            old_lane.pending.pop(slot, None)
            old_lane.parked.pop(slot, None)
            if old_key != key:
                self._drop_if_empty(old_key)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(max_batch)
        if not lane.pending:
            lane.first_pending_at = now
        lane.pending[slot] = entry
        self._where[slot] = key

    def _park(self, entry: _Entry, key: LaneKey, lane: _Lane, when: float) -> None:
        slot = entry.push.slot
        if slot in self._where:  # a newer push is already queued: it carries this one's news
            self.stats["coalesced"] += 1
            return
        lane.parked[slot] = entry
        self._seq += 1
        heapq.heappush(lane.delayed, (when, self._seq, slot))
        self._where[slot] = key

    def _unpark(self, lane: _Lane, now: float) -> None:
        while lane.delayed and lane.delayed[0][0] <= now:
            _, _, slot = heapq.heappop(lane.delayed)
            entry = lane.parked.pop(slot, None)
            if entry is not None:
                if not lane.pending:
                    lane.first_pending_at = now
                lane.pending[slot] = entry

    def _drop_if_empty(self, key: LaneKey) -> None:
        lane = self._lanes.get(key)
        if lane is not None and lane.empty():
            del self._lanes[key]


class Dispatcher:
    """Sends pushes through the gateway of their platform, running up to ``workers`` requests at once.

    ``gateways`` maps platforms to gateways; a push whose platform has none is dropped and counted (as OpenDHT
    sends nothing when no push server is configured). Call :meth:`submit` from anywhere in the Trio run;
    :meth:`run` must be running for anything to be sent.
    """

    def __init__(
        self,
        gateways: Mapping[Platform, Gateway],
        *,
        queue: DeliveryQueue | None = None,
        workers: int = 16,
    ) -> None:
        self._gateways = dict(gateways)
        self._by_name = {g.name: g for g in self._gateways.values()}
        self.queue = queue if queue is not None else DeliveryQueue()
        self._workers = workers
        self._in_flight = 0
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._kicked = False
        self._token_gone: Callable[[str], None] = lambda token: None

    @property
    def stats(self) -> Counter[str]:
        return self.queue.stats

    def on_token_gone(self, handler: Callable[[str], None]) -> None:
        """Call ``handler(token)`` for every token a gateway reports gone (the service prunes it)."""
        self._token_gone = handler

    def submit(self, push: Push) -> None:
        """Queue a push (never blocks; coalesces with the one waiting in its slot)."""
        gateway = self._gateways.get(push.platform)
        if gateway is None:
            self.queue.stats["no-gateway"] += 1
            return
        self.queue.submit(push, (gateway.name, gateway.lane(push)), gateway.max_batch, trio.current_time())
        if not self._kicked:
            if self._nursery is None:
                self._wake.set()
            else:
                self._kicked = True
                self._nursery.start_soon(self._kick)

    def discard(self, sid: int) -> None:
        """Forget the pushes of a subscription that ended."""
        self.queue.discard(sid)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send until cancelled; then close the gateways' kept connections (those with a ``close()``).

        Workers (at most ``workers``) send batches one after another while some are ready. What
        :meth:`submit` makes ready is taken by a worker the scheduling step after it, not two steps (this
        loop, then a worker) later; this loop starts workers for the rest (other lanes, retries, windows).
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    now = trio.current_time()
                    while (batch := self._take(now)) is not None:
                        nursery.start_soon(self._work, batch)
                    self._wake = trio.Event()
                    due = self.queue.next_due() if self._in_flight < self._workers else math.inf
                    with trio.move_on_at(due):
                        await self._wake.wait()
        finally:
            self._nursery = None
            for gateway in self._by_name.values():
                close = getattr(gateway, "close", None)
                if close is not None:
                    close()

    def _take(self, now: float) -> Batch | None:
        """A batch to send now, counted in flight, if a worker is free and one is ready."""
        if self._in_flight >= self._workers:
            return None
        batch = self.queue.next_batch(now)
        if batch is not None:
            self._in_flight += 1
        return batch

    async def _kick(self) -> None:
        """Started by :meth:`submit`: sends what the submits of this scheduling step made ready."""
        self._kicked = False
        self._wake.set()  # the run loop recomputes its deadline (a batch window may have opened)
        batch = self._take(trio.current_time())
        if batch is not None:
            await self._work(batch)

    async def _work(self, batch: Batch) -> None:
        """Send ``batch``, then whatever is ready by then, until nothing is (one worker)."""
        try:
            while True:
                await self._send(batch)
                ready = self.queue.next_batch(trio.current_time())
                if ready is None:
                    return
                batch = ready
        finally:
            self._in_flight -= 1
            self._wake.set()

    async def _send(self, batch: Batch) -> None:
        gateway = self._by_name[batch.lane[0]]
        try:
            outcomes = await gateway.send(batch.pushes)
        except TemporaryGatewayError as exc:
            log.info("push gateway %s: %s; retrying later", gateway.name, exc)
            self.queue.batch_failed(batch, trio.current_time(), exc.retry_after)
        except PermanentGatewayError as exc:
            log.warning("push gateway %s refused %d pushes: %s", gateway.name, len(batch.pushes), exc)
            self.queue.batch_dropped(batch)
        except Exception:
            log.exception("push gateway %s failed; dropping %d pushes", gateway.name, len(batch.pushes))
            self.queue.batch_dropped(batch)
        else:
            if len(outcomes) != len(batch.pushes):
                log.error("push gateway %s returned %d outcomes for %d pushes", gateway.name, len(outcomes),
                          len(batch.pushes))  # fmt: skip
                self.queue.batch_dropped(batch)
            else:
                for token in self.queue.batch_done(batch, outcomes, trio.current_time()):
                    self._token_gone(token)
