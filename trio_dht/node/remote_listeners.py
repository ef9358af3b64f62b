"""Remote listeners: the nodes that sent us ``listen`` (the storing side of a listen).

Sans-IO. A listener is keyed by (node id, ``sid``) under a key. A new one gets the stored matching values
pushed at once (the caller does that when :meth:`ListenerBook.listen` returns True); a known one only has its
timer refreshed and its query replaced. Listeners not refreshed for 10 minutes are dropped by
:meth:`ListenerBook.expire`. The node's own listens of keys stored elsewhere are ``node.local_listens``.

The book is bounded: at most ``Limits.udp_listeners`` listeners in all and ``Limits.udp_listeners_per_source``
per source (IPv4 address, IPv6 /64, loopback address and port). A new listener past either raises
:class:`TooManyListeners` (counted in :attr:`ListenerBook.refused`), and so does a known one moving to a
source that is full (it keeps its old address); known ones are otherwise refreshed, and every slot comes
back when its listener expires."""

from __future__ import annotations

from dataclasses import dataclass

from trio_dht.infohash import InfoHash
from trio_dht.limits import DEFAULT, Limits
from trio_dht.node.ratelimit import source_key
from trio_dht.value import Query, Value

LISTENER_EXPIRE_TIME = 10 * 60.0
"""A listener without a ``listen`` for this long is dropped (OpenDHT's ``NODE_EXPIRE_TIME``)."""


class TooManyListeners(Exception):
    """A new listener past the book's total or per-source bound."""


@dataclass(slots=True)
class RemoteListener:
    """A remote node listening on ``key`` through its socket ``sid``, reached at ``addr``."""

    key: InfoHash
    node_id: bytes
    sid: int
    addr: tuple[str, int]
    query: Query | None
    last_refresh: float

    def wants(self, value: Value) -> bool:
        """Whether a new or edited value is pushed to this listener (its Where; its Select is ignored)."""
        return self.query is None or self.query.matches(value)


class ListenerBook:
    """Remote listeners per key, with an index by node id for :meth:`remove_node`."""

    def __init__(self, limits: Limits = DEFAULT) -> None:
        self._by_key: dict[InfoHash, dict[tuple[bytes, int], RemoteListener]] = {}
        self._by_node: dict[bytes, set[tuple[InfoHash, int]]] = {}
        self._by_source: dict[object, int] = {}
        self._count = 0
        self._max_total = limits.udp_listeners
        self._max_per_source = limits.udp_listeners_per_source
        self.refused = 0

    def listen(
        self,
        key: InfoHash,
        node_id: bytes,
        sid: int,
        addr: tuple[str, int],
        query: Query | None,
        now: float,
    ) -> bool:
        """Record a ``listen``. True for a new (node, sid) on this key: push the current values to it.

        A known one gets its timer refreshed, its query replaced and its address updated. A new one past the
        bounds, or a known one moving to a source at its bound, raises :class:`TooManyListeners`.
        """
        listeners = self._by_key.get(key)
        known = listeners.get((node_id, sid)) if listeners is not None else None
        if known is not None:
            if known.addr != addr:
                source = source_key(addr)
                if source != source_key(known.addr):
                    held = self._by_source.get(source, 0)
                    if held >= self._max_per_source:
                        self.refused += 1
                        raise TooManyListeners(f"{held} listeners from this source")
                    self._uncount(known.addr)
                    self._by_source[source] = held + 1
                known.addr = addr
            known.query = query
            known.last_refresh = now
            return False
        source = source_key(addr)
        held = self._by_source.get(source, 0)
        if self._count >= self._max_total or held >= self._max_per_source:
            self.refused += 1
            raise TooManyListeners(f"{held} listeners from this source, {self._count} in all")
        if listeners is None:
            listeners = self._by_key[key] = {}
        listeners[(node_id, sid)] = RemoteListener(key, node_id, sid, addr, query, now)
        self._by_node.setdefault(node_id, set()).add((key, sid))
        self._by_source[source] = held + 1
        self._count += 1
        return True

    def _uncount(self, addr: tuple[str, int]) -> None:
        source = source_key(addr)
        left = self._by_source[source] - 1
        if left:
            self._by_source[source] = left
        else:
            del self._by_source[source]

    def get(self, key: InfoHash, node_id: bytes, sid: int) -> RemoteListener | None:
        listeners = self._by_key.get(key)
        return listeners.get((node_id, sid)) if listeners is not None else None

    def listeners(self, key: InfoHash) -> list[RemoteListener]:
        """Every listener of ``key`` (a copy)."""
        listeners = self._by_key.get(key)
        return list(listeners.values()) if listeners else []

    def for_key(self, key: InfoHash) -> list[RemoteListener]:
        """Where ``re`` and ``exp`` pushes go: every listener of ``key``, whatever its Where."""
        return self.listeners(key)

    def for_new_value(self, key: InfoHash, value: Value) -> list[RemoteListener]:
        """Where a new or edited value is pushed: the listeners of ``key`` whose Where matches it."""
        listeners = self._by_key.get(key)
        if not listeners:
            return []
        return [listener for listener in listeners.values() if listener.wants(value)]

    def keys(self) -> list[InfoHash]:
        """Keys with at least one listener (a copy)."""
        return list(self._by_key)

    def remove(self, key: InfoHash, node_id: bytes, sid: int) -> bool:
        """Drop one listener; False if unknown."""
        listeners = self._by_key.get(key)
        if listeners is None or (node_id, sid) not in listeners:
            return False
        self._drop(listeners, key, node_id, sid)
        return True

    def remove_node(self, node_id: bytes) -> int:
        """Drop every listener of a node (it was found expired); returns how many."""
        entries = self._by_node.pop(node_id, None)
        if not entries:
            return 0
        for key, sid in entries:
            listeners = self._by_key[key]
            self._uncount(listeners.pop((node_id, sid)).addr)
            if not listeners:
                del self._by_key[key]
        self._count -= len(entries)
        return len(entries)

    def expire(self, now: float, max_age: float = LISTENER_EXPIRE_TIME) -> int:
        """Drop the listeners whose last ``listen`` is more than ``max_age`` seconds old; returns how many."""
        stale = [
            (listeners, key, listener.node_id, listener.sid)
            for key, listeners in self._by_key.items()
            for listener in listeners.values()
            if now - listener.last_refresh > max_age
        ]
        for listeners, key, node_id, sid in stale:
            self._drop(listeners, key, node_id, sid)
        return len(stale)

    def count(self) -> int:
        """Number of listeners, all keys together."""
        return self._count

    def __len__(self) -> int:
        return self._count

    def _drop(
        self, listeners: dict[tuple[bytes, int], RemoteListener], key: InfoHash, node_id: bytes, sid: int
    ) -> None:
        self._uncount(listeners.pop((node_id, sid)).addr)
        if not listeners:
            del self._by_key[key]
        entries = self._by_node[node_id]
        entries.discard((key, sid))
        if not entries:
            del self._by_node[node_id]
        self._count -= 1
