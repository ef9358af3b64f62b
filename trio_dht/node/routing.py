"""Kademlia routing table of one address family (K = 8), as OpenDHT keeps it. Sans-IO: ``now`` is passed in.

A node is *good* when it answered one of our requests in the last 2 h and was heard from in the last 10 min;
*expired* after a request to it failed (or too many auth errors); *dubious* otherwise. Only good nodes are
handed out in find/get replies.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from trio_dht.infohash import HASH_LEN, InfoHash
from trio_dht.wire.compact import Address

K = 8
MAX_HASH = 1 << (HASH_LEN * 8)
GOOD_REPLY_WINDOW = 2 * 3600.0
GOOD_HEARD_WINDOW = 10 * 60.0
BUCKET_REFRESH = 10 * 60.0
MAX_AUTH_ERRORS = 3
NEVER = float("-inf")


@dataclass(slots=True, eq=False)
class Node:
    """A peer as we know it."""

    id: InfoHash
    addr: Address
    id_int: int = 0
    last_heard: float = NEVER
    last_replied: float = NEVER
    expired: bool = False
    auth_errors: int = 0
    is_client: bool = False

    def __post_init__(self) -> None:
        self.id_int = self.id.to_int()

    def is_good(self, now: float) -> bool:
        return (
            not self.expired
            and now - self.last_replied < GOOD_REPLY_WINDOW
            and now - self.last_heard < GOOD_HEARD_WINDOW
        )

    def heard(self, addr: Address, now: float, *, replied: bool) -> None:
        """Any packet from it: refreshes its address and clears the expired flag."""
        self.addr = addr
        self.last_heard = now
        self.expired = False
        if replied:
            self.last_replied = now
            self.auth_errors = 0

    def request_failed(self) -> None:
        self.expired = True

    def auth_error(self) -> None:
        self.auth_errors += 1
        if self.auth_errors > MAX_AUTH_ERRORS:
            self.expired = True


@dataclass(slots=True, eq=False)
class Bucket:
    """Nodes whose ids lie in [first, next bucket's first)."""

    first: int
    nodes: list[Node] = field(default_factory=list)
    cached: Node | None = None
    last_changed: float = NEVER
    mask: int = 0
    """The id bits every id in the bucket shares with ``first`` (its range is aligned on its size)."""


class RoutingTable:
    """Buckets for one family; only the bucket holding our own id splits."""

    def __init__(self, own_id: InfoHash):
        self.own_id = own_id
        self._own = own_id.to_int()
        self.buckets: list[Bucket] = [Bucket(0)]
        self._firsts: list[int] = [0]
        self.by_id: dict[InfoHash, Node] = {}
        """Every node currently in a bucket."""
        self.grown_at = NEVER

    # -- lookup ---------------------------------------------------------------------------------------------

    def _index(self, id_int: int) -> int:
        return bisect.bisect_right(self._firsts, id_int) - 1

    def _end(self, index: int) -> int:
        return self._firsts[index + 1] if index + 1 < len(self._firsts) else MAX_HASH

    def get(self, node_id: InfoHash) -> Node | None:
        return self.by_id.get(node_id)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.by_id.values())

    def __len__(self) -> int:
        return len(self.by_id)

    def closest(self, target: bytes, count: int = K, *, now: float, good_only: bool = True) -> list[Node]:
        """Up to ``count`` nodes closest to ``target`` by XOR distance (good ones only by default)."""
        t = int.from_bytes(target, "big")
        found: list[Node] = []
        for bucket in self._nearest_buckets(t):
            found += [n for n in bucket.nodes if n.is_good(now)] if good_only else bucket.nodes
            if len(found) >= count:
                break
        found.sort(key=lambda n: n.id_int ^ t)
        del found[count:]
        return found

    def _nearest_buckets(self, t: int) -> list[Bucket]:
        """Buckets by distance to ``t``: any id in one is closer to ``t`` than any id in the next.

        A bucket's range is aligned on its power-of-two size, so XOR with ``t`` maps it onto an aligned range
        that starts at ``(first ^ t) & mask``, and the ranges of different buckets do not overlap.
        """
        buckets = self.buckets
        if len(buckets) == 1:
            return buckets
        starts = sorted([((b.first ^ t) & b.mask, i) for i, b in enumerate(buckets)])
        return [buckets[i] for _, i in starts]

    def counts(self, now: float) -> tuple[int, int]:
        """(good, dubious) node counts."""
        good = sum(1 for n in self.by_id.values() if n.is_good(now))
        return good, len(self.by_id) - good

    def is_connected(self, now: float) -> bool:
        return any(n.is_good(now) for n in self.by_id.values())

    # -- updates --------------------------------------------------------------------------------------------

    def heard(
        self, node_id: InfoHash, addr: Address, now: float, *, replied: bool
    ) -> tuple[Node, Node | None]:
        """Record a packet from a node. Returns (its record, a dubious node the caller should ping or None).

        A node new to a full bucket replaces an expired node, splits our own bucket, or waits as the bucket's
        cached candidate while one of its dubious nodes is pinged.
        """
        node = self.by_id.get(node_id)
        if node is not None:
            node.heard(addr, now, replied=replied)
            if replied:
                self.buckets[self._index(node.id_int)].last_changed = now
            return node, None
        node = Node(node_id, addr)
        node.heard(addr, now, replied=replied)
        return node, self._insert(node, now)

    def _insert(self, node: Node, now: float) -> Node | None:
        while True:
            i = self._index(node.id_int)
            b = self.buckets[i]
            if len(b.nodes) < K:
                self._add(b, node, now)
                return None
            for j, old in enumerate(b.nodes):
                if old.expired:
                    del self.by_id[old.id]
                    b.nodes[j] = node
                    self.by_id[node.id] = node
                    b.last_changed = now
                    return None
            mine = b.first <= self._own < self._end(i)
            dubious = [n for n in b.nodes if not n.is_good(now)]
            if ((mine and not dubious) or len(self.buckets) == 1) and self._split(i):
                continue
            b.cached = node
            return dubious[0] if dubious else None

    def _add(self, b: Bucket, node: Node, now: float) -> None:
        b.nodes.append(node)
        self.by_id[node.id] = node
        if node.last_replied == now:
            b.last_changed = now
        self.grown_at = now

    def _split(self, i: int) -> bool:
        b = self.buckets[i]
        end = self._end(i)
        if end - b.first < 2:
            return False
        mid = b.first + (end - b.first) // 2
        b.mask = MAX_HASH - (mid - b.first)  # the bits above the halves' size
        upper = Bucket(mid, [n for n in b.nodes if n.id_int >= mid], last_changed=b.last_changed, mask=b.mask)
        b.nodes = [n for n in b.nodes if n.id_int < mid]
        if b.cached is not None and b.cached.id_int >= mid:  # the candidate goes with its half
            upper.cached, b.cached = b.cached, None
        self.buckets.insert(i + 1, upper)
        self._firsts.insert(i + 1, mid)
        return True

    def request_failed(self, node_id: InfoHash) -> None:
        node = self.by_id.get(node_id)
        if node is not None:
            node.request_failed()

    def remove_expired(self) -> list[Node]:
        """Drop expired nodes from their buckets (promoting cached candidates); returns candidates to ping."""
        to_ping = []
        for b in self.buckets:
            kept = [n for n in b.nodes if not n.expired]
            for n in b.nodes:
                if n.expired:
                    del self.by_id[n.id]
            b.nodes = kept
            if b.cached is not None and len(b.nodes) < K:
                if b.cached.id not in self.by_id:
                    b.nodes.append(b.cached)
                    self.by_id[b.cached.id] = b.cached
                    to_ping.append(b.cached)
                b.cached = None
        return to_ping

    # -- maintenance ----------------------------------------------------------------------------------------

    def random_id_in(self, i: int) -> InfoHash:
        return InfoHash.from_int(random.randrange(self.buckets[i].first, self._end(i)))

    def stale_buckets(self, now: float) -> list[tuple[InfoHash, Node | None]]:
        """(random target, node to ask) for each bucket empty or silent for 10 min."""
        out = []
        for i, b in enumerate(self.buckets):
            if b.nodes and now - b.last_changed < BUCKET_REFRESH:
                continue
            candidates = b.nodes or self._neighbour_nodes(i)
            fresh = [n for n in candidates if not n.expired]
            out.append((self.random_id_in(i), random.choice(fresh) if fresh else None))
        return out

    def _neighbour_nodes(self, i: int) -> list[Node]:
        for j in (i + 1, i - 1):
            if 0 <= j < len(self.buckets) and self.buckets[j].nodes:
                return self.buckets[j].nodes
        return []
