"""/healthz's logic with a fake clock (HealthMonitor), the one "isolated" rule shared with the device client,
and the routes /metrics, /healthz and /status in the one route table."""

from __future__ import annotations

import json

import trio
from prometheus_client.parser import text_string_to_metric_families

from trio_dht.api import FamilyStats
from trio_dht.client.health import ProxyStatus as ClientStatus
from trio_dht.client.health import health_from_info
from trio_dht.infohash import InfoHash
from trio_dht.proxy.asgi import create_app
from trio_dht.proxy.health import HealthMonitor, gateway_totals
from trio_dht.proxy.http1 import read_head
from trio_dht.proxy.http_worker import relayed_request
from trio_dht.proxy.request_counts import RequestCounts
from trio_dht.proxy.routes import ROUTES, Request
from trio_dht.proxy.settings import ProxyConfig
from trio_dht.push.payloads import Dialect, Platform
from trio_dht.push.subscribe_bodies import parse_subscribe
from trio_dht.push.subscriptions import SubscriptionBook
from trio_dht.rest.health import ProxyStatus, peer_status
from trio_dht.rest.paths import Route, canonical_path, match
from trio_dht.testing import MemoryDht

GOOD = FamilyStats(good=3)
DUBIOUS = FamilyStats(dubious=2)
NONE = FamilyStats()


def test_peer_status_is_the_clients_rule() -> None:
    assert peer_status(GOOD, NONE)[0] is ProxyStatus.CONNECTED
    assert peer_status(NONE, GOOD)[0] is ProxyStatus.CONNECTED
    assert peer_status(DUBIOUS, NONE)[0] is ProxyStatus.CONNECTING
    assert peer_status(NONE, NONE)[0] is ProxyStatus.ISOLATED
    assert ClientStatus is ProxyStatus  # one enum, one rule
    doc = {"node_id": "ab" * 20, "ipv4": {"good": 0, "dubious": 0}, "ipv6": {}}
    health = health_from_info(doc)
    assert (health.status, health.error) == peer_status(NONE, NONE)


def _monitor(**kwargs: float) -> HealthMonitor:
    return HealthMonitor(
        isolated_after=kwargs.get("isolated_after", 10.0), gateway_after=kwargs.get("gw", 30.0)
    )


def test_isolated_past_the_threshold_then_back() -> None:
    m = _monitor()
    assert m.reasons(0.0) == ["the node's peers have not been observed"]
    m.observe_peers(*peer_status(GOOD, NONE), 0.0)
    assert m.reasons(5.0) == []
    m.observe_peers(*peer_status(NONE, NONE), 100.0)  # lost them at 100
    assert m.reasons(109.0) == []  # under the threshold
    m.observe_peers(*peer_status(NONE, NONE), 109.0)  # still isolated: counted from 100, not reset
    [reason] = m.reasons(110.0)
    assert "no peers (isolated) for 10 s" in reason
    code, doc = m.document(110.0)
    assert code == 503 and doc["status"] == "unhealthy" and doc["peers"] == "isolated"
    m.observe_peers(*peer_status(DUBIOUS, NONE), 111.0)  # only dubious: still no good peers
    assert "only dubious peers" in m.reasons(112.0)[0]
    m.observe_peers(*peer_status(GOOD, NONE), 113.0)
    assert m.document(113.0) == (200, {"status": "ok", "peers": "connected"})


def test_a_node_that_never_connects_is_unhealthy_from_its_first_observation() -> None:
    m = _monitor(isolated_after=2.0)
    m.observe_peers(*peer_status(NONE, NONE), 50.0)
    assert m.reasons(51.9) == []
    assert m.reasons(52.0) != []


def test_gateway_failing_every_push_past_the_threshold() -> None:
    m = _monitor()
    m.observe_peers(*peer_status(GOOD, NONE), 0.0)
    m.observe_gateway("gorush", 5, 0, 0.0)
    m.observe_gateway("gorush", 5, 1, 10.0)  # failing from 10
    assert m.failing_gateways() == ["gorush"]
    m.observe_gateway("gorush", 5, 4, 39.0)
    assert m.reasons(39.0) == []  # failures span 29 s
    m.observe_gateway("gorush", 5, 6, 40.0)
    assert m.reasons(41.0) == ["push gateway gorush has failed every push for 31 s"]
    m.observe_peers(*peer_status(GOOD, NONE), 500.0)
    m.observe_gateway("gorush", 5, 6, 500.0)  # no attempt since: still failing (nothing went through)
    assert m.reasons(500.0) != []
    m.observe_gateway("gorush", 6, 9, 501.0)  # one accepted push ends it
    assert m.reasons(501.0) == [] and m.failing_gateways() == []


def test_gateway_totals_count_whole_request_failures_only() -> None:
    by_gateway = {
        ("a", "delivered"): 3,
        ("a", "token-gone"): 1,
        ("a", "retry"): 2,  # one device's 429: the gateway answered
        ("a", "dropped"): 1,
        ("b", "TemporaryGatewayError"): 4,
        ("unifiedpush", "TemporaryGatewayError"): 9,  # endpoints strangers choose
    }
    assert gateway_totals(by_gateway) == {"a": (7, 0), "b": (0, 4)}


def test_a_strangers_dead_unifiedpush_endpoint_leaves_the_proxy_healthy() -> None:
    m = _monitor()
    for t in range(0, 1001, 10):
        m.observe_peers(*peer_status(GOOD, NONE), float(t))
        for name, (accepted, failed) in gateway_totals({("unifiedpush", "TemporaryGatewayError"): t}).items():
            m.observe_gateway(name, accepted, failed, float(t))
    assert m.reasons(1000.0) == []


def test_a_tiny_threshold_does_not_make_a_busy_loop() -> None:
    assert HealthMonitor(isolated_after=0.001, gateway_after=0.001).interval == 0.05


def test_stopped_parts_are_reasons_at_once() -> None:
    m = _monitor()
    m.observe_peers(*peer_status(GOOD, NONE), 0.0)
    code, doc = m.document(0.0, ["HTTP worker 1"])
    assert code == 503 and doc["reasons"] == ["HTTP worker 1 is not running"]


def test_the_three_names_are_routes_and_key_still_reaches_their_keys() -> None:
    for target in (b"/metrics", b"/METRICS/", b"/metrics?x=1"):
        assert match("GET", target) == (Route.METRICS, None)
    assert match("GET", b"/healthz") == (Route.HEALTHZ, None)
    assert match("GET", b"/status") == (Route.STATUS, None)
    assert canonical_path(b"/status") == ("/status", None)
    for name in ("metrics", "healthz", "status"):
        assert match("GET", f"/key/{name}".encode()) == (Route.GET, InfoHash.get(name))
        assert match("POST", f"/key/{name}".encode()) == (Route.PUT, InfoHash.get(name))
        assert match("SUBSCRIBE", f"/{name}".encode()) is None  # no longer the key's legacy route
    assert match("GET", b"/metricsx") == (Route.GET, InfoHash.get("metricsx"))


def test_the_worker_hands_metrics_and_healthz_over() -> None:
    for target in (b"/metrics", b"/healthz"):
        head = read_head(bytearray(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert relayed_request(head) is None  # type: ignore[arg-type]


def test_request_counts_buckets() -> None:
    counts = RequestCounts()
    counts.observe(Route.GET, 200, 0.0004)
    counts.observe(Route.GET, 200, 0.003)
    counts.observe(Route.GET, 404, 100.0)
    get = counts.routes[Route.GET]
    assert get.statuses == {200: 2, 404: 1}
    cumulative = dict(get.latency.cumulative())
    assert (cumulative["0.0005"], cumulative["0.005"], cumulative["30.0"], cumulative["+Inf"]) == (1, 2, 2, 3)


async def test_handlers_answer_metrics_and_healthz() -> None:
    app = create_app(MemoryDht(), ProxyConfig(health_isolated_after=0.5))
    state = app.state
    reply = ROUTES[Route.METRICS].handler(state, Request())
    assert reply.status == 200 and reply.headers == (
        ("Content-Type", "text/plain; version=0.0.4; charset=utf-8"),
    )
    names = {family.name for family in text_string_to_metric_families(reply.body.decode())}
    assert {"trio_dht_nodes", "trio_dht_http_requests", "process_cpu_seconds", "python_info"} <= names
    reply = ROUTES[Route.HEALTHZ].handler(state, Request())
    assert reply.status == 503 and b"the proxy's timers is not running" in reply.body  # run() not started
    async with trio.open_nursery() as nursery:
        nursery.start_soon(state.run)
        await trio.sleep(0.01)
        reply = ROUTES[Route.HEALTHZ].handler(state, Request())
        assert reply.status == 200 and b'"status":"ok"' in reply.body  # MemoryDht reports good peers
        nursery.cancel_scope.cancel()


def test_the_book_counts_subscriptions_by_platform_and_dialect() -> None:
    book = SubscriptionBook()
    key = InfoHash.get("kinds")

    def body(**fields: object) -> bytes:
        return json.dumps({"key": "tok", "client_id": "c", "platform": "android", **fields}).encode()

    sub, _ = book.subscribe(key, parse_subscribe(body()), 0.0)
    book.subscribe(key, parse_subscribe(body(client_id="d", platform="ios")), 0.0)
    assert book.kinds == {(Platform.ANDROID, Dialect.CURRENT): 1, (Platform.IOS, Dialect.CURRENT): 1}
    book.subscribe(key, parse_subscribe(body(platform="ios", refresh=True)), 1.0)  # its platform changes
    assert book.kinds == {(Platform.IOS, Dialect.CURRENT): 2}
    book.remove(sub)
    assert book.kinds == {(Platform.IOS, Dialect.CURRENT): 1}
    book.remove_token("tok")
    assert book.kinds == {}
