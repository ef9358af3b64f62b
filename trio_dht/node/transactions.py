"""The node's transactions: the requests it sent and awaits a reply to, on OpenDHT's retransmission
schedule, sans-IO.

A request is sent at once, again about 1 s and 3 s later (each with up to 0.25 s of jitter), and fails 8 s
after the first send. A request with an ``on_slow`` callback is told at 1 s that it is slow (a search then
stops counting it in flight). The node's protocol (``node.protocol``) sends the datagrams, does what
:meth:`RequestTracker.due` says when :meth:`RequestTracker.next_due` comes (its shell's one timer task asks it
to), and calls the callbacks: no task and no cancel scope per request. Deadlines are kept in 50 ms
buckets, so that the timer wakes at most 20 times a second however many requests are out (the many that are
answered in time are dropped with their bucket). A bucket holds only numbers, so an answered request is
freed at once, not when its bucket comes.

Transaction ids are random 32-bit numbers (never 0, never one pending), drawn from the operating system's
generator: a peer that sees the ids of our requests to it cannot guess those of our requests to others, so
it can neither forge their replies (a reply validates its address for sending) nor start a reassembly
under them.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
import os
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass

from trio_dht.infohash import InfoHash
from trio_dht.wire.compact import Address
from trio_dht.wire.message import Message

SLOW_AFTER = 1.0
RESEND_AT = (1.0, 3.0)
RESEND_JITTER = 0.25
FAIL_AFTER = 8.0
TICK = 0.05
_TIDS_PER_DRAW = 1024


class Action(enum.Enum):
    SLOW = "slow"
    RESEND = "resend"
    FAIL = "fail"


#: The steps of a request after its first send: (what, seconds after the send, jitter).
STEPS = (
    (Action.SLOW, SLOW_AFTER, 0.0),
    (Action.RESEND, RESEND_AT[0], RESEND_JITTER),
    (Action.RESEND, RESEND_AT[1], RESEND_JITTER),
    (Action.FAIL, FAIL_AFTER, 0.0),
)


@dataclass(slots=True, eq=False)
class PendingRequest:
    """A request sent and not yet answered."""

    tid: int
    addr: Address
    node_id: InfoHash | None
    method: str
    datagrams: list[bytes]
    on_done: Callable[[Message | None], None]
    """Called once: with the reply (or error reply), or with None when the request failed."""
    on_slow: Callable[[], None] | None
    start: float
    step: int = 0
    serial: int = 0
    """Unique per request (transaction ids may come round again)."""


class RequestTracker:
    """Pending requests by transaction id, and when each one's next step is due."""

    def __init__(
        self,
        jitter: Callable[[float, float], float] = random.uniform,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.pending: dict[int, PendingRequest] = {}
        self._jitter = jitter
        self._random_bytes = random_bytes
        self._tids: list[int] = []
        self._buckets: dict[int, list[tuple[int, int, int]]] = {}  # bucket -> [(tid, serial, step)]
        self._bucket_heap: list[int] = []
        self._serials = itertools.count(1)

    def __len__(self) -> int:
        return len(self.pending)

    def new_tid(self) -> int:
        """A random transaction id, not 0 and not the id of a pending request."""
        pending, tids = self.pending, self._tids
        while True:
            if not tids:
                tids.extend(struct.unpack(f"<{_TIDS_PER_DRAW}I", self._random_bytes(4 * _TIDS_PER_DRAW)))
            tid = tids.pop()
            if tid and tid not in pending:
                return tid

    def add(self, request: PendingRequest) -> float:
        """Track ``request`` (just sent); returns when its first step is due."""
        self.pending[request.tid] = request
        request.serial = next(self._serials)
        if request.on_slow is None:
            request.step = 1
        return self._schedule(request)

    def pop(self, tid: int) -> PendingRequest | None:
        """Stop tracking ``tid`` (answered, or abandoned by its caller)."""
        return self.pending.pop(tid, None)

    def next_due(self) -> float:
        """When :meth:`due` has something to do (``inf`` if nothing is pending)."""
        return (self._bucket_heap[0] + 1) * TICK if self._bucket_heap else math.inf

    def due(self, now: float) -> list[tuple[PendingRequest, Action]]:
        """The steps due by ``now``, in order; failed requests are no longer tracked."""
        out: list[tuple[PendingRequest, Action]] = []
        while self._bucket_heap and (self._bucket_heap[0] + 1) * TICK <= now:
            for tid, serial, step in self._buckets.pop(heapq.heappop(self._bucket_heap)):
                request = self.pending.get(tid)
                if request is None or request.serial != serial or request.step != step:
                    continue  # answered, abandoned, or already moved on
                action = STEPS[step][0]
                out.append((request, action))
                if action is Action.FAIL:
                    del self.pending[request.tid]
                else:
                    request.step = step + 1
                    self._schedule(request)
        return out

    def _schedule(self, request: PendingRequest) -> float:
        _, after, jitter = STEPS[request.step]
        at = request.start + after + (self._jitter(0.0, jitter) if jitter else 0.0)
        bucket = math.floor(at / TICK)
        entries = self._buckets.get(bucket)
        if entries is None:
            entries = self._buckets[bucket] = []
            heapq.heappush(self._bucket_heap, bucket)
        entries.append((request.tid, request.serial, request.step))
        return (bucket + 1) * TICK
