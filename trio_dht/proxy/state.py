"""What the proxy's routes share: the DHT, counters, held permanent puts, open listen streams, push hooks,
and the health monitor.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import trio

from trio_dht.api import Dht, FamilyStats, NodeInfo
from trio_dht.infohash import InfoHash
from trio_dht.proxy.conn_limits import HttpCounters
from trio_dht.proxy.health import HealthMonitor, gateway_totals
from trio_dht.proxy.permanent import PermanentPut, PermanentPuts, PutJournal
from trio_dht.proxy.ratelimit import HttpRateLimiter
from trio_dht.proxy.replies import Reply
from trio_dht.proxy.request_counts import RequestCounts
from trio_dht.proxy.settings import ProxyConfig
from trio_dht.proxy.streams import ListenRegistry
from trio_dht.rest.health import peer_status
from trio_dht.rest.paths import served_routes
from trio_dht.rest.value_json import PushTarget

if TYPE_CHECKING:
    from trio_dht.push.service import PushReply

log = logging.getLogger(__name__)
RESTORE_SPACING = 0.01
"""Seconds between the re-announcements of restored permanent puts (no burst at start-up)."""

STATS_WINDOW = 120.0
"""``requestRate`` is the request count of the last full window of this many seconds (OpenDHT's 2 minutes)."""


class PushHooks(Protocol):
    """What the push side plugs into the proxy (see ``create_app(push=...)``)."""

    def subscribe(self, key: InfoHash, body: bytes, source: str = "") -> PushReply:
        """``SUBSCRIBE /key/{key}`` (or ``/{key}``) with this raw body from ``source`` (the client's address
        bucket, ``""`` if unknown), answered without waiting (a reply with ``fetch_values`` leaves the DHT get
        of the key's values to the route, :func:`trio_dht.proxy.routes.subscribe`)."""
        ...

    def unsubscribe(self, key: InfoHash, body: bytes) -> PushReply:
        """``UNSUBSCRIBE /key/{key}`` (or ``/{key}``) with this raw body."""
        ...

    async def ping(self, target: PushTarget) -> None:
        """``POST /node/pingPush``: send ``{"to": client_id, "pong": true}`` to the target."""
        ...

    def permanent_put_due(self, held: PermanentPut) -> None:
        """A permanent put with a push target is 2 h from lapsing: send its ``timeout``/``vid`` push."""
        ...

    def stats(self) -> dict[str, Any]:
        """Fields merged into ``/node/stats`` (``pushListenersCount``, ``androidPush``, ...)."""
        ...


class ProxyState:
    """The state behind one proxy app. :meth:`run` drives the permanent-put timers and the health
    observations (``serve_proxy`` runs it).
    """

    def __init__(
        self, dht: Dht, config: ProxyConfig, push: PushHooks | None = None, journal: PutJournal | None = None
    ) -> None:
        self.dht = dht
        self.config = config
        self.push = push
        self.identity = getattr(dht, "identity", None) is not None
        """The DHT has an identity (``dht.identity``): the sign and encrypt routes are served."""
        self.served = served_routes(push=push is not None, identity=self.identity)
        """The routes this proxy serves (the push routes need push hooks, sign and encrypt an identity)."""
        self.permanent = PermanentPuts(
            journal,
            per_source=config.limits.permanent_puts_per_source,
            bytes_per_source=config.limits.permanent_puts_bytes_per_source,
            max_bytes=config.limits.permanent_puts_bytes,
        )
        limits = config.limits
        self.listens = ListenRegistry(limits.http_listens_per_ip, limits.http_send_buffer)
        self.http_counters = HttpCounters()
        """The HTTP limits reached (``/node/stats`` ``"http"``, reported by the front end)."""
        self.limiter = (
            HttpRateLimiter(config.rate_limit, max_clients=config.limits.http_rate_clients)
            if config.rate_limit
            else None
        )
        self.start_time = time.time()
        self.requests = 0
        self._window: tuple[float, int] | None = None
        self._last_rate = 0.0
        self._timers_changed = trio.Event()
        self.node_info_replies: tuple[float, bytes, bytes, dict[str, Reply]] | None = None
        """The cached ``GET /node/info`` JSON: (valid until, bytes before ``public_ip``'s value, after it, the
        replies made from it by client address)."""
        self.stats_sources: list[Callable[[], dict[str, Any]]] = []
        """More of ``/node/stats``: each returns fields to add (the front end's HTTP workers)."""
        self.request_counts = RequestCounts()
        """HTTP requests answered, by route and status, with their latency (``/metrics``)."""
        self.metrics_registry: Any = None
        """The registry of ``/metrics`` (:mod:`~trio_dht.proxy.metrics`), made when first scraped."""
        self.health = HealthMonitor(
            isolated_after=config.health_isolated_after,
            gateway_after=config.health_gateway_after,
        )
        self.parts: list[Callable[[], list[str]]] = [self._timers_stopped]
        """Each names the parts of the proxy that should run and do not (``/healthz``)."""
        self.running = False
        """:meth:`run` runs (the permanent puts' timers and the health observations)."""

    # -- counters -------------------------------------------------------------------------------------------

    def count_request(self) -> None:
        """Count a request towards ``requestRate`` (all but node info, as OpenDHT)."""
        self.requests += 1

    def request_rate(self, now: float) -> float:
        if self._window is None:
            self._window = (now, self.requests)
        start, count = self._window
        if now - start >= STATS_WINDOW:
            self._last_rate = (self.requests - count) / (now - start)
            self._window = (now, self.requests)
        return self._last_rate

    # -- health ---------------------------------------------------------------------------------------------

    def observe_health(self, now: float) -> None:
        """Show the health monitor the node's peers and the gateways' pushes now."""
        try:
            info = self.dht.info()
        except Exception:
            log.exception("dht.info() failed")
        else:
            self.health.observe_peers(*peer_status(info.ipv4, info.ipv6), now)
        counts = getattr(self.push, "counts", None)
        by_gateway = getattr(counts, "by_gateway", None)
        if by_gateway is not None:
            for name, (accepted, failed) in gateway_totals(by_gateway).items():
                self.health.observe_gateway(name, accepted, failed, now)

    def healthz(self, now: float) -> tuple[int, dict[str, Any]]:
        """``GET /healthz``'s status code and document (see :mod:`~trio_dht.proxy.health`)."""
        self.observe_health(now)
        stopped = [part for stopped in self.parts for part in stopped()]
        return self.health.document(now, stopped, node_id=self.dht.node_id.hex())

    def _timers_stopped(self) -> list[str]:
        return [] if self.running else ["the proxy's timers"]

    async def _observe_health(self) -> None:
        while True:
            self.observe_health(trio.current_time())
            await trio.sleep(self.health.interval)

    # -- documents ------------------------------------------------------------------------------------------

    def node_info(self) -> dict[str, Any] | None:
        """``GET /node/info`` without ``public_ip``; None while the DHT cannot tell."""
        try:
            info = self.dht.info()
        except Exception:
            log.exception("dht.info() failed")
            return None
        return node_info_json(info)

    def stats(self, now: float) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "listenCount": len(self.listens),
            "putCount": self.permanent.key_count,
            "totalPermanentPuts": self.permanent.total,
            "permanentPuts": {
                "sources": self.permanent.source_count,
                "bytes": self.permanent.bytes,
                "refusedPerSource": self.permanent.refused,
                "refusedFull": self.permanent.refused_full,
            },
            "pushListenersCount": 0,
            "serverStartTime": int(self.start_time),
            "lastUpdated": int(time.time()),
            "requestRate": self.request_rate(now),
        }
        info = self.node_info()
        if info is not None:
            doc["nodeInfo"] = info
        if self.limiter is not None:
            doc["rateLimit"] = {
                "clients": len(self.limiter),
                "refused": self.limiter.refused,
                "evicted": self.limiter.evicted,
            }
        if self.permanent.journal is not None:
            doc["stateFile"] = self.permanent.journal.stats()
        if self.push is not None:
            doc.update(self.push.stats())
        for source in self.stats_sources:
            doc.update(source())
        return doc

    # -- permanent puts -------------------------------------------------------------------------------------

    def permanent_changed(self) -> None:
        self._timers_changed.set()

    async def run(self) -> None:
        """Cancel permanent puts whose 24 h ran out and hand due refresh warnings to the push hooks.

        With a journal, the puts held before a restart are held again and re-announced first (spread out).
        Beside them, every ``health.interval`` seconds, the health monitor is shown the node's peers and the
        gateways' pushes (:meth:`observe_health`).
        """
        async with trio.open_nursery() as nursery:
            self.running = True
            nursery.start_soon(self._observe_health)
            journal = self.permanent.journal
            if journal is not None:
                restored = journal.load()
                for held in restored:
                    self.permanent.restore(held)
                if restored:
                    log.info("re-announcing %d permanent puts from the state file", len(restored))
                    nursery.start_soon(self._reannounce, restored)
            try:
                await self._run_timers()
            finally:
                self.running = False

    async def _reannounce(self, restored: list[PermanentPut]) -> None:
        for held in restored:
            try:
                await self.dht.put(held.key, held.value, permanent=True)
            except Exception:
                log.exception("re-announcing %s/%d failed", held.key, held.value.id)
            await trio.sleep(RESTORE_SPACING)

    async def _run_timers(self) -> None:
        while True:
            deadline = self.permanent.next_deadline()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._timers_changed.wait()
            self._timers_changed = trio.Event()
            expired, warn = self.permanent.due(trio.current_time())
            for held in expired:
                try:
                    self.dht.cancel_put(held.key, held.value.id)
                except Exception:
                    log.exception("cancel_put failed for %s/%d", held.key, held.value.id)
            for held in warn:
                if self.push is not None:
                    self.push.permanent_put_due(held)

    def close_listens(self) -> None:
        """End every open listen stream cleanly (with a last chunk), as on shutdown."""
        for stream in list(self.listens):
            stream.close()


def family_json(stats: FamilyStats) -> dict[str, Any]:
    doc: dict[str, Any] = {"good": stats.good, "dubious": stats.dubious, "incoming": stats.incoming}
    if stats.network_size_estimation:
        doc["network_size_estimation"] = stats.network_size_estimation
    return doc


def node_info_json(info: NodeInfo) -> dict[str, Any]:
    """OpenDHT's ``NodeInfo::toJson``: ``node_id``, per-family counts, storage figures, ports, extras."""
    doc: dict[str, Any] = dict(info.extra)
    doc.update(
        node_id=info.node_id.hex(),
        ipv4=family_json(info.ipv4),
        ipv6=family_json(info.ipv6),
        storage_size=info.storage_size,
        storage_values=info.storage_values,
    )
    doc.setdefault("ops", info.listeners)
    if info.bound_port:
        doc["port_ipv4"] = doc["port_ipv6"] = info.bound_port
    return doc
