"""Local listens (what ``node.listen`` and ``node.add_listener`` open), sans-IO.

Every listener of a key shares one :class:`KeyListen`: one value cache, one set of remote listen targets (the
closest synced nodes, each with its ``sid`` and token) and one refresh schedule. The :class:`LocalListens`
keeps them with two heaps, one of refresh times and one of value expirations, so the listen driver
(``node.listen_driver``) keeps any number of listens with two tasks: no task per listen, no timer per value.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from trio_dht.api import ValueEvent
from trio_dht.infohash import InfoHash
from trio_dht.node.routing import Node
from trio_dht.value import Query, Value

Socket = tuple[InfoHash, int]
"""A remote listen, named as the storing node knows it: (its node id, our ``sid``)."""


@dataclass(eq=False, slots=True)
class Listener:
    """One local listener; :meth:`cancel` stops it (idempotent)."""

    key: InfoHash
    query: Query | None
    callback: Callable[[ValueEvent], None]
    _registry: LocalListens | None = field(default=None, repr=False)

    def wants(self, value: Value) -> bool:
        return self.query is None or self.query.matches(value)

    def cancel(self) -> None:
        registry, self._registry = self._registry, None
        if registry is not None:
            registry.remove(self)


@dataclass(eq=False, slots=True)
class ListenTarget:
    """A storing node we keep a listen open on."""

    node: Node
    sid: int
    token: bytes
    v6: bool


@dataclass(eq=False, slots=True)
class KeyListen:
    """What every listener of one key shares."""

    key: InfoHash
    listeners: list[Listener] = field(default_factory=list)
    values: dict[int, tuple[Value, float]] = field(default_factory=dict)
    targets: dict[Socket, ListenTarget] = field(default_factory=dict)
    searched: dict[bool, tuple[float, int]] = field(default_factory=dict)
    """Per family, when the storing nodes were last looked for, and how many nodes the routing table knew."""
    scheduled: bool = False
    retry: float = 0.0
    """Delay before the next attempt while no node holds the listen (0 while one does)."""

    def _emit(self, event: ValueEvent) -> None:
        for listener in list(self.listeners):
            if listener.wants(event.value):
                listener.callback(event)


class LocalListens:
    """All local listens of a node."""

    def __init__(self, screen: Callable[[Value], Value | None] = lambda value: value) -> None:
        self._screen = screen
        """What listeners are handed of a value (decrypted, or None to drop a badly signed one)."""
        self.by_key: dict[InfoHash, KeyListen] = {}
        self.by_socket: dict[Socket, KeyListen] = {}
        self._due: list[tuple[float, int, InfoHash]] = []
        self._expiries: list[tuple[float, int, InfoHash, int]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self.by_key)

    # -- listeners ------------------------------------------------------------------------------------------

    def add(self, key: InfoHash, query: Query | None, callback: Callable[[ValueEvent], None]) -> Listener:
        """Register a listener; the values already cached for its key are delivered to it at once."""
        kl = self.by_key.get(key)
        if kl is None:
            kl = self.by_key[key] = KeyListen(key)
        listener = Listener(key, query, callback, self)
        kl.listeners.append(listener)
        for value, _ in list(kl.values.values()):
            if listener.wants(value):
                callback(ValueEvent(value))
        return listener

    def remove(self, listener: Listener) -> None:
        kl = self.by_key.get(listener.key)
        if kl is None or listener not in kl.listeners:
            return
        kl.listeners.remove(listener)
        if not kl.listeners:
            del self.by_key[kl.key]
            for sock in kl.targets:
                self.by_socket.pop(sock, None)
            kl.targets.clear()

    # -- values ---------------------------------------------------------------------------------------------

    def deliver(self, key: InfoHash, value: Value, expires: float) -> None:
        """A value seen under ``key``: listeners hear of it if it is new or changed."""
        kl = self.by_key.get(key)
        if kl is None:
            return
        if value.cypher or value.signature:
            screened = self._screen(value)
            if screened is None:
                return
            value = screened
        old = kl.values.get(value.id)
        kl.values[value.id] = (value, max(expires, old[1]) if old is not None else expires)
        heapq.heappush(self._expiries, (kl.values[value.id][1], next(self._seq), key, value.id))
        if old is None or not old[0].same_content(value):
            kl._emit(ValueEvent(value))

    def refresh(self, key: InfoHash, vid: int, expires: float) -> None:
        kl = self.by_key.get(key)
        if kl is not None and vid in kl.values:
            value, old = kl.values[vid]
            if expires > old:
                kl.values[vid] = (value, expires)
                heapq.heappush(self._expiries, (expires, next(self._seq), key, vid))

    def expire(self, key: InfoHash, vid: int) -> None:
        kl = self.by_key.get(key)
        if kl is not None:
            old = kl.values.pop(vid, None)
            if old is not None:
                kl._emit(ValueEvent(old[0], expired=True))

    def expire_due(self, now: float) -> None:
        """Expire cached values whose lifetime passed without a refresh."""
        heap = self._expiries
        while heap and heap[0][0] <= now:
            at, _, key, vid = heapq.heappop(heap)
            kl = self.by_key.get(key)
            if kl is not None and vid in kl.values and kl.values[vid][1] == at:
                self.expire(key, vid)

    # -- remote listen schedule -----------------------------------------------------------------------------

    def schedule(self, kl: KeyListen, at: float) -> None:
        kl.scheduled = True
        heapq.heappush(self._due, (at, next(self._seq), kl.key))

    def pop_due(self, now: float) -> list[KeyListen]:
        """Listens whose remote side is due for a refresh (each is unscheduled until rescheduled)."""
        out = []
        while self._due and self._due[0][0] <= now:
            _, _, key = heapq.heappop(self._due)
            kl = self.by_key.get(key)
            if kl is not None and kl.scheduled:
                kl.scheduled = False
                out.append(kl)
        return out

    def next_wake(self) -> float:
        due = self._due[0][0] if self._due else math.inf
        exp = self._expiries[0][0] if self._expiries else math.inf
        return min(due, exp)

    def is_live(self, kl: KeyListen) -> bool:
        """Whether ``kl`` is its key's listen: not ended, nor ended and replaced by a new listen of the key
        (whose refreshes are its own)."""
        return self.by_key.get(kl.key) is kl

    def set_targets(self, kl: KeyListen, v6: bool, targets: list[ListenTarget]) -> None:
        """Replace the family's targets (sockets of nodes kept keep their ``sid``)."""
        for sock, t in list(kl.targets.items()):
            if t.v6 == v6:
                del kl.targets[sock]
                self.by_socket.pop(sock, None)
        if not self.is_live(kl):
            return  # ended while searching
        for t in targets:
            sock = (t.node.id, t.sid)
            kl.targets[sock] = t
            self.by_socket[sock] = kl

    def drop_target(self, kl: KeyListen, sock: Socket) -> None:
        kl.targets.pop(sock, None)
        self.by_socket.pop(sock, None)
