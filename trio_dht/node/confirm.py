"""The queue of nodes waiting for a confirmation ping, sans-IO.

A node we only heard of (listed in a reply) or heard from (its request) becomes good once it answers a ping of
ours, and an address that answers is validated for sending (``node.validation``). Every stranger's request can
ask for one, so the queue is bounded twice:

- at most ``Limits.udp_confirm_queue`` nodes wait; a new one past that is dropped (``dropped_full``), and
  one that waited longer than :data:`MAX_WAIT` is dropped when its turn comes (``dropped_stale``);
- at most ``Limits.udp_confirm_in_flight`` pings await their reply at once (a ping that gets none fails after
  8 s, so a flood of spoofed ids costs at most that many pings every 8 s).

A node is queued or pinged once at a time (by id). When :meth:`ConfirmQueue.push` returns
:attr:`Pushed.SEND`, the node pings the nodes :meth:`ConfirmQueue.ready` gives; each ping's end
(:meth:`ConfirmQueue.done`) frees its slot for the next.
"""

from __future__ import annotations

import enum
from collections import OrderedDict

from trio_dht.infohash import InfoHash
from trio_dht.limits import DEFAULT, Limits
from trio_dht.node.routing import Node

MAX_WAIT = 60.0
"""Seconds a node may wait in the queue; older ones are dropped unpinged."""


class Pushed(enum.Enum):
    """What :meth:`ConfirmQueue.push` did; all but ``FULL`` are true."""

    SEND = "send"
    """Newly queued, and a ping slot is free: :meth:`ConfirmQueue.ready` has a node to ping."""
    QUEUED = "queued"
    """Newly queued; it waits for a ping in flight to end."""
    HELD = "held"
    """Already queued or being pinged: nothing changed."""
    FULL = "full"
    """The queue is full: dropped (counted)."""

    def __bool__(self) -> bool:
        return self is not Pushed.FULL


class ConfirmQueue:
    """Nodes to ping, in arrival order, with a bounded number of pings in flight."""

    def __init__(self, limits: Limits = DEFAULT) -> None:
        self.capacity = limits.udp_confirm_queue
        self.in_flight_max = limits.udp_confirm_in_flight
        self._queue: OrderedDict[InfoHash, tuple[Node, float]] = OrderedDict()
        self._in_flight: set[InfoHash] = set()
        self.held: set[InfoHash] = set()
        """The ids queued or being pinged: a caller tests this (no call) before :meth:`push`, which is a no-op
        for them."""
        self.dropped_full = 0
        self.dropped_stale = 0

    def __len__(self) -> int:
        """Nodes waiting (not counting pings in flight)."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def push(self, node: Node, now: float) -> Pushed:
        """Queue ``node`` unless it is queued or pinged already, or the queue is full (counted)."""
        nid = node.id
        if nid in self.held:
            return Pushed.HELD
        if len(self._queue) >= self.capacity:
            self.dropped_full += 1
            return Pushed.FULL
        self._queue[nid] = (node, now)
        self.held.add(nid)
        return Pushed.SEND if len(self._in_flight) < self.in_flight_max else Pushed.QUEUED

    def ready(self, now: float) -> list[Node]:
        """The nodes to ping now (as many as free slots allow), each counted in flight until :meth:`done`."""
        out = []
        queue = self._queue
        while queue and len(self._in_flight) < self.in_flight_max:
            nid, (node, queued) = queue.popitem(last=False)
            if now - queued > MAX_WAIT:
                self.dropped_stale += 1
                self.held.discard(nid)
                continue
            self._in_flight.add(nid)
            out.append(node)
        return out

    def done(self, node: Node) -> None:
        """The ping of ``node`` ended (answered or not): its slot is free."""
        self._in_flight.discard(node.id)
        self.held.discard(node.id)
