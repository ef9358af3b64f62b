"""Whether the node has good peers, per address family (sans-IO).

A family is *connected* while its routing table holds a good node (one that answered us in the last 2 h
and was heard from in the last 10 min, :mod:`trio_dht.node.routing`); the node is *isolated* when no family
is, the state in which the device client calls a proxy isolated (since when is ``/healthz``'s to know:
:mod:`trio_dht.proxy.health`). :meth:`Connectivity.update` takes what the tables say now and returns the
changes, which the program logs ("peers found", "peers lost") and tells systemd as its status.
"""

from __future__ import annotations

from collections.abc import Mapping


def family_name(v6: bool) -> str:
    return "IPv6" if v6 else "IPv4"


class Connectivity:
    """Per family (``v6``: False for IPv4, True for IPv6): connected or not. Nothing is connected at the
    start."""

    def __init__(self) -> None:
        self.connected: dict[bool, bool] = {}
        self.ever_connected = False

    def update(self, connected: Mapping[bool, bool], now: float) -> list[tuple[bool, bool]]:
        """Record each family's state at ``now``; the ``(v6, connected)`` pairs that changed."""
        changes = []
        for v6, is_connected in sorted(connected.items()):
            if self.connected.get(v6, False) != is_connected:
                changes.append((v6, is_connected))
            self.connected[v6] = is_connected
        self.ever_connected = self.ever_connected or any(connected.values())
        return changes

    def describe(self) -> str:
        """The families with good peers, in words (a status line)."""
        families = [family_name(v6) for v6, on in sorted(self.connected.items()) if on]
        if families:
            return f"good peers over {' and '.join(families)}"
        return "no good peer (all lost)" if self.ever_connected else "no good peer yet"
