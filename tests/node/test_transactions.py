"""The retransmission schedule of our requests (trio_dht.node.transactions), without sockets or clock."""

from __future__ import annotations

import itertools
import math
import os
import struct

from trio_dht.node.transactions import TICK, Action, PendingRequest, RequestTracker


def request(tid: int, *, slow: bool = False, start: float = 100.0) -> PendingRequest:
    return PendingRequest(
        tid,
        ("127.0.0.1", 4222),
        None,
        "get",
        [b"d"],
        lambda reply: None,
        (lambda: None) if slow else None,
        start,
    )


def steps(tracker: RequestTracker, until: float) -> list[tuple[float, int, Action]]:
    """Every step by ``until``, with the time it was due at (walking the tracker's own wake-ups)."""
    out = []
    while (at := tracker.next_due()) <= until:
        out += [(round(at, 2), r.tid, action) for r, action in tracker.due(at)]
    return out


def test_schedule_without_jitter():
    tracker = RequestTracker(jitter=lambda lo, hi: hi)
    assert tracker.next_due() == math.inf
    tracker.add(request(1))
    tracker.add(request(2, slow=True))
    assert steps(tracker, 200.0) == [
        (101.05, 2, Action.SLOW),
        (101.3, 1, Action.RESEND),
        (101.3, 2, Action.RESEND),
        (103.3, 1, Action.RESEND),
        (103.3, 2, Action.RESEND),
        (108.05, 1, Action.FAIL),
        (108.05, 2, Action.FAIL),
    ]
    assert len(tracker) == 0 and tracker.next_due() == math.inf


def test_steps_are_never_early_and_at_most_one_tick_late():
    tracker = RequestTracker(jitter=lambda lo, hi: 0.0)
    tracker.add(request(1, start=7.0123))
    [(at, _, action)] = steps(tracker, 8.5)[:1]
    assert action is Action.RESEND and 8.0123 <= at < 8.0123 + TICK + 1e-9


def test_answered_or_abandoned_requests_take_no_more_steps():
    tracker = RequestTracker()
    tracker.add(request(1))
    tracker.add(request(2))
    tracker.add(request(3))
    assert tracker.pop(1) is not None
    assert tracker.pop(1) is None
    tracker.pop(3)
    assert [tid for _, tid, _ in steps(tracker, 200.0)] == [2, 2, 2]


def test_a_reused_transaction_id_does_not_inherit_old_steps():
    tracker = RequestTracker(jitter=lambda lo, hi: 0.0)
    old = request(5, start=0.0)
    tracker.add(old)
    tracker.pop(5)
    tracker.add(request(5, start=0.5))
    assert [at for at, _, _ in steps(tracker, 2.0)] == [1.55]


def test_transaction_ids_are_random_never_zero_nor_pending():
    draws = [struct.pack("<1024I", *([5] * 1020 + [9, 0, 7, 7]))]
    tracker = RequestTracker(random_bytes=lambda n: draws.pop(0) if draws else os.urandom(n))
    assert tracker.new_tid() == 7  # drawn from the end of each batch
    tracker.add(request(7))
    assert tracker.new_tid() == 9  # 7 again (pending) and 0 are skipped


def test_transaction_ids_do_not_follow_each_other():
    tracker = RequestTracker()
    tids = [tracker.new_tid() for _ in range(2000)]
    assert 0 not in tids and len(set(tids)) > 1990
    assert sum(1 for a, b in itertools.pairwise(tids) if (b - a) % (1 << 32) < 1000) < 5
