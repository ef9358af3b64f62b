"""What to send to the push gateways and when (sans-IO): batching, coalescing, retries with backoff,
``Retry-After``, token pruning, and a bounded cost for every push.

:class:`DeliveryQueue` takes pushes in and hands out :class:`Batch` objects to send, each method given the
time ``now``; :class:`~trio_dht.push.dispatcher.Dispatcher` is its Trio shell, which owns the gateways, the
clock and the requests in flight. Neither knows any provider's JSON: a gateway renders, the queue decides
when.

- **Coalescing.** At most one push per slot (subscription, kind) waits in the queue: a newer one is merged
  into it (:meth:`~trio_dht.push.payloads.Push.merged_with`), so a gateway outage costs one entry per
  subscription, never a backlog, and after recovery each subscription gets exactly one wake-up.
- **Batching.** Pushes wait in a lane (``(gateway, gateway.lane(push))``) for at most ``batch_window``
  seconds, or until a full batch of ``gateway.max_batch`` is ready. One batch per lane is in flight at a time.
- **Retries.** A failed request (:class:`~trio_dht.push.gateway.TemporaryGatewayError`, e.g. no whole reply
  within ``Limits.push_request_timeout``) puts its pushes back (merged with anything newer) and backs the lane
  off (:class:`~trio_dht.backoff.Backoff` from ``backoff_base`` to ``backoff_cap``, less up to half of it at
  random), or for the gateway's ``Retry-After``. A push that fails alone (``Outcome.RETRY``) is retried after
  its own backoff, at most ``max_attempts`` times.
- **Bounds.** A push still queued ``Limits.push_max_age`` after its newest news is dropped (``expired``) when
  its turn comes, or at once if it cannot be tried before: its lane backs off (or is backed off) past it, or
  its retry is parked past it. A lane backed off with nothing to send is kept empty until its backoff ends. A
  one-off push (no subscription: pingPush, a permanent put's warning) is dropped after
  ``Limits.push_one_off_attempts`` failed attempts (``one-off-gave-up``). A new push is dropped past
  ``Limits.push_queue`` queued pushes, ``Limits.push_one_off_queue`` one-offs (``queue-full``) or
  ``Limits.push_lane_queue`` in its lane (``lane-full``: one host cannot take the whole queue); a push merged
  into a queued one costs nothing.
- **Failing lanes.** Lanes whose last request failed (timed out, refused) wait in a ready deque of their own,
  behind the others; the shell takes from it only while failing lanes hold under half of a kind's requests.
- **Pruning.** ``Outcome.TOKEN_GONE`` reports the token to the caller of :meth:`DeliveryQueue.batch_done`
  (the service drops its subscriptions).

Lanes may be many (one per Web Push host). A lane with work is in exactly one place: in flight, in its kind's
ready deque (may send now), or in one heap of timers (batch window, backoff, a parked retry). Taking a batch
pops a ready lane and expired timers, so each step costs O(log lanes) at most, never a scan of the lanes;
the pending pushes of a lane are an insertion-ordered dict.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field

from trio_dht.backoff import Backoff
from trio_dht.limits import DEFAULT as DEFAULT_LIMITS
from trio_dht.limits import Limits
from trio_dht.push.gateway import Outcome
from trio_dht.push.payloads import Push, PushKind

Slot = tuple[int, PushKind]
LaneKey = tuple[str, Hashable]


@dataclass(slots=True)
class _Entry:
    push: Push
    born: float
    """When the newest news it carries was submitted (its age counts from there)."""
    attempts: int = 0
    one_off: bool = False


@dataclass(slots=True, eq=False)
class _Lane:
    key: LaneKey
    max_batch: int
    pending: dict[Slot, _Entry] = field(default_factory=dict)
    delayed: list[tuple[float, int, Slot]] = field(default_factory=list)
    """Pushes retried alone, parked until their time: ``(when, seq, slot)`` (entry stays in ``parked``)."""
    parked: dict[Slot, _Entry] = field(default_factory=dict)
    first_pending_at: float = math.inf
    not_before: float = -math.inf
    failures: int = 0
    busy: bool = False
    ready: bool = False
    """In its kind's ready deque."""
    timer_at: float = math.inf
    """The time of its valid entry in the timer heap."""
    timer_seq: int = 0
    """The sequence number of that entry (others are stale)."""
    dead: bool = False
    """Removed from the queue (stale in the deque and the heap)."""

    def empty(self) -> bool:
        return not self.pending and not self.parked and not self.busy


@dataclass(frozen=True, slots=True)
class Batch:
    """Pushes of one lane handed to one gateway request."""

    lane: LaneKey
    pushes: list[Push]
    entries: list[_Entry]
    failing: bool
    """Its lane's last request failed."""

    @property
    def kind(self) -> str:
        """The gateway's name."""
        return self.lane[0]


class DeliveryQueue:
    """What to send, when, and what to do with the result (sans-IO: every method takes ``now``)."""

    def __init__(
        self,
        *,
        batch_window: float = 0.05,
        backoff_base: float = 1.0,
        backoff_cap: float = 300.0,
        max_attempts: int = 5,
        limits: Limits = DEFAULT_LIMITS,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.batch_window = batch_window
        self._backoff = Backoff(backoff_base, backoff_cap, jitter=0.5, rng=rng)
        self.max_attempts = max_attempts
        self.max_age = limits.push_max_age
        self.one_off_attempts = limits.push_one_off_attempts
        self.max_queued = limits.push_queue
        self.max_one_offs = limits.push_one_off_queue
        self.max_per_lane = limits.push_lane_queue
        self._lanes: dict[LaneKey, _Lane] = {}
        self._where: dict[Slot, _Lane] = {}
        """The lane of every queued (pending or parked) slot."""
        self._one_offs = 0
        """Queued one-off pushes."""
        self._in_flight: dict[Slot, LaneKey] = {}
        self._ready: dict[str, tuple[deque[_Lane], deque[_Lane]]] = {}
        """Per gateway kind: the ready lanes that are well, and those whose last request failed."""
        self._timers: list[tuple[float, int, _Lane]] = []
        self._seq = 0
        self.stats: Counter[str] = Counter()

    def __len__(self) -> int:
        """Queued pushes (not counting those in flight)."""
        return len(self._where)

    # -- input -----------------------------------------------------------------------------------------------

    def submit(self, push: Push, lane: LaneKey, max_batch: int, now: float, *, one_off: bool = False) -> None:
        """Queue ``push``, merging it into the push already waiting in its slot, if any; a new one past the
        queue's bounds is dropped (counted)."""
        where = self._where
        known = self._lanes.get(lane)
        if known is not None and known.not_before > now + self.max_age:  # backed off past its age limit
            self.stats["expired"] += 1
            return
        if push.slot not in where:
            if len(where) >= self.max_queued or (one_off and self._one_offs >= self.max_one_offs):
                self.stats["queue-full"] += 1
                return
            if known is not None and len(known.pending) + len(known.parked) >= self.max_per_lane:
                self.stats["lane-full"] += 1
                return
        self._enqueue(_Entry(push, now, 0, one_off), lane, max_batch, now)

    def discard(self, sid: int) -> None:
        """Forget every push of a subscription that ended (queued ones now, in-flight ones when they
        return)."""
        for kind in PushKind:
            slot = (sid, kind)
            self._in_flight.pop(slot, None)
            lane = self._where.get(slot)
            if lane is None:
                continue
            entry = lane.pending.pop(slot, None) or lane.parked.pop(slot)
            self._unqueue(slot, entry)
            self._drop_if_empty(lane)

    # -- scheduling ------------------------------------------------------------------------------------------

    def advance(self, now: float) -> None:
        """Move the lanes whose timer is due to their ready deque."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, seq, lane = heapq.heappop(timers)
            if lane.timer_seq == seq:
                lane.timer_at, lane.timer_seq = math.inf, 0
                self._settle(lane, now)

    def next_batch(self, now: float, kind: str | None = None, *, failing: bool = True) -> Batch | None:
        """A batch that may be sent now (marking its lane busy), of gateway ``kind`` (None: any), or None.

        Lanes whose last request went well come first; those whose last request failed only if ``failing``.
        """
        self.advance(now)
        for name in self._ready if kind is None else (kind,):
            pair = self._ready.get(name, ())
            for ready in pair if failing else pair[:1]:
                while ready:
                    lane = ready.popleft()
                    lane.ready = False
                    batch = self._take(lane, now)
                    if batch is not None:
                        return batch
        return None

    def next_due(self, room: Mapping[str, bool] | None = None) -> float:
        """When :meth:`next_batch` may next return something (``inf``: only after new input or a result) for
        the kinds in ``room`` (None: any), failing lanes included where ``room[kind]``."""
        for name in self._ready if room is None else room:
            pair = self._ready.get(name, ())
            for ready in pair if room is None or room[name] else pair[:1]:
                while ready and ready[0].dead:
                    ready.popleft()
                if ready:
                    return -math.inf
        timers = self._timers
        while timers and timers[0][2].timer_seq != timers[0][1]:
            heapq.heappop(timers)
        return timers[0][0] if timers else math.inf

    # -- results ---------------------------------------------------------------------------------------------

    def batch_done(self, batch: Batch, outcomes: list[Outcome], now: float) -> list[str]:
        """Record a gateway's per-push outcomes; returns the tokens reported gone."""
        lane = self._lanes[batch.lane]
        lane.busy = False
        lane.failures = 0
        lane.not_before = -math.inf
        gone: list[str] = []
        for entry, outcome in zip(batch.entries, outcomes, strict=True):
            push = entry.push
            if self._in_flight.pop(push.slot, None) is None:  # discarded meanwhile
                continue
            self.stats[outcome.value] += 1
            if outcome is Outcome.TOKEN_GONE:
                gone.append(push.token)
            elif outcome is Outcome.RETRY:
                entry.attempts += 1
                if entry.attempts >= (self.one_off_attempts if entry.one_off else self.max_attempts):
                    self.stats["one-off-gave-up" if entry.one_off else "gave-up"] += 1
                else:
                    self._park(entry, lane, now + self._backoff.delay(entry.attempts))
        self._settle(lane, now)
        return gone

    def batch_failed(self, batch: Batch, now: float, retry_after: float | None = None) -> None:
        """A temporary failure of the whole request: requeue its pushes and back the lane off (a one-off push
        is dropped after its last attempt)."""
        lane = self._lanes[batch.lane]
        lane.busy = False
        lane.failures += 1
        delay = retry_after if retry_after is not None else self._backoff.delay(lane.failures)
        lane.not_before = now + delay
        oldest = lane.not_before - self.max_age
        self.stats["batch-failed"] += 1
        self._expire(lane, oldest)
        for entry in batch.entries:
            if self._in_flight.pop(entry.push.slot, None) is None:
                continue
            if entry.born < oldest:
                self.stats["expired"] += 1
                continue
            if entry.one_off:
                entry.attempts += 1
                if entry.attempts >= self.one_off_attempts:
                    self.stats["one-off-gave-up"] += 1
                    continue
            self._enqueue(entry, batch.lane, lane.max_batch, now, returning=True)
        self._settle(lane, now)

    def batch_dropped(self, batch: Batch, now: float) -> None:
        """A permanent failure of the whole request: its pushes are dropped (and counted)."""
        lane = self._lanes[batch.lane]
        lane.busy = False
        for push in batch.pushes:
            if self._in_flight.pop(push.slot, None) is not None:
                self.stats["dropped"] += 1
        self._settle(lane, now)

    # -- internals -------------------------------------------------------------------------------------------

    def _lane_due(self, lane: _Lane) -> float:
        """When ``lane`` may send next (``inf``: it has nothing to send), or, if it has nothing but is backing
        off, when it may be forgotten."""
        if not lane.pending and not lane.delayed:
            return math.inf if lane.busy else lane.not_before
        due = math.inf
        if lane.pending:
            full = len(lane.pending) >= lane.max_batch
            due = -math.inf if full else lane.first_pending_at + self.batch_window
        if lane.delayed:
            due = min(due, lane.delayed[0][0])
        return max(due, lane.not_before)

    def _schedule(self, lane: _Lane, now: float) -> None:
        """Put an idle lane with work in its kind's ready deque, or its due time in the timer heap."""
        if lane.busy or lane.ready or lane.dead:
            return
        due = self._lane_due(lane)
        if due <= now:
            lane.ready = True
            lane.timer_at, lane.timer_seq = math.inf, 0
            self._ready[lane.key[0]][lane.failures > 0].append(lane)
        elif due < lane.timer_at:
            self._seq += 1
            lane.timer_at, lane.timer_seq = due, self._seq
            heapq.heappush(self._timers, (due, self._seq, lane))
            if len(self._timers) > 2 * len(self._lanes) + 1024:  # stale entries (timers moved or dropped)
                self._timers = [t for t in self._timers if t[2].timer_seq == t[1]]
                heapq.heapify(self._timers)

    def _settle(self, lane: _Lane, now: float) -> None:
        """After a result or a timer: schedule the lane's remaining work (or the end of its backoff), or
        forget it."""
        if lane.empty() and lane.not_before <= now:
            self._drop_if_empty(lane)
        else:
            self._schedule(lane, now)

    def _take(self, lane: _Lane, now: float) -> Batch | None:
        """The lane's next batch if it may send now (expired pushes dropped on the way), else reschedule."""
        if lane.dead or lane.busy:
            return None
        self._unpark(lane, now)
        pending = lane.pending
        if (
            not pending
            or now < lane.not_before
            or (len(pending) < lane.max_batch and now < lane.first_pending_at + self.batch_window)
        ):
            self._settle(lane, now)
            return None
        oldest = now - self.max_age
        entries: list[_Entry] = []
        where, in_flight, key = self._where, self._in_flight, lane.key
        for slot in list(itertools.islice(pending, lane.max_batch)):  # one pass over the dict's head
            entry = pending.pop(slot)
            del where[slot]
            if entry.one_off:
                self._one_offs -= 1
            if entry.born <= oldest:
                self.stats["expired"] += 1
                continue
            in_flight[slot] = key
            entries.append(entry)
        if not entries:
            self._settle(lane, now)
            return None
        lane.busy = True
        lane.timer_at, lane.timer_seq = math.inf, 0
        lane.first_pending_at = now if pending else math.inf
        return Batch(lane.key, [e.push for e in entries], entries, lane.failures > 0)

    def _queue(self, slot: Slot, lane: _Lane, entry: _Entry) -> None:
        self._where[slot] = lane
        if entry.one_off:
            self._one_offs += 1

    def _unqueue(self, slot: Slot, entry: _Entry) -> None:
        del self._where[slot]
        if entry.one_off:
            self._one_offs -= 1

    def _enqueue(
        self, entry: _Entry, key: LaneKey, max_batch: int, now: float, *, returning: bool = False
    ) -> None:
        slot = entry.push.slot
        old_lane = self._where.get(slot)
        if old_lane is not None:
            old = old_lane.pending.get(slot) or old_lane.parked[slot]
            # ``returning``: ``entry`` came back from a failed request, so the queued one is the newer.
            merged = entry.push.merged_with(old.push) if returning else old.push.merged_with(entry.push)
            self.stats["coalesced"] += 1
            if old_lane.key == key and slot in old_lane.pending:
                old.push = merged  # keeps its place in the batch order and the lane's window
                old.born = max(old.born, entry.born)
                old.attempts = min(old.attempts, entry.attempts)
                self._schedule(old_lane, now)
                return
            entry = _Entry(merged, max(old.born, entry.born), min(entry.attempts, old.attempts), old.one_off)
            old_lane.pending.pop(slot, None)
            old_lane.parked.pop(slot, None)
            self._unqueue(slot, old)
            if old_lane.key != key:
                self._drop_if_empty(old_lane)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(key, max_batch)
            if key[0] not in self._ready:
                self._ready[key[0]] = (deque(), deque())
        if not lane.pending:
            lane.first_pending_at = now
        lane.pending[slot] = entry
        self._queue(slot, lane, entry)
        self._schedule(lane, now)

    def _park(self, entry: _Entry, lane: _Lane, when: float) -> None:
        slot = entry.push.slot
        if slot in self._where:  # a newer push is already queued: it carries this one's news
            self.stats["coalesced"] += 1
            return
        if entry.born + self.max_age < max(when, lane.not_before):  # too old by the time it may be retried
            self.stats["expired"] += 1
            return
        lane.parked[slot] = entry
        self._seq += 1
        heapq.heappush(lane.delayed, (when, self._seq, slot))
        self._queue(slot, lane, entry)

    def _expire(self, lane: _Lane, oldest: float) -> None:
        """Drop the lane's queued pushes whose newest news is older than ``oldest`` (counted)."""
        for entries in (lane.pending, lane.parked):
            doomed = [slot for slot, entry in entries.items() if entry.born < oldest]
            for slot in doomed:
                self._unqueue(slot, entries.pop(slot))
            self.stats["expired"] += len(doomed)

    def _unpark(self, lane: _Lane, now: float) -> None:
        while lane.delayed and lane.delayed[0][0] <= now:
            _, _, slot = heapq.heappop(lane.delayed)
            entry = lane.parked.pop(slot, None)
            if entry is not None:
                if not lane.pending:
                    lane.first_pending_at = now
                lane.pending[slot] = entry

    def _drop_if_empty(self, lane: _Lane) -> None:
        if lane.empty() and not lane.dead:
            lane.dead = True
            lane.ready = False
            lane.timer_at, lane.timer_seq = math.inf, 0
            del self._lanes[lane.key]
