"""``GET /metrics``: the proxy's counters in the Prometheus text format, read when scraped.

Nothing here runs on a hot path. The node, the proxy and the push side already count what they do (what
``/node/stats`` shows); :class:`ProxyCollector` is the one place that maps those counters to metric families,
read at scrape time. What nothing else counted is kept as plain ints by
:mod:`~trio_dht.proxy.request_counts` (HTTP requests, put-to-push latency). The families (all prefixed
``trio_dht_``, in base units, labels with bounded values only):

* UDP: datagrams received and sent, requests received and sent by method, drops by reason; nodes per
  family and state; stored values and bytes; searches and listens;
* HTTP: requests by route (the route table's names, ``other`` for none) and status, a latency histogram
  per route; requests answered by the front end for an HTTP worker (SUBSCRIBE, UNSUBSCRIBE) and for the
  connections workers hand over are counted there, so the numbers are whole;
* push: subscriptions by platform and dialect, pushes by gateway (an app's id) and outcome (sent, retried,
  pruned, gave_up), pushes dropped by reason, the put-to-push latency histogram;
* queue depths, limits hit (by limit), HTTP workers serving and their restarts;
* the process's own figures (prometheus_client's process, platform and garbage-collector collectors).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from trio_dht.limits_hit import LIMIT_COUNTERS, read_counters
from trio_dht.proxy.request_counts import Histogram

if TYPE_CHECKING:
    from trio_dht.proxy.state import ProxyState

__all__ = ["CONTENT_TYPE", "ProxyCollector", "exposition"]

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""``text/plain; version=0.0.4; charset=utf-8``: the text format :func:`generate_latest` writes (what
prometheus_client's own server answers a scrape that asks for no other)."""

UDP_DROPS = {
    "malformed": "dropped_malformed",
    "network": "dropped_network",
    "rate": "dropped_rate",
    "unsolicited_fragment": "dropped_unsolicited_fragments",
    "reassembly_stale": "reassembly_dropped",
    "reassembly_budget": "reassembly_dropped_budget",
    "confirm_queue_full": "confirm_dropped_full",
    "confirm_stale": "confirm_dropped_stale",
    "send_queue_full": "send_queue_dropped",
}
"""``reason`` label -> the node's counter (``/node/stats`` ``nodeInfo``)."""
PUSH_OUTCOMES = {
    "delivered": "sent",
    "retry": "retried",
    "TemporaryGatewayError": "retried",
    "token-gone": "pruned",
}
"""A gateway's outcome (``/node/stats`` ``pushGateways``) -> the ``outcome`` label; any other (a push dropped,
a permanent or unexpected failure of its request) is ``gave_up``."""
PUSH_DROPS = {
    "expired": "expired",
    "gave_up": "gaveUp",
    "one_off_gave_up": "oneOffGaveUp",
    "queue_full": "queueFull",
    "lane_full": "laneFull",
    "no_gateway": "noGateway",
}
"""``reason`` label -> the ``/node/stats`` ``pushDelivery`` counter of pushes dropped."""


class ProxyCollector:
    """The proxy's metric families, read from its state when collected (see the module docstring)."""

    def __init__(self, state: ProxyState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state = self.state
        doc = state.stats(trio.current_time())
        info = doc.get("nodeInfo", {})
        yield from self._udp(info)
        yield from self._node(info)
        yield from self._http(doc)
        yield from self._push(doc)
        yield from self._limits(doc)

    def _udp(self, info: dict[str, Any]) -> Iterator[Metric]:
        yield _counter("udp_datagrams_received", "UDP datagrams received.", info.get("received", 0))
        yield _counter("udp_datagrams_sent", "UDP datagrams sent.", info.get("sent", 0))
        counters = getattr(getattr(self.state.dht, "protocol", None), "counters", None)
        requests = CounterMetricFamily(
            "trio_dht_udp_requests_received", "UDP requests received, by method.", labels=["method"]
        )
        for method, count in sorted(getattr(counters, "requests", {}).items()):
            requests.add_metric([method], count)
        yield requests
        sent = CounterMetricFamily(
            "trio_dht_udp_requests_sent",
            "UDP requests sent, by method (not their resends).",
            labels=["method"],
        )
        for method, count in sorted(getattr(counters, "requests_sent", {}).items()):
            sent.add_metric([method], count)
        yield sent
        drops = CounterMetricFamily(
            "trio_dht_udp_dropped", "UDP datagrams dropped, by reason.", labels=["reason"]
        )
        for reason, name in UDP_DROPS.items():
            drops.add_metric([reason], info.get(name, 0))
        for reason in ("self", "martian"):
            drops.add_metric([reason], getattr(counters, f"dropped_{reason}", 0))
        yield drops

    def _node(self, info: dict[str, Any]) -> Iterator[Metric]:
        dht = self.state.dht
        nodes = GaugeMetricFamily(
            "trio_dht_nodes",
            "Nodes in the routing tables, by address family and state.",
            labels=["family", "state"],
        )
        for family in ("ipv4", "ipv6"):
            figures = info.get(family, {})
            for node_state in ("good", "dubious"):
                nodes.add_metric([family, node_state], figures.get(node_state, 0))
        yield nodes
        yield _gauge("stored_values", "Values stored by the node.", info.get("storage_values", 0))
        yield _gauge("stored_bytes", "Bytes of the values stored by the node.", info.get("storage_size", 0))
        searches = getattr(getattr(dht, "searches", None), "rounds", None)
        yield _gauge("searches", "Get searches in progress.", len(searches) if searches is not None else 0)
        listens = GaugeMetricFamily(
            "trio_dht_listens",
            "Listens: remote nodes' here, this node's on others, the proxy's listen streams.",
            labels=["kind"],
        )
        local = getattr(getattr(dht, "protocol", None), "listens", None)
        listens.add_metric(["remote"], info.get("ops", 0))
        listens.add_metric(["local"], len(local) if local is not None else 0)
        listens.add_metric(["proxy_stream"], len(self.state.listens))
        yield listens

    def _http(self, doc: dict[str, Any]) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "trio_dht_http_requests",
            "HTTP requests answered, by route and status.",
            labels=["route", "status"],
        )
        latency = HistogramMetricFamily(
            "trio_dht_http_request_duration_seconds",
            "Time from a request's head to its response sent (a listen stream: its head), by route.",
            labels=["route"],
        )
        for route, counts in self.state.request_counts.routes.items():
            name = "other" if route is None else route.name.lower()
            if counts.statuses:
                for status, count in sorted(counts.statuses.items()):
                    requests.add_metric([name, str(status)], count)
                _add_histogram(latency, [name], counts.latency)
        yield requests
        yield latency
        workers = doc.get("httpWorkers")
        if workers is not None:
            yield _gauge("http_workers_serving", "HTTP worker processes serving.", workers["serving"])
            yield _counter("http_worker_restarts", "HTTP worker processes restarted.", workers["restarts"])

    def _push(self, doc: dict[str, Any]) -> Iterator[Metric]:
        push = self.state.push
        subscriptions = GaugeMetricFamily(
            "trio_dht_push_subscriptions",
            "Push subscriptions, by platform and dialect.",
            labels=["platform", "dialect"],
        )
        service = getattr(push, "service", None)
        if service is not None:
            kinds = sorted((p.value or "none", d.value, n) for (p, d), n in service.book.kinds.items())
            for platform, dialect, count in kinds:
                subscriptions.add_metric([platform, dialect], count)
        yield subscriptions
        pushes = CounterMetricFamily(
            "trio_dht_pushes",
            "Pushes handed to a gateway, by gateway and outcome.",
            labels=["gateway", "outcome"],
        )
        outcomes: Counter[tuple[str, str]] = Counter()
        for gateway, by_outcome in doc.get("pushGateways", {}).items():
            for outcome, count in by_outcome.items():
                outcomes[gateway, PUSH_OUTCOMES.get(outcome, "gave_up")] += count
        for (gateway, outcome), count in sorted(outcomes.items()):
            pushes.add_metric([gateway, outcome], count)
        yield pushes
        delivery = doc.get("pushDelivery", {})
        drops = CounterMetricFamily("trio_dht_push_dropped", "Pushes dropped, by reason.", labels=["reason"])
        for reason, name in PUSH_DROPS.items():
            drops.add_metric([reason], delivery.get(name, 0))
        yield drops
        latency = HistogramMetricFamily(
            "trio_dht_push_latency_seconds",
            "Time from a value reaching a subscribed key to its push accepted by the gateway.",
        )
        counts = getattr(push, "counts", None)
        histogram = getattr(counts, "latency", None)
        if histogram is not None:
            _add_histogram(latency, [], histogram)
        yield latency
        queues = GaugeMetricFamily(
            "trio_dht_queue_depth", "Items waiting in a queue, by queue.", labels=["queue"]
        )
        queues.add_metric(["push"], delivery.get("queued", 0))
        queues.add_metric(["push_in_flight"], delivery.get("inFlight", 0))
        info = doc.get("nodeInfo", {})
        queues.add_metric(["udp_confirm"], info.get("confirm_queued", 0))
        queues.add_metric(["udp_confirm_in_flight"], info.get("confirm_in_flight", 0))
        queues.add_metric(["udp_reassembly_bytes"], info.get("reassembly_bytes", 0))
        yield queues

    def _limits(self, doc: dict[str, Any]) -> Iterator[Metric]:
        hits = CounterMetricFamily(
            "trio_dht_limit_hits", "Times a limit was reached (a Limits name, or the rule).", labels=["limit"]
        )
        counters = read_counters(doc)
        for path, limit in LIMIT_COUNTERS.items():
            hits.add_metric([limit], counters.get(path, 0))
        yield hits


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"trio_dht_{name}", documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"trio_dht_{name}", documentation, value=value)


def _add_histogram(family: HistogramMetricFamily, labels: list[str], histogram: Histogram) -> None:
    family.add_metric(labels, histogram.cumulative(), histogram.sum)


def registry(state: ProxyState) -> CollectorRegistry:
    """The proxy's own registry (made on first use): its :class:`ProxyCollector` and the process's figures."""
    made = state.metrics_registry
    if made is None:
        made = state.metrics_registry = CollectorRegistry(auto_describe=False)
        made.register(ProxyCollector(state))
        ProcessCollector(registry=made)
        PlatformCollector(registry=made)
        GCCollector(registry=made)
    return made


def exposition(state: ProxyState) -> bytes:
    """The text of ``GET /metrics`` (its content type: :data:`CONTENT_TYPE`)."""
    return generate_latest(registry(state))
