"""Which limits refused or cut input lately, as one log line (sans-IO).

Every budget of :mod:`trio_dht.limits` counts what it refuses, drops, cuts or evicts in ``/node/stats``
(:data:`LIMIT_COUNTERS` names those counters by their path in that document). :class:`LimitsHit` compares
two readings of the document and says which moved, and by how much; the program logs that line once a
minute when anything did, so a flood costs the log one line a minute, whatever its rate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LIMIT_COUNTERS: dict[str, str] = {
    # The UDP node (``nodeInfo``).
    "nodeInfo.dropped_rate": "udp_rate",
    "nodeInfo.dropped_unsolicited_fragments": "udp_unsolicited_fragments",
    "nodeInfo.reassembly_dropped_budget": "udp_reassembly_bytes",
    "nodeInfo.listeners_refused": "udp_listeners",
    "nodeInfo.confirm_dropped_full": "udp_confirm_queue",
    "nodeInfo.confirm_dropped_stale": "udp_confirm_age",
    "nodeInfo.rate_sources_evicted": "udp_rate_sources",
    "nodeInfo.validation_evicted": "udp_validated_addresses",
    "nodeInfo.amplification_limited": "udp_amplification",
    "nodeInfo.verify_refused_keys": "rsa_max_bits",
    "nodeInfo.values_over_decrypt_budget": "decrypts_per_second",
    "nodeInfo.send_queue_dropped": "udp_send_queue",
    # The HTTP proxy.
    "http.headTimeouts": "http_head_timeout",
    "http.bodyTimeouts": "http_body_timeout",
    "http.sendTimeouts": "http_send_timeout",
    "http.sendBufferOverflows": "http_send_buffer",
    "http.connectionsRefused": "http_connections_per_ip",
    "http.listensRefused": "http_listens_per_ip",
    "http.acceptPauses": "accept_pause",
    "http.handOversDropped": "http_worker_hand_over",
    "rateLimit.refused": "http_rate",
    "rateLimit.evicted": "http_rate_clients",
    "permanentPuts.refusedPerSource": "permanent_puts_per_source",
    "permanentPuts.refusedFull": "permanent_puts_bytes",
    # Push.
    "pushSubscriptions.refusedPerSource": "subscriptions_per_source",
    "pushSubscriptions.refusedFull": "subscriptions_total",
    "pushDelivery.timeouts": "push_request_timeout",
    "pushDelivery.oversizedReplies": "push_response_bytes",
    "pushDelivery.oneOffGaveUp": "push_one_off_attempts",
    "pushDelivery.expired": "push_max_age",
    "pushDelivery.laneFull": "push_lane_queue",
    "pushDelivery.queueFull": "push_queue",
    "pushDelivery.lookupStuck": "push_lookup_stuck",
}
"""The counters of ``/node/stats`` that count a limit reached (``section.name``), each with the limit it
counts: a :class:`~trio_dht.limits.Limits` name, or the rule's (the ``limit`` label of ``/metrics``'
``trio_dht_limit_hits_total``, read from this one table)."""

REPORT_EVERY = 60.0
"""Seconds between two readings by the program."""


def read_counters(stats: Mapping[str, Any]) -> dict[str, int]:
    """The :data:`LIMIT_COUNTERS` found in a ``/node/stats`` document, by path (a missing section is left
    out)."""
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
