"""Which limits refused or cut input lately, as one log line (sans-IO).

Every budget of :mod:`trio_dht.limits` counts what it refuses, drops, cuts or evicts in ``/node/stats``
(:data:`LIMIT_COUNTERS` names those counters by their path in that document). :class:`LimitsHit` compares
two readings of the document and says which moved, and by how much; the program logs that line once a
minute when anything did, so a flood costs the log one line a minute, whatever its rate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LIMIT_COUNTERS: tuple[str, ...] = (
    # The UDP node (``nodeInfo``).
    "nodeInfo.dropped_rate",
    "nodeInfo.dropped_unsolicited_fragments",
    "nodeInfo.reassembly_dropped_budget",
    "nodeInfo.listeners_refused",
    "nodeInfo.confirm_dropped_full",
    "nodeInfo.confirm_dropped_stale",
    "nodeInfo.rate_sources_evicted",
    "nodeInfo.validation_evicted",
    "nodeInfo.amplification_limited",
    "nodeInfo.verify_refused_keys",
    "nodeInfo.values_over_decrypt_budget",
    "nodeInfo.send_queue_dropped",
    # The HTTP proxy.
    "http.headTimeouts",
    "http.bodyTimeouts",
    "http.sendTimeouts",
    "http.sendBufferOverflows",
    "http.connectionsRefused",
    "http.listensRefused",
    "http.acceptPauses",
    "http.handOversDropped",
    "rateLimit.refused",
    "rateLimit.evicted",
    "permanentPuts.refusedPerSource",
    "permanentPuts.refusedFull",
    # Push.
    "pushSubscriptions.refusedPerSource",
    "pushSubscriptions.refusedFull",
    "pushDelivery.timeouts",
    "pushDelivery.oversizedReplies",
    "pushDelivery.oneOffGaveUp",
    "pushDelivery.expired",
    "pushDelivery.laneFull",
    "pushDelivery.queueFull",
    "pushDelivery.lookupStuck",
)
"""The counters of ``/node/stats`` that count a limit reached (``section.name``)."""

REPORT_EVERY = 60.0
"""Seconds between two readings by the program."""


def read_counters(stats: Mapping[str, Any]) -> dict[str, int]:
    """The :data:`LIMIT_COUNTERS` found in a ``/node/stats`` document (a missing section is left out)."""
    counters = {}
    for path in LIMIT_COUNTERS:
        section, _, name = path.partition(".")
        value = stats.get(section, {}).get(name)
        if isinstance(value, int):
            counters[path] = value
    return counters


class LimitsHit:
    """The limits reached between two readings of ``/node/stats``."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def line(self, stats: Mapping[str, Any], seconds: float) -> str | None:
        """What moved since the last reading (the first one only sets the mark), ``seconds`` ago, as a log
        line; None if nothing did."""
        counters = read_counters(stats)
        moved = [
            f"{path} +{value - self._last[path]:,}"
            for path, value in counters.items()
            if path in self._last and value > self._last[path]
        ]
        self._last = counters
        if not moved:
            return None
        return f"limits reached in the last {seconds:.0f} s (counters of /node/stats): {', '.join(moved)}"
