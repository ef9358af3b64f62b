"""The push dispatcher (Trio shell): sends what :class:`~trio_dht.push.delivery.DeliveryQueue` hands out
through the gateways, and feeds their results back to it.

- **Requests in flight.** At most ``Limits.push_concurrency`` per gateway kind, so one slow kind cannot
  hold another's capacity, and one per lane (the queue's rule), so one slow host holds one request. Lanes
  whose last request failed (timed out, refused) hold at most half of their kind's requests, so hosts that
  keep failing cannot take the room of the hosts that answer.
- **Workers.** A worker sends batches of one kind one after another while some are ready; a push submitted to
  an idle lane is taken by a worker in the scheduling step after :meth:`Dispatcher.submit`. One loop starts
  workers for the rest (other lanes, retries, batch windows), sleeping until the queue's next due time.
- **Failures.** A gateway's :class:`~trio_dht.push.gateway.TemporaryGatewayError` requeues the batch (with its
  ``Retry-After``), a :class:`~trio_dht.push.gateway.PermanentGatewayError` or a bug drops it. A lane that
  starts failing (its request failed after one that went well: it backs off) and one that delivers again
  after failing are logged at INFO. Each kind of line is logged at most once per 10 s per gateway kind, with
  the count of those left out, since failing endpoints are chosen by strangers.

:class:`DeliveryQueue` and :class:`Batch` are importable from here too.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Protocol

import trio

from trio_dht.limits import DEFAULT as DEFAULT_LIMITS
from trio_dht.limits import Limits
from trio_dht.logs import LogLimit
from trio_dht.push.delivery import Batch, DeliveryQueue
from trio_dht.push.gateway import Gateway, PermanentGatewayError, TemporaryGatewayError
from trio_dht.push.payloads import Platform, Push

__all__ = ["Batch", "DeliveryQueue", "Dispatcher"]

log = logging.getLogger(__name__)


class GatewayRouter(Protocol):
    """Picks each push's gateway among ``gateways`` (see :class:`trio_dht.push.apps.AppGateways`)."""

    gateways: Sequence[Gateway]

    def select(self, push: Push) -> Gateway | None: ...


class Dispatcher:
    """Sends pushes through the gateway of their platform, up to ``Limits.push_concurrency`` requests at once
    per gateway kind (each gateway bounds its own requests by ``Limits.push_request_timeout``).

    ``gateways`` maps platforms to gateways, or is a :class:`GatewayRouter` (the configured apps: a push's
    platform and topic pick its gateway); a push that finds none is dropped and counted (as OpenDHT sends
    nothing when no push server is configured). Gateways are known by their ``name``, which must differ.
    Call :meth:`submit` from anywhere in the Trio run; :meth:`run` must be running for anything to be sent.
    """

    def __init__(
        self,
        gateways: Mapping[Platform, Gateway] | GatewayRouter,
        *,
        queue: DeliveryQueue | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        if isinstance(gateways, Mapping):
            by_platform = dict(gateways)
            self._select: Callable[[Push], Gateway | None] = lambda push: by_platform.get(push.platform)
            every = list(by_platform.values())
        else:
            self._select = gateways.select
            every = list(gateways.gateways)
        self._by_name = {g.name: g for g in every}
        self.queue = queue if queue is not None else DeliveryQueue(limits=limits)
        self._concurrency = limits.push_concurrency
        self._failing_cap = max(1, limits.push_concurrency // 2)
        self._in_flight = dict.fromkeys(self._by_name, 0)
        self._failing = dict.fromkeys(self._by_name, 0)
        """Requests in flight per kind to lanes whose last request failed (at most half the kind's room)."""
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._kicked = False
        self._token_gone: Callable[[str], None] = lambda token: None
        self._logs: dict[tuple[int | str, str], LogLimit] = {}

    @property
    def stats(self) -> Counter[str]:
        return self.queue.stats

    @property
    def in_flight(self) -> int:
        """Gateway requests under way."""
        return sum(self._in_flight.values())

    def on_token_gone(self, handler: Callable[[str], None]) -> None:
        """Call ``handler(token)`` for every token a gateway reports gone (the service prunes it)."""
        self._token_gone = handler

    def submit(self, push: Push, *, one_off: bool = False) -> None:
        """Queue a push (never blocks; coalesces with the one waiting in its slot). ``one_off``: the push
        belongs to no subscription (its attempts are limited, and so is the number queued)."""
        gateway = self._select(push)
        if gateway is None:
            self.queue.stats["no-gateway"] += 1
            return
        lane = (gateway.name, gateway.lane(push))
        self.queue.submit(push, lane, gateway.max_batch, trio.current_time(), one_off=one_off)
        if not self._kicked:
            if self._nursery is None:
                self._wake.set()
            else:
                self._kicked = True
                # submit is synchronous (called from DHT callbacks): the dispatcher's nursery owns the kick.
                self._nursery.start_soon(self._kick)

    def discard(self, sid: int) -> None:
        """Forget the pushes of a subscription that ended."""
        self.queue.discard(sid)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send until cancelled; then close the gateways' kept connections (those with a ``close()``).

        Workers (at most ``Limits.push_concurrency`` per gateway kind) send batches of their kind one after
        another while some are ready. What :meth:`submit` makes ready is taken by a worker the scheduling step
        after it, not two steps (this loop, then a worker) later; this loop starts workers for the rest (other
        lanes, retries, windows).
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    now = trio.current_time()
                    self.queue.advance(now)
                    for kind in self._by_name:
                        while (batch := self._take(kind, now)) is not None:
                            nursery.start_soon(self._work, batch)
                    self._wake = trio.Event()
                    room = {
                        kind: self._failing[kind] < self._failing_cap
                        for kind, n in self._in_flight.items()
                        if n < self._concurrency
                    }
                    due = self.queue.next_due(room) if room else math.inf
                    with trio.move_on_at(due):
                        await self._wake.wait()
        finally:
            self._nursery = None
            for gateway in self._by_name.values():
                close = getattr(gateway, "close", None)
                if close is not None:
                    close()

    def _take(self, kind: str, now: float) -> Batch | None:
        """A batch of ``kind`` to send now, counted in flight, if that kind has room and one is ready."""
        if self._in_flight[kind] >= self._concurrency:
            return None
        batch = self._next(kind, now)
        if batch is not None:
            self._in_flight[kind] += 1
        return batch

    def _next(self, kind: str, now: float) -> Batch | None:
        """The next batch of ``kind``; one of a failing lane only while those have room (counted)."""
        batch = self.queue.next_batch(now, kind, failing=self._failing[kind] < self._failing_cap)
        if batch is not None and batch.failing:
            self._failing[kind] += 1
        return batch

    async def _kick(self) -> None:
        """Started by :meth:`submit`: sends what the submits of this scheduling step made ready."""
        self._kicked = False
        self._wake.set()  # the run loop recomputes its deadline (a batch window may have opened)
        now = trio.current_time()
        for kind in self._by_name:
            batch = self._take(kind, now)
            if batch is not None:
                await self._work(batch)
                return

    async def _work(self, batch: Batch) -> None:
        """Send ``batch``, then whatever of its kind is ready by then, until nothing is (one worker)."""
        kind = batch.kind
        try:
            while True:
                try:
                    await self._send(batch)
                finally:
                    if batch.failing:
                        self._failing[kind] -= 1
                ready = self._next(kind, trio.current_time())
                if ready is None:
                    return
                batch = ready
        finally:
            self._in_flight[kind] -= 1
            self._wake.set()

    def _log(
        self, level: int, kind: str, text: str, *, exc_info: bool = False, event: str | None = None
    ) -> None:
        """Log ``text`` about gateway ``kind`` at most once per 10 s per (``event`` or level, kind): failing
        endpoints are chosen by strangers, one failed request per push."""
        key = (event or level, kind)
        limit = self._logs.get(key)
        if limit is None:
            limit = self._logs[key] = LogLimit()
        if (line := limit.line(text, trio.current_time())) is not None:
            log.log(level, "%s", line, exc_info=exc_info)

    async def _send(self, batch: Batch) -> None:
        gateway = self._by_name[batch.kind]
        stats = self.queue.stats
        try:
            outcomes = await gateway.send(batch.pushes)
        except TemporaryGatewayError as exc:
            state = "still failing" if batch.failing else "failing: backing off"
            text = (
                f"push gateway {gateway.name} ({_lane_name(batch.lane[1])}): {exc}; {state}, retrying later"
            )
            self._log(logging.INFO, gateway.name, text)
            if exc.reason:
                stats[exc.reason] += 1
            self.queue.batch_failed(batch, trio.current_time(), exc.retry_after)
        except PermanentGatewayError as exc:
            n = len(batch.pushes)
            self._log(logging.WARNING, gateway.name, f"push gateway {gateway.name} refused {n} pushes: {exc}")
            if exc.reason:
                stats[exc.reason] += 1
            self.queue.batch_dropped(batch, trio.current_time())
        except Exception:
            n = len(batch.pushes)
            self._log(logging.ERROR, gateway.name, f"push gateway {gateway.name} failed; dropping {n} pushes",
                      exc_info=True)  # fmt: skip
            self.queue.batch_dropped(batch, trio.current_time())
        else:
            if len(outcomes) != len(batch.pushes):
                got, sent = len(outcomes), len(batch.pushes)
                text = f"push gateway {gateway.name}: {got} outcomes for {sent} pushes"
                self._log(logging.ERROR, gateway.name, text)
                self.queue.batch_dropped(batch, trio.current_time())
            else:
                if batch.failing:
                    text = f"push gateway {gateway.name} ({_lane_name(batch.lane[1])}): delivers again"
                    self._log(logging.INFO, gateway.name, text, event="recovered")
                for token in self.queue.batch_done(batch, outcomes, trio.current_time()):
                    self._token_gone(token)


def _lane_name(lane: Hashable) -> str:
    """A lane for the log: an endpoint's ``host:port``, or a gateway connection's number."""
    if isinstance(lane, tuple) and len(lane) == 2:
        host, port = lane
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return f"lane {lane}"
