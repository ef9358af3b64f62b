"""The state of one iterative search (OpenDHT: keep 14 nodes, 4 requests in flight), sans-IO.

The search driver (``node.search_driver``) asks :meth:`SearchState.next_nodes` whom to query, then reports
each outcome. A node is *synced* once it answered with a usable token; the search is *done* when the first 8
usable nodes are synced.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from trio_dht.infohash import InfoHash
from trio_dht.node.routing import K, Node

SEARCH_NODES = 14
MAX_IN_FLIGHT = 4
MAX_TOKEN_LEN = 64


class Status(enum.Enum):
    NEW = "new"
    PENDING = "pending"
    SLOW = "slow"  # no answer after the first retransmission: no longer counted in flight
    SYNCED = "synced"
    FAILED = "failed"


@dataclass(slots=True, eq=False)
class SearchNode:
    node: Node
    distance: int
    status: Status = Status.NEW
    token: bytes | None = None

    @property
    def usable(self) -> bool:
        return self.status not in (Status.FAILED, Status.SLOW)


class SearchState:
    """Nodes ordered by distance to ``target``, and where each stands."""

    def __init__(self, target: InfoHash) -> None:
        self.target = target
        self._t = target.to_int()
        self.nodes: list[SearchNode] = []
        self._by_id: dict[InfoHash, SearchNode] = {}

    def add(self, node: Node) -> bool:
        """Offer a node; kept if it is among the 14 closest usable ones."""
        if node.id in self._by_id:
            return False
        d = node.id_int ^ self._t
        usable = [sn for sn in self.nodes if sn.usable]
        if len(usable) >= SEARCH_NODES and d >= usable[-1].distance:
            return False
        sn = SearchNode(node, d)
        self.nodes.append(sn)
        self.nodes.sort(key=lambda s: s.distance)
        self._by_id[node.id] = sn
        self._trim()
        return True

    def _trim(self) -> None:
        usable = 0
        keep = []
        for sn in self.nodes:
            if sn.usable:
                usable += 1
                if usable > SEARCH_NODES and sn.status is Status.NEW:
                    del self._by_id[sn.node.id]
                    continue
            keep.append(sn)
        self.nodes = keep

    def get(self, node_id: InfoHash) -> SearchNode | None:
        return self._by_id.get(node_id)

    @property
    def in_flight(self) -> int:
        return sum(1 for sn in self.nodes if sn.status is Status.PENDING)

    def next_nodes(self) -> list[SearchNode]:
        """Nodes to query now (closest first), keeping at most 4 in flight; marks them pending."""
        room = MAX_IN_FLIGHT - self.in_flight
        out = []
        for sn in self.nodes:
            if room <= 0:
                break
            if sn.status is Status.NEW and not sn.node.expired:
                sn.status = Status.PENDING
                out.append(sn)
                room -= 1
        return out

    def on_slow(self, node_id: InfoHash) -> None:
        sn = self._by_id.get(node_id)
        if sn is not None and sn.status is Status.PENDING:
            sn.status = Status.SLOW

    def on_reply(self, node_id: InfoHash, token: bytes | None) -> None:
        sn = self._by_id.get(node_id)
        if sn is None:
            return
        if token is not None and 0 < len(token) <= MAX_TOKEN_LEN:
            sn.status = Status.SYNCED
            sn.token = token
        else:
            sn.status = Status.FAILED  # a node that cannot be written to is of no use to this search

    def on_failure(self, node_id: InfoHash) -> None:
        sn = self._by_id.get(node_id)
        if sn is not None:
            sn.status = Status.FAILED

    def first(self, count: int = K) -> list[SearchNode]:
        """The closest ``count`` usable nodes."""
        return [sn for sn in self.nodes if sn.usable][:count]

    def synced(self, count: int = K) -> list[SearchNode]:
        return [sn for sn in self.first(count) if sn.status is Status.SYNCED]

    @property
    def done(self) -> bool:
        """The closest usable nodes have all answered, or nobody is left to ask."""
        first = self.first(K)
        if first and all(sn.status is Status.SYNCED for sn in first):
            return True
        return not any(sn.status in (Status.NEW, Status.PENDING, Status.SLOW) for sn in self.nodes)

    @property
    def waiting(self) -> bool:
        """Requests are still out (pending or slow)."""
        return any(sn.status in (Status.PENDING, Status.SLOW) for sn in self.nodes)
