"""Delivery: coalescing, batching, backoff, Retry-After, pruning; the sans-IO queue, then the Trio shell."""

import logging
import math

import trio

from trio_dht.limits import Limits
from trio_dht.push.dispatcher import DeliveryQueue, Dispatcher
from trio_dht.push.gateway import Outcome, PermanentGatewayError, TemporaryGatewayError
from trio_dht.push.payloads import Platform, Push, PushKind

LANE = ("gw", 0)


def vpush(sid, t=1, exp=None, high=True, token=None):
    data = {"key": "k", "t": t} | ({"exp": exp} if exp else {})
    return Push(sid, PushKind.VALUES, token or f"tok{sid}", Platform.ANDROID, "", data, high)


def test_coalescing_keeps_one_push_per_slot():
    q = DeliveryQueue(batch_window=0.05)
    q.submit(vpush(1, t=1, exp="5", high=False), LANE, 10, now=0)
    q.submit(vpush(1, t=2, exp="6", high=False), LANE, 10, now=0.01)
    q.submit(vpush(2, t=3), LANE, 10, now=0.02)
    assert len(q) == 2 and q.stats["coalesced"] == 1
    assert q.next_batch(0.04) is None  # the window is still open
    assert q.next_due() == 0.05
    batch = q.next_batch(0.05)
    assert [p.sid for p in batch.pushes] == [1, 2]
    assert batch.pushes[0].data == {"key": "k", "t": 2}  # two different expiries: a full GET instead


def test_full_batches_go_at_once_and_one_batch_per_lane_is_in_flight():
    q = DeliveryQueue(batch_window=10)
    for sid in range(5):
        q.submit(vpush(sid), LANE, 2, now=0)
    first = q.next_batch(0)
    assert len(first.pushes) == 2
    assert q.next_batch(0) is None and q.next_due() == math.inf  # lane busy
    q.batch_done(first, [Outcome.DELIVERED] * 2, now=0)
    assert len(q.next_batch(0).pushes) == 2


def test_outage_requeues_merges_and_backs_off_then_recovers_with_one_push_each():
    q = DeliveryQueue(batch_window=0, backoff_base=1, backoff_cap=60, rng=lambda: 1.0)
    q.submit(vpush(1, t=1), LANE, 10, 0)
    batch = q.next_batch(0)
    q.submit(vpush(1, t=2), LANE, 10, 0.5)  # arrives while the first is in flight
    q.batch_failed(batch, now=1)
    assert len(q) == 1 and q.next_due() == 2  # backoff 1 s
    assert q.next_batch(1.5) is None
    delays = []
    now = 2.0
    for _ in range(5):
        batch = q.next_batch(now)
        q.batch_failed(batch, now)
        delays.append(q.next_due() - now)
        now = q.next_due()
    assert delays == [2, 4, 8, 16, 32]
    batch = q.next_batch(now)
    assert len(batch.pushes) == 1 and batch.pushes[0].data["t"] == 2
    q.batch_done(batch, [Outcome.DELIVERED], now)
    assert len(q) == 0 and q.next_due() == math.inf


def test_retry_after_is_honoured():
    q = DeliveryQueue(batch_window=0, limits=Limits(push_max_age=600))  # the push outlives the wait
    q.submit(vpush(1), LANE, 10, 0)
    q.batch_failed(q.next_batch(0), now=0, retry_after=120)
    assert q.next_due() == 120 and q.next_batch(119) is None and q.next_batch(120) is not None


def test_single_push_retries_are_bounded_and_gone_tokens_reported():
    q = DeliveryQueue(batch_window=0, max_attempts=2, rng=lambda: 1.0)
    q.submit(vpush(1), LANE, 10, 0)
    q.submit(vpush(2), LANE, 10, 0)
    batch = q.next_batch(0)
    assert q.batch_done(batch, [Outcome.RETRY, Outcome.TOKEN_GONE], 0) == ["tok2"]
    assert q.next_due() == 1
    batch = q.next_batch(1)
    assert [p.sid for p in batch.pushes] == [1]
    q.batch_done(batch, [Outcome.RETRY], 1)
    assert q.stats["gave-up"] == 1 and len(q) == 0


def test_discard_forgets_queued_and_in_flight_pushes():
    q = DeliveryQueue(batch_window=0)
    q.submit(vpush(1), LANE, 10, 0)
    batch = q.next_batch(0)
    q.submit(vpush(2), LANE, 10, 0)
    q.discard(1)
    q.discard(2)
    q.batch_failed(batch, 0)
    assert len(q) == 0 and q.next_batch(q.next_due()) is None  # the lane is kept only until its backoff ends
    assert q.next_due() == math.inf and not q._lanes


class ScriptedGateway:
    """A gateway whose requests fail while ``down`` is set."""

    name = "fake"
    max_batch = 50

    def __init__(self):
        self.down = False
        self.delivered: list[Push] = []
        self.requests = 0

    def lane(self, push):
        return 0

    async def send(self, pushes):
        self.requests += 1
        await trio.sleep(0.01)
        if self.down:
            raise TemporaryGatewayError("down")
        if any(p.token == "poison" for p in pushes):
            raise PermanentGatewayError("bad request")
        self.delivered.extend(pushes)
        return [Outcome.TOKEN_GONE if p.token == "dead" else Outcome.DELIVERED for p in pushes]


async def test_failed_requests_log_one_line_per_ten_seconds(autojump_clock, caplog):
    """Endpoints that fail (chosen by strangers, one request per push) cost the log a line per 10 s."""

    class Failing(ScriptedGateway):
        def lane(self, push):
            return push.sid

        async def send(self, pushes):
            self.requests += 1
            await trio.sleep(0.01)
            raise (TemporaryGatewayError if pushes[0].sid % 2 else PermanentGatewayError)("no")

    caplog.set_level(logging.INFO, logger="trio_dht.push.dispatcher")
    gateway = Failing()
    dispatcher = Dispatcher({Platform.ANDROID: gateway}, queue=DeliveryQueue(batch_window=0))
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.run)
        for sid in range(200):
            dispatcher.submit(vpush(sid))
        await trio.sleep(5)
        assert gateway.requests >= 200 and len(caplog.records) == 2  # one per level (retried, refused)
        await trio.sleep(10)  # the odd ones keep being retried
        dispatcher.submit(vpush(1000))
        await trio.sleep(1)
        lines = [r.getMessage() for r in caplog.records]
        assert gateway.requests > 300 and len(lines) == 4
        assert "refused 1 pushes: no (100 such events since the last such line)" in lines[3]
        nursery.cancel_scope.cancel()


async def test_a_lane_failing_and_delivering_again_is_logged(autojump_clock, caplog):
    """What an operator needs: the lane that starts backing off, and when it delivers again."""
    caplog.set_level(logging.INFO, logger="trio_dht.push.dispatcher")
    gateway = ScriptedGateway()
    dispatcher = Dispatcher({Platform.ANDROID: gateway}, queue=DeliveryQueue(batch_window=0, backoff_cap=5))
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.run)
        dispatcher.submit(vpush(1))
        await trio.sleep(1)
        assert caplog.records == []  # delivering: nothing to say
        gateway.down = True
        dispatcher.submit(vpush(1, t=2))
        await trio.sleep(30)  # fails again and again: one line per 10 s
        gateway.down = False
        await trio.sleep(10)
        lines = [r.getMessage() for r in caplog.records]
        assert lines[0] == "push gateway fake (lane 0): down; failing: backing off, retrying later"
        assert all("still failing" in line for line in lines[1:-1]) and 1 <= len(lines[1:-1]) <= 3
        assert lines[-1] == "push gateway fake (lane 0): delivers again"
        assert {r.levelno for r in caplog.records} == {logging.INFO}
        nursery.cancel_scope.cancel()


def test_lane_names():
    from trio_dht.push.dispatcher import _lane_name

    assert _lane_name(("push.example.org", 443)) == "push.example.org:443"
    assert _lane_name(("2001:db8::1", 8443)) == "[2001:db8::1]:8443"
    assert _lane_name(3) == "lane 3"


async def test_dispatcher_gateway_down_then_back_delivers_each_subscription_once(autojump_clock):
    gateway = ScriptedGateway()
    gone = []
    dispatcher = Dispatcher({Platform.ANDROID: gateway}, queue=DeliveryQueue(backoff_cap=30))
    dispatcher.on_token_gone(gone.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.run)
        gateway.down = True
        for t in range(20):  # 20 events for each of 10 subscriptions during the outage
            for sid in range(10):
                dispatcher.submit(vpush(sid, t=t))
            await trio.sleep(30)
        assert gateway.requests > 5 and not gateway.delivered
        assert len(dispatcher.queue) == 10  # memory bounded: one per subscription
        gateway.down = False
        await trio.sleep(120)
        assert sorted(p.sid for p in gateway.delivered) == list(range(10))
        assert all(p.data["t"] == 19 for p in gateway.delivered)
        dispatcher.submit(vpush(99, token="dead"))
        await trio.sleep(1)
        dispatcher.submit(Push(98, PushKind.VALUES, "poison", Platform.ANDROID, "", {}, True))
        dispatcher.submit(Push(97, PushKind.VALUES, "x", Platform.UNIFIEDPUSH, "", {}, True))
        await trio.sleep(1)
        assert gone == ["dead"]
        assert dispatcher.stats["no-gateway"] == 1 and dispatcher.stats["dropped"] == 1
        nursery.cancel_scope.cancel()


async def test_dispatcher_without_window_batches_what_one_step_submits_and_what_queues_in_flight(
    autojump_clock,
):
    gateway = ScriptedGateway()
    closed = []
    gateway.close = lambda: closed.append(True)
    sizes = []
    send = gateway.send

    async def recording_send(pushes):
        sizes.append(len(pushes))
        return await send(pushes)

    gateway.send = recording_send
    dispatcher = Dispatcher({Platform.ANDROID: gateway}, queue=DeliveryQueue(batch_window=0))
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.run)
        for sid in range(5):  # one scheduling step: one request
            dispatcher.submit(vpush(sid))
        await trio.sleep(0.001)  # that request is in flight (10 ms): these wait for it, then go together
        for sid in range(5, 8):
            dispatcher.submit(vpush(sid))
        await trio.sleep(1)
        assert sizes == [5, 3] and len(gateway.delivered) == 8
        nursery.cancel_scope.cancel()
    assert closed == [True]  # the dispatcher closes its gateways as it ends


# -- bounds ------------------------------------------------------------------------------------------------


def test_a_push_too_old_is_dropped_when_its_turn_comes_and_news_makes_it_young_again():
    q = DeliveryQueue(batch_window=0, backoff_base=100, rng=lambda: 1.0, limits=Limits(push_max_age=60))
    q.submit(vpush(1, t=1), LANE, 10, 0)
    q.submit(vpush(2, t=1), LANE, 10, 0)
    q.batch_failed(q.next_batch(0), now=0)  # the lane waits 100 s: both would be 100 s old by then
    assert q.stats["expired"] == 2 and len(q) == 0
    q.submit(vpush(2, t=2), LANE, 10, 50)  # newer news for subscription 2: young enough to wait
    q.submit(vpush(3, t=2), LANE, 10, 50)
    q.batch_done(q.next_batch(100), [Outcome.DELIVERED] * 2, 100)
    q.submit(vpush(1, t=3), LANE, 10, 100)  # waits its batch window behind...
    q.submit(vpush(4, t=3), LANE, 10, 0)  # ...one submitted (by its clock) long ago
    batch = q.next_batch(110)
    assert [p.sid for p in batch.pushes] == [1] and batch.pushes[0].data["t"] == 3
    assert q.stats["expired"] == 3 and len(q) == 0


def test_one_off_pushes_give_up_after_their_attempts_subscription_pushes_do_not():
    limits = Limits(push_one_off_attempts=3, push_max_age=10_000)
    q = DeliveryQueue(batch_window=0, backoff_base=1, backoff_cap=1, rng=lambda: 1.0, limits=limits)
    q.submit(vpush(1), LANE, 10, 0, one_off=True)
    q.submit(vpush(2), LANE, 10, 0)
    now = 0.0
    for _ in range(10):
        if (batch := q.next_batch(now)) is not None:
            q.batch_failed(batch, now)
        now += 1
    assert q.stats["one-off-gave-up"] == 1 and q.stats["batch-failed"] == 10
    assert len(q) == 1  # the subscription's push waits on
    q.submit(vpush(3), LANE, 10, now, one_off=True)  # a one-off failing alone: the same limit
    for _ in range(5):
        if (batch := q.next_batch(now)) is not None:
            outcomes = [Outcome.RETRY if p.sid == 3 else Outcome.DELIVERED for p in batch.pushes]
            q.batch_done(batch, outcomes, now)
        now += 1
    assert q.stats["one-off-gave-up"] == 2 and len(q) == 0


def test_queue_bounds_drop_new_pushes_but_merging_costs_nothing():
    q = DeliveryQueue(batch_window=1, limits=Limits(push_queue=3, push_one_off_queue=1))
    q.submit(vpush(1), LANE, 10, 0, one_off=True)
    q.submit(vpush(2), LANE, 10, 0, one_off=True)  # a second one-off: over its bound
    q.submit(vpush(3), LANE, 10, 0)
    q.submit(vpush(4), LANE, 10, 0)
    q.submit(vpush(5), LANE, 10, 0)  # over the total bound
    q.submit(vpush(4, t=2), LANE, 10, 0)  # merged into the queued one
    assert len(q) == 3 and q.stats["queue-full"] == 2 and q.stats["coalesced"] == 1
    batch = q.next_batch(1)
    q.batch_done(batch, [Outcome.DELIVERED] * 3, 1)
    q.submit(vpush(6), LANE, 10, 1, one_off=True)  # room again
    assert len(q) == 1 and q.stats["queue-full"] == 2


def test_a_lane_backed_off_past_the_age_limit_holds_no_queue():
    """Hosts answering 503 with Retry-After: 3600 cannot keep pushes queued: what could not be tried before
    ``push_max_age`` is dropped at once (expired), so real pushes still find room."""
    q = DeliveryQueue(batch_window=0, rng=lambda: 1.0, limits=Limits(push_queue=100, push_max_age=120))
    bad = [("up", ("evil", i)) for i in range(4)]
    for i in range(100):
        q.submit(vpush(i), bad[i % 4], 10, 0)
    assert len(q) == 100
    q.submit(vpush(1000), ("up", "good"), 10, 0)
    assert q.stats["queue-full"] == 1
    for _ in range(4):
        q.batch_failed(q.next_batch(0, "up"), 0, retry_after=3600)
    assert len(q) == 0 and q.stats["expired"] == 100  # the batch and the rest of its lane, at once
    q.submit(vpush(1), bad[0], 10, 1)  # a new push to a host backed off for an hour: dropped at once
    assert len(q) == 0 and q.stats["expired"] == 101
    q.submit(vpush(1000), ("up", "good"), 10, 1)
    assert q.next_batch(1).pushes[0].sid == 1000
    assert q.next_due() == 3600  # the lanes are remembered (empty) until their backoff ends...
    q.advance(3600)
    assert set(q._lanes) == {("up", "good")}  # ...then forgotten
    # A short backoff keeps what is young enough to be tried after it.
    q.submit(vpush(2), bad[1], 10, 3600)
    q.batch_failed(q.next_batch(3600), 3600, retry_after=60)
    q.submit(vpush(3), bad[1], 10, 3630)
    assert len(q) == 2 and q.stats["expired"] == 101
    assert [p.sid for p in q.next_batch(3660).pushes] == [2, 3]


def test_a_retry_parked_past_the_age_limit_is_dropped_at_once():
    q = DeliveryQueue(batch_window=0, backoff_base=100, rng=lambda: 1.0, limits=Limits(push_max_age=120))
    q.submit(vpush(1), LANE, 10, 0)
    q.submit(vpush(2), LANE, 10, 0)
    q.batch_done(q.next_batch(0), [Outcome.RETRY, Outcome.DELIVERED], 0)
    assert len(q) == 1  # parked for 100 s: young enough
    q.batch_done(q.next_batch(100), [Outcome.RETRY], 100)  # the next wait (200 s) ends past its age
    assert len(q) == 0 and q.stats["expired"] == 1 and q.next_due() == math.inf


def test_one_lane_holds_at_most_push_lane_queue():
    q = DeliveryQueue(batch_window=1, limits=Limits(push_queue=10, push_lane_queue=3))
    for i in range(5):
        q.submit(vpush(i), ("up", "evil"), 10, 0)
    q.submit(vpush(1, t=2), ("up", "evil"), 10, 0)  # merged: costs nothing
    for i in range(5, 10):
        q.submit(vpush(i), ("up", "good"), 10, 0)
    assert q.stats["lane-full"] == 4 and q.stats["coalesced"] == 1 and len(q) == 6


def test_lanes_are_found_without_a_scan_and_per_kind():
    """Thousands of backed-off lanes cost nothing to a push on another lane; kinds are taken separately."""
    q = DeliveryQueue(batch_window=0, rng=lambda: 1.0, limits=Limits(push_max_age=1100))
    for i in range(5000):
        q.submit(vpush(i), ("slow", i), 1, 0)
    while (batch := q.next_batch(0, "slow")) is not None:
        q.batch_failed(batch, 0, retry_after=1000)
    assert q.next_due() == 1000 and not any(q._ready["slow"]) and len(q._timers) == 5000
    q.submit(vpush(10_000), ("fast", 0), 1, 1)
    q.submit(vpush(10_001), ("other", 0), 1, 1)
    assert q.next_due({"fast": True}) == -math.inf
    assert q.next_batch(1, "slow") is None
    assert q.next_batch(1, "fast").pushes[0].sid == 10_000
    assert q.next_batch(1, "fast") is None and q.next_batch(1).pushes[0].sid == 10_001
    # Their backoff is over, but they are older than push_max_age: each is dropped as its turn comes.
    assert q.next_batch(1200, "slow") is None
    assert q.stats["expired"] == 5000 and len(q) == 0 and len(q._lanes) == 2  # the two in flight


class KindGateway:
    """A gateway of one kind whose lane per token's host; a host named ``slow`` answers after 100 s."""

    def __init__(self, name, timeout=None):
        self.name = name
        self.max_batch = 1
        self.timeout = timeout
        self.delivered = []

    def lane(self, push):
        return push.token.split("/")[0]

    async def send(self, pushes):
        if pushes[0].token.startswith("slow"):
            await trio.sleep(100 if self.timeout is None else self.timeout)
            raise TemporaryGatewayError("timed out", reason="timeout")
        await trio.sleep(0.01)
        self.delivered.extend(p.token for p in pushes)
        return [Outcome.DELIVERED] * len(pushes)


async def test_a_slow_kind_or_host_does_not_starve_another(autojump_clock):
    up, gorush = KindGateway("unifiedpush", timeout=10), KindGateway("gorush")
    limits = Limits(push_concurrency=4, push_max_age=10_000)
    dispatcher = Dispatcher(
        {Platform.UNIFIEDPUSH: up, Platform.ANDROID: gorush},
        queue=DeliveryQueue(batch_window=0, backoff_base=0.5, backoff_cap=0.5, limits=limits),
        limits=limits,
    )

    def up_push(sid, token):
        return Push(sid, PushKind.VALUES, token, Platform.UNIFIEDPUSH, "", {}, True)

    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.run)
        for i in range(4):  # every UnifiedPush request slot taken by a slow host
            dispatcher.submit(up_push(i, f"slow{i}/ep"))
        await trio.sleep(1)
        assert dispatcher.in_flight == 4
        dispatcher.submit(vpush(100, token="gorush-device"))
        dispatcher.submit(up_push(101, "fine/ep"))
        await trio.sleep(0.1)
        assert gorush.delivered == ["gorush-device"]  # another kind: at once
        await trio.sleep(10)
        assert up.delivered == ["fine/ep"]  # another host: as soon as a slot is free
        assert dispatcher.stats["timeout"] == 4
        # The slow hosts retry (their backoff is over), but failing lanes hold at most half of the slots.
        assert dispatcher.in_flight == 2
        start = trio.current_time()
        for i in range(4):
            dispatcher.submit(up_push(200 + i, f"other{i}/ep"))
        while len(up.delivered) < 5:
            await trio.sleep(0.01)
        assert trio.current_time() - start < 0.1
        nursery.cancel_scope.cancel()


def test_the_timer_heap_stays_proportional_to_the_lanes():
    """A lane whose timer keeps moving earlier leaves stale heap entries; they are swept in bulk."""
    q = DeliveryQueue(batch_window=0, backoff_base=300, backoff_cap=300, rng=lambda: 1.0,
                      limits=Limits(push_max_age=10_000))  # fmt: skip
    now = 0.0
    for i in range(5000):
        q.submit(vpush(i), LANE, 10, now)
        batch = q.next_batch(now)
        q.batch_done(batch, [Outcome.RETRY] * len(batch.pushes), now)  # parked: a timer at now + 300
        q.submit(vpush(i, t=2), LANE, 10, now)  # newer news: ready at once, the timer is stale
        now += 0.01
    assert len(q._timers) <= 2 * len(q._lanes) + 1025
