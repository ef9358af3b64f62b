"""Reassembly of fragmented values (a header announcing sizes, then ``p`` fragments), sans-IO.

Keyed by (source address, ``t``) as OpenDHT 4.3+. Fragments may arrive in any order, even before their header
(buffered within limits); overlapping fragments and values over the size limit are refused.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from trio_dht.value import MAX_VALUE_SIZE, InvalidValue, Value
from trio_dht.wire.message import Message

MAX_SERIALISED_VALUE = MAX_VALUE_SIZE + 32
MAX_AGE = 10.0
MAX_IDLE = 3.0
MAX_EARLY_BYTES = 120 * 1024
MAX_EARLY_FRAGMENTS = 100
MAX_PARTIALS = 4096


@dataclass(slots=True)
class _Partial:
    started: float
    last: float
    header: Message | None = None
    buffers: dict[int, bytearray] = field(default_factory=dict)
    received: dict[int, int] = field(default_factory=dict)
    spans: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    early: list[tuple[int, int, bytes]] = field(default_factory=list)
    early_bytes: int = 0


class Reassembler:
    """Collects fragmented messages until every value is whole."""

    def __init__(self) -> None:
        self._partials: dict[Hashable, _Partial] = {}
        self._swept = float("-inf")
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._partials)

    def header(self, key: Hashable, msg: Message, now: float) -> Message | None:
        """A message whose ``values`` are sizes; returns it completed if every fragment is already here."""
        p = self._partial(key, now)
        if p is None:
            return None
        if p.header is not None:
            return None  # a retransmitted header: the first one is being filled
        p.header = msg
        for index, size in enumerate(msg.value_sizes):
            if size <= MAX_SERIALISED_VALUE:
                p.buffers[index] = bytearray(size)
                p.received[index] = 0
                p.spans[index] = []
        early, p.early = p.early, []
        for index, offset, data in early:
            self._add(p, index, offset, data)
        return self._complete(key, p)

    def fragment(self, key: Hashable, msg: Message, now: float) -> Message | None:
        """A ``p`` datagram; returns the completed message once its last fragment is in."""
        p = self._partial(key, now)
        if p is None:
            return None
        p.last = now
        for index, (offset, data) in msg.parts.items():
            if p.header is None:
                if len(p.early) >= MAX_EARLY_FRAGMENTS or p.early_bytes + len(data) > MAX_EARLY_BYTES:
                    self.dropped += 1
                    continue
                p.early.append((index, offset, data))
                p.early_bytes += len(data)
            else:
                self._add(p, index, offset, data)
        return self._complete(key, p) if p.header is not None else None

    def _room(self, now: float) -> bool:
        """Room for one more partial message; when full, drop stale ones (at most one sweep a second)."""
        if len(self._partials) < MAX_PARTIALS:
            return True
        if now - self._swept >= 1.0:
            self._swept = now
            self.expire(now)
        return len(self._partials) < MAX_PARTIALS

    def _partial(self, key: Hashable, now: float) -> _Partial | None:
        """The partial message for ``key``, started now if new (None when the table is full)."""
        p = self._partials.get(key)
        if p is None:
            if not self._room(now):
                self.dropped += 1
                return None
            p = self._partials[key] = _Partial(started=now, last=now)
        return p

    def _add(self, p: _Partial, index: int, offset: int, data: bytes) -> None:
        buf = p.buffers.get(index)
        if buf is None or offset + len(data) > len(buf) or not data:
            self.dropped += 1
            return
        end = offset + len(data)
        spans = p.spans[index]
        if any(offset < e and s < end for s, e in spans):
            return  # overlap (or a duplicate from a retransmission)
        spans.append((offset, end))
        buf[offset:end] = data
        p.received[index] += len(data)

    def _complete(self, key: Hashable, p: _Partial) -> Message | None:
        assert p.header is not None
        if any(p.received[i] < len(b) for i, b in p.buffers.items()):
            return None
        del self._partials[key]
        msg = p.header
        msg.values = []
        for index in sorted(p.buffers):
            try:
                msg.values.append(Value.unpack(bytes(p.buffers[index])))
            except InvalidValue:
                self.dropped += 1
        msg.value_sizes = []
        return msg

    def expire(self, now: float) -> int:
        """Drop partial messages older than 10 s or idle for 3 s; returns how many."""
        stale = [k for k, p in self._partials.items() if now - p.started > MAX_AGE or now - p.last > MAX_IDLE]
        for k in stale:
            del self._partials[k]
        self.dropped += len(stale)
        return len(stale)
