"""Reassembly of fragmented messages (a header announcing value sizes, then ``p`` fragments), sans-IO.

Keyed by (source address, ``t``) as OpenDHT 4.3+. Memory follows the bytes actually received, never the sizes
a header announces: each fragment is kept as it came, and a value's fragments are joined once they cover it
exactly. Everything held is charged, bytes plus a fixed cost per fragment and per message, against a global
budget and a budget per source; what would go past either is dropped and counted. Overlapping fragments,
values over the size limit, and more fragments per value than its size allows at ``MIN_FRAGMENT`` bytes each
(a peer sends 1280-byte chunks; this keeps a value's sorted insertions short) are refused.

Which messages may start is the caller's rule, passed as ``reply``: a node passes the header of a reply, or
a fragment, with ``reply=True`` only when its ``t`` is a request it sent to that address (random ids, so a
stranger cannot guess one). Only such a reply's fragments may arrive before their header (at most 100
fragments and 120 KiB per message then: the most one reply carries before its header is known). A fragment of
a request (a put, an update) that arrives before its header is dropped and counted (:attr:`unsolicited`):
OpenDHT sends a request's header first and its fragments right behind it, and keeping strangers' early
fragments would let anyone fill the table. Requests may hold at most half of the messages
(``Limits.udp_reassembly_messages``) and half of the global byte budget, so the replies to our own requests
always find room.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from trio_dht.limits import DEFAULT, Limits
from trio_dht.value import MAX_VALUE_SIZE, InvalidValue, Value
from trio_dht.wire.message import Message

MAX_SERIALISED_VALUE = MAX_VALUE_SIZE + 32
MAX_AGE = 10.0
MAX_IDLE = 3.0
MAX_EARLY_BYTES = 120 * 1024
MAX_EARLY_FRAGMENTS = 100
"""Per reply message before its header: fixed by what one reply carries, not an operator's budget."""
MIN_FRAGMENT = 512
"""A value may come in at most ceil(size / MIN_FRAGMENT) fragments."""
PARTIAL_COST = 256
"""Bytes charged for a message being reassembled, beside its fragments."""
SIZE_COST = 8
"""Bytes charged per value size its header announces."""
FRAGMENT_COST = 64
"""Bytes charged per fragment kept, beside its data."""

Key = tuple[Hashable, int]
"""(source address, ``t``)."""


@dataclass(slots=True)
class _Value:
    """The fragments of one value received so far, sorted by offset (none overlap)."""

    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    data: list[bytes] = field(default_factory=list)
    received: int = 0

    def add(self, offset: int, data: bytes) -> bool:
        """Keep a fragment unless it overlaps one already here (a duplicate, a retransmission)."""
        end = offset + len(data)
        i = bisect.bisect_right(self.starts, offset)
        if (i and self.ends[i - 1] > offset) or (i < len(self.starts) and self.starts[i] < end):
            return False
        self.starts.insert(i, offset)
        self.ends.insert(i, end)
        self.data.insert(i, data)
        self.received += len(data)
        return True

    def cost(self) -> int:
        return self.received + FRAGMENT_COST * len(self.data)


@dataclass(slots=True)
class _Partial:
    source: Hashable
    started: float
    last: float
    reply: bool
    header: Message | None = None
    values: dict[int, _Value] = field(default_factory=dict)
    missing: int = 0
    """Values the header announces (within the size limit) that are not whole yet."""
    fragments: int = 0
    early_bytes: int = 0
    cost: int = PARTIAL_COST


class Reassembler:
    """Collects fragmented messages until every value is whole, within ``Limits.udp_reassembly_bytes`` in all
    and ``Limits.udp_reassembly_bytes_per_source`` per source (``source(address)`` groups addresses)."""

    def __init__(
        self, limits: Limits = DEFAULT, source: Callable[[Hashable], Hashable] = lambda addr: addr
    ) -> None:
        self._partials: dict[Key, _Partial] = {}
        self._by_source: dict[Hashable, int] = {}
        self._source = source
        self.max_bytes = limits.udp_reassembly_bytes
        self.max_per_source = limits.udp_reassembly_bytes_per_source
        self.max_messages = limits.udp_reassembly_messages
        self.held = 0
        """Bytes charged for what is held now."""
        self._requests = 0
        """Messages held that are not replies to our requests, and the bytes charged for them."""
        self._requests_held = 0
        self.unsolicited = 0
        """Fragments dropped because no message they belong to was started, and none may start."""
        self._swept = float("-inf")
        self.dropped = 0
        """Fragments, headers and values dropped, for any reason."""
        self.dropped_budget = 0
        """Fragments and headers dropped because a budget (global, per source, table size) was full."""

    def __len__(self) -> int:
        return len(self._partials)

    def __contains__(self, key: Key) -> bool:
        return key in self._partials

    def header(self, key: Key, msg: Message, now: float, reply: bool = False) -> Message | None:
        """A message whose ``values`` are sizes; returns it completed if every fragment is already here.
        ``reply``: it answers a request we sent to that address."""
        p = self._partials.get(key)
        if p is not None and p.header is not None:
            return None  # a retransmitted header: the first one is being filled
        cost = SIZE_COST * len(msg.value_sizes)
        if p is None:
            p = self._start(key, now, cost, reply)
            if p is None:
                return None
        elif not self._charge(key, p, cost, now):
            return None
        p.header = msg
        p.last = now
        sizes = msg.value_sizes
        for index, value in list(p.values.items()):
            size = sizes[index] if index < len(sizes) else -1
            if size < 0 or size > MAX_SERIALISED_VALUE or any(end > size for end in value.ends):
                self._refund(p, value.cost())  # fragments of no announced value, or beyond its end
                del p.values[index]
                self.dropped += 1
        p.missing = sum(
            1
            for index, size in enumerate(sizes)
            if size <= MAX_SERIALISED_VALUE and self._received(p, index) < size
        )
        return self._complete(key, p) if not p.missing else None

    def fragment(self, key: Key, msg: Message, now: float, reply: bool = False) -> Message | None:
        """A ``p`` datagram; returns the completed message once its last fragment is in. Unless ``reply``
        (``t`` is a request we sent to that address), it only adds to a message whose header came first."""
        p = self._partials.get(key)
        if p is None:
            if not reply:
                self.unsolicited += 1
                self.dropped += 1
                return None
            p = self._start(key, now, 0, True)
            if p is None:
                return None
        p.last = now
        header = p.header
        for index, (offset, data) in msg.parts.items():
            end = offset + len(data)
            if header is None:
                limit = MAX_SERIALISED_VALUE
                if p.fragments >= MAX_EARLY_FRAGMENTS or p.early_bytes + len(data) > MAX_EARLY_BYTES:
                    self.dropped += 1
                    continue
            else:
                sizes = header.value_sizes
                limit = sizes[index] if index < len(sizes) else 0
                if limit > MAX_SERIALISED_VALUE:
                    limit = 0
            if not data or end > limit:
                self.dropped += 1
                continue
            value = p.values.get(index)
            if value is None:
                value = p.values[index] = _Value()
            elif header is not None and value.received >= limit:
                continue  # already whole: a retransmission
            elif len(value.starts) >= math.ceil(limit / MIN_FRAGMENT):
                self.dropped += 1  # too many small pieces for the value's size
                continue
            if not self._charge(key, p, len(data) + FRAGMENT_COST, now):
                if key not in self._partials:
                    return None  # swept as stale while making room
                continue
            if not value.add(offset, data):
                self._refund(p, len(data) + FRAGMENT_COST)
                continue
            p.fragments += 1
            if header is None:
                p.early_bytes += len(data)
            elif value.received == limit:
                p.missing -= 1
        if header is not None and not p.missing and key in self._partials:
            return self._complete(key, p)
        return None

    def expire(self, now: float) -> int:
        """Drop partial messages older than 10 s or idle for 3 s; returns how many."""
        stale = [k for k, p in self._partials.items() if now - p.started > MAX_AGE or now - p.last > MAX_IDLE]
        for k in stale:
            self._remove(k)
        self.dropped += len(stale)
        return len(stale)

    # -- budgets --------------------------------------------------------------------------------------------

    def _sweep(self, now: float) -> None:
        """Drop stale partial messages to make room (at most one sweep a second)."""
        if now - self._swept >= 1.0:
            self._swept = now
            self.expire(now)

    def _fits(self, source: Hashable, cost: int, reply: bool) -> bool:
        return (
            self.held + cost <= self.max_bytes
            and self._by_source.get(source, 0) + cost <= self.max_per_source
            and (reply or self._requests_held + cost <= self.max_bytes // 2)
        )

    def _room(self, reply: bool) -> bool:
        return len(self._partials) < self.max_messages and (reply or self._requests < self.max_messages // 2)

    def _start(self, key: Key, now: float, cost: int, reply: bool) -> _Partial | None:
        """A new partial message for ``key`` (None, counted, when the table or a budget is full)."""
        source = self._source(key[0])
        cost += PARTIAL_COST
        if not self._room(reply) or not self._fits(source, cost, reply):
            self._sweep(now)
            if not self._room(reply) or not self._fits(source, cost, reply):
                self.dropped += 1
                self.dropped_budget += 1
                return None
        p = self._partials[key] = _Partial(source, now, now, reply, cost=cost)
        self.held += cost
        self._by_source[source] = self._by_source.get(source, 0) + cost
        if not reply:
            self._requests += 1
            self._requests_held += cost
        return p

    def _charge(self, key: Key, p: _Partial, cost: int, now: float) -> bool:
        """Charge ``cost`` more to ``p`` if it fits (a sweep may make room, or remove ``p`` itself)."""
        if not self._fits(p.source, cost, p.reply):
            self._sweep(now)
            if not self._fits(p.source, cost, p.reply) or self._partials.get(key) is not p:
                self.dropped += 1
                self.dropped_budget += 1
                return False
        p.cost += cost
        self.held += cost
        self._by_source[p.source] += cost
        if not p.reply:
            self._requests_held += cost
        return True

    def _refund(self, p: _Partial, cost: int) -> None:
        p.cost -= cost
        self.held -= cost
        self._by_source[p.source] -= cost
        if not p.reply:
            self._requests_held -= cost

    def _remove(self, key: Key) -> None:
        p = self._partials.pop(key)
        self.held -= p.cost
        if not p.reply:
            self._requests -= 1
            self._requests_held -= p.cost
        left = self._by_source[p.source] - p.cost
        if left:
            self._by_source[p.source] = left
        else:
            del self._by_source[p.source]

    # -- completion -----------------------------------------------------------------------------------------

    @staticmethod
    def _received(p: _Partial, index: int) -> int:
        value = p.values.get(index)
        return value.received if value is not None else 0

    def _complete(self, key: Key, p: _Partial) -> Message:
        assert p.header is not None
        self._remove(key)
        msg = p.header
        msg.values = []
        for index, size in enumerate(msg.value_sizes):
            if size > MAX_SERIALISED_VALUE:
                continue
            value = p.values.get(index)
            try:
                msg.values.append(Value.unpack(b"".join(value.data) if value is not None else b""))
            except InvalidValue:
                self.dropped += 1
        msg.value_sizes = []
        return msg
