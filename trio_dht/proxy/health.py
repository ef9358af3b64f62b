"""Whether the proxy is healthy, for ``GET /healthz`` (sans-IO: the caller passes the time).

A :class:`HealthMonitor` is shown what it needs every :attr:`HealthMonitor.interval` seconds (by
``ProxyState.run``) and when ``/healthz`` asks:

* the node's peers, classified by :func:`trio_dht.rest.health.peer_status` (the device client's rule): the
  proxy is unhealthy once its node has had no good peers for ``isolated_after`` seconds;
* each push gateway's pushes so far, accepted (any per-push outcome: the gateway answered) and failed (its
  whole request failed: unreachable, 5xx, timed out): a gateway is failing from the first failure after its
  last accepted push, and the proxy is unhealthy once a gateway's failures have gone on for
  ``gateway_after`` seconds with none accepted (one accepted push ends it). A push retried or dropped alone
  is the device's or the payload's doing, not the gateway's. UnifiedPush is left out: its endpoints are
  chosen by whoever subscribes, so a stranger's dead endpoint could otherwise make the proxy unhealthy;
* the parts that must run (HTTP workers, the proxy's timers): any that has stopped makes it unhealthy at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from trio_dht.push.gateway import Outcome
from trio_dht.rest.health import ProxyStatus

DEFAULT_ISOLATED_AFTER = 60.0
DEFAULT_GATEWAY_AFTER = 300.0


@dataclass(slots=True)
class _Gateway:
    accepted: int = 0
    failed: int = 0
    failing_since: float = math.inf
    """When its failures began (the first failure after its last accepted push); inf while well."""
    last_failure: float = -math.inf


class HealthMonitor:
    """What ``/healthz`` answers, from what it is shown (see the module docstring)."""

    def __init__(
        self,
        *,
        isolated_after: float = DEFAULT_ISOLATED_AFTER,
        gateway_after: float = DEFAULT_GATEWAY_AFTER,
    ) -> None:
        self.isolated_after = isolated_after
        self.gateway_after = gateway_after
        self.status = ProxyStatus.ISOLATED
        self.detail = "not observed yet"
        self.unconnected_since = math.inf
        """Since when the node has had no good peers (from the first observation, if it never had any); inf
        while it has some, or before the first observation."""
        self._observed = False
        self._gateways: dict[str, _Gateway] = {}

    @property
    def interval(self) -> float:
        """How often to observe: a quarter of the shorter threshold, at most a second, at least 50 ms."""
        return max(0.05, min(1.0, self.isolated_after / 4, self.gateway_after / 4))

    def observe_peers(self, status: ProxyStatus, detail: str, now: float) -> None:
        """The node's peers now (:func:`~trio_dht.rest.health.peer_status`)."""
        if status is ProxyStatus.CONNECTED:
            self.unconnected_since = math.inf
        elif self.unconnected_since == math.inf:
            self.unconnected_since = now
        self._observed = True
        self.status, self.detail = status, detail

    def observe_gateway(self, name: str, accepted: int, failed: int, now: float) -> None:
        """A gateway's pushes so far: ``accepted`` and ``failed`` (totals, never decreasing)."""
        gateway = self._gateways.get(name)
        if gateway is None:
            gateway = self._gateways[name] = _Gateway()
        if accepted > gateway.accepted:
            gateway.failing_since = math.inf
        elif failed > gateway.failed:
            if gateway.failing_since == math.inf:
                gateway.failing_since = now
            gateway.last_failure = now
        gateway.accepted, gateway.failed = accepted, failed

    def reasons(self, now: float, stopped: list[str] = ()) -> list[str]:  # type: ignore[assignment]
        """Why the proxy is unhealthy (empty: healthy); ``stopped`` names the parts not running."""
        reasons = [f"{part} is not running" for part in stopped]
        since = self.unconnected_since
        if not self._observed:
            reasons.append("the node's peers have not been observed")
        elif now - since >= self.isolated_after:
            reasons.append(f"{self.detail} for {now - since:.0f} s (no good peers)")
        for name, gateway in sorted(self._gateways.items()):
            if gateway.last_failure - gateway.failing_since >= self.gateway_after:
                span = now - gateway.failing_since
                reasons.append(f"push gateway {name} has failed every push for {span:.0f} s")
        return reasons

    def failing_gateways(self) -> list[str]:
        """The gateways failing now (for any length of time)."""
        return sorted(name for name, g in self._gateways.items() if g.failing_since != math.inf)

    def document(self, now: float, stopped: list[str] = (), **extra: object) -> tuple[int, dict[str, object]]:  # type: ignore[assignment]
        """``(status code, JSON document)`` of ``/healthz``: 200 ``{"status": "ok", ...}`` or 503
        ``{"status": "unhealthy", "reasons": [...], ...}``; ``extra`` fields are added."""
        reasons = self.reasons(now, stopped)
        doc: dict[str, object] = {"status": "unhealthy" if reasons else "ok"}
        if reasons:
            doc["reasons"] = reasons
        doc["peers"] = self.status.value
        failing = self.failing_gateways()
        if failing:
            doc["failingGateways"] = failing
        doc.update(extra)
        return (503 if reasons else 200), doc


def gateway_totals(by_gateway: Mapping[tuple[str, str], int]) -> dict[str, tuple[int, int]]:
    """Each operator-configured gateway's ``(accepted, failed)`` pushes from ``PushCounts.by_gateway``
    ((gateway, outcome or exception name) -> pushes): accepted = a per-push outcome, failed = a failed whole
    request (an exception's name). ``unifiedpush`` is left out (see the module docstring)."""
    totals: dict[str, tuple[int, int]] = {}
    for (name, outcome), count in by_gateway.items():
        if name in NOT_WATCHED:
            continue
        accepted, failed = totals.get(name, (0, 0))
        if outcome in PER_PUSH_OUTCOMES:
            accepted += count
        else:
            failed += count
        totals[name] = (accepted, failed)
    return totals


PER_PUSH_OUTCOMES = frozenset(outcome.value for outcome in Outcome)
"""What a gateway that answered says of each push (``Outcome`` values)."""
NOT_WATCHED = frozenset({"unifiedpush"})
"""Gateways whose endpoints strangers choose."""
