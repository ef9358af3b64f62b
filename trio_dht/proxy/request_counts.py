"""Counts the proxy keeps for ``GET /metrics`` that nothing else keeps: HTTP requests by route and status
with their latency, and how long a put took to become a push. Plain ints, one dictionary lookup and one list
index per observation; :mod:`~trio_dht.proxy.metrics` turns them into Prometheus families at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left

from trio_dht.rest.paths import Route

HTTP_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Upper bounds, in seconds, of the HTTP latency histogram's buckets (a last one holds the rest)."""
PUSH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""Upper bounds, in seconds, of the put-to-push latency histogram's buckets."""


class Histogram:
    """Observations counted per bucket (``counts[i]``: at most ``bounds[i]``, the last one above them all),
    and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs as Prometheus writes a histogram's buckets (``+Inf`` last)."""
        out, total = [], 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out


class RouteCounts:
    """One route's requests: count by status, and the latency histogram."""

    __slots__ = ("latency", "statuses")

    def __init__(self) -> None:
        self.statuses: dict[int, int] = {}
        self.latency = Histogram(HTTP_BUCKETS)


class RequestCounts:
    """Requests answered, by route (None: no route of the table) and status, with their latency: from the
    request's head read to its response handed to the socket (a GET's last value; a listen stream's head);
    a request answered at once is in the first bucket, untimed (:meth:`answered_at_once`)."""

    def __init__(self) -> None:
        self.routes: dict[Route | None, RouteCounts] = {route: RouteCounts() for route in Route}
        self.routes[None] = RouteCounts()

    def answered_at_once(self, route: Route | None, status: int) -> None:
        """A request answered from the bytes already read, its handler replying without waiting: counted in
        the first latency bucket, with nothing added to the sum (its handler's own microseconds are not
        timed: two clock reads would cost more than the count, on the proxy's fastest path)."""
        counts = self.routes[route]
        statuses = counts.statuses
        statuses[status] = statuses.get(status, 0) + 1
        counts.latency.counts[0] += 1

    def observe(self, route: Route | None, status: int, seconds: float) -> None:
        counts = self.routes[route]
        statuses = counts.statuses
        statuses[status] = statuses.get(status, 0) + 1
        latency = counts.latency
        latency.counts[bisect_left(HTTP_BUCKETS, seconds)] += 1
        latency.sum += seconds
