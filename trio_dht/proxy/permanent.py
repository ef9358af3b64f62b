"""Permanent puts held by the proxy (sans-IO): 24 h lifetimes, refresh warnings at 22 h, and OpenDHT's merge
rule.

A permanent put is re-announced by the node until the proxy cancels it when its lifetime lapses; the client
keeps it alive by re-POSTing (at 22 h, or when told to by a ``timeout``/``vid`` push). A POST *without* an id
whose content, push token and client id match a held put just renews that put (spec §2.7).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Protocol

from trio_dht.infohash import InfoHash
from trio_dht.proxy.value_json import PushTarget
from trio_dht.value import Value, random_value_id

LIFETIME = 24 * 3600.0
"""OpenDHT's ``OP_TIMEOUT``."""
REFRESH_MARGIN = 2 * 3600.0
"""OpenDHT's ``OP_MARGIN``: the refresh push goes out this long before the lifetime ends."""


@dataclass(slots=True)
class PermanentPut:
    """One held put. ``push`` (if any) is whom to warn at ``refresh_at``."""

    key: InfoHash
    value: Value
    expires_at: float
    push: PushTarget | None = None
    refresh_at: float | None = None


class PutJournal(Protocol):
    """Where held puts are written as they change (``-f/--persist``), to survive a restart."""

    def saved(self, held: PermanentPut) -> None: ...

    def removed(self, key: InfoHash, value_id: int) -> None: ...

    def load(self) -> list[PermanentPut]:
        """The puts written before a restart and still alive."""
        ...


class PermanentPuts:
    """The held permanent puts, by key then value id, with their two deadlines on one heap."""

    def __init__(self, journal: PutJournal | None = None) -> None:
        self.journal = journal
        self._puts: dict[InfoHash, dict[int, PermanentPut]] = {}
        self._heap: list[tuple[float, int, InfoHash, int]] = []
        self._seq = itertools.count()

    @property
    def key_count(self) -> int:
        """Keys holding at least one permanent put (``putCount``)."""
        return len(self._puts)

    @property
    def total(self) -> int:
        """All held puts (``totalPermanentPuts``)."""
        return sum(len(by_id) for by_id in self._puts.values())

    def get(self, key: InfoHash, value_id: int) -> PermanentPut | None:
        return self._puts.get(key, {}).get(value_id)

    def find_same(self, key: InfoHash, value: Value, push: PushTarget | None) -> PermanentPut | None:
        """A held put on ``key`` with the same content, push token and client id, for an id-less POST."""
        token = push.token if push else ""
        client_id = push.client_id if push else ""
        for held in self._puts.get(key, {}).values():
            held_token = held.push.token if held.push else ""
            held_client = held.push.client_id if held.push else ""
            if held_token == token and held_client == client_id and held.value.same_content(value):
                return held
        return None

    def renew(self, held: PermanentPut, push: PushTarget | None, now: float) -> None:
        """Merge path: re-arm the lifetime and take a non-empty new session id (the refresh time is kept, as
        OpenDHT does).
        """
        held.expires_at = now + LIFETIME
        self._schedule(held.expires_at, held)
        if push and push.session_id and held.push:
            held.push = _with_session(held.push, push.session_id)
        if self.journal is not None:
            self.journal.saved(held)

    def record(self, key: InfoHash, value: Value, push: PushTarget | None, now: float) -> PermanentPut:
        """Hold (or re-hold) ``value`` for 24 h, giving it a random id if it has none."""
        if not value.id:
            value.id = random_value_id()
        by_id = self._puts.setdefault(key, {})
        held = by_id.get(value.id)
        if held is None:
            held = by_id[value.id] = PermanentPut(key, value, now + LIFETIME, push)
        else:
            held.value = value
            held.expires_at = now + LIFETIME
            if push and push.session_id and held.push:
                held.push = _with_session(held.push, push.session_id)
        self._schedule(held.expires_at, held)
        if held.push is not None:
            held.refresh_at = now + LIFETIME - REFRESH_MARGIN
            self._schedule(held.refresh_at, held)
        if self.journal is not None:
            self.journal.saved(held)
        return held

    def restore(self, held: PermanentPut) -> None:
        """Hold a put read back from the journal, with its deadlines as they were (not written again)."""
        self._puts.setdefault(held.key, {})[held.value.id] = held
        self._schedule(held.expires_at, held)
        if held.refresh_at is not None:
            self._schedule(held.refresh_at, held)

    def remove(self, key: InfoHash, value_id: int) -> PermanentPut | None:
        by_id = self._puts.get(key)
        held = by_id.pop(value_id, None) if by_id else None
        if by_id is not None and not by_id:
            del self._puts[key]
        if held is not None and self.journal is not None:
            self.journal.removed(key, value_id)
        return held

    def all(self) -> list[PermanentPut]:
        return [held for by_id in self._puts.values() for held in by_id.values()]

    def next_deadline(self) -> float | None:
        """When :meth:`due` next has something to return (maybe earlier: stale heap entries are skipped
        then).
        """
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> tuple[list[PermanentPut], list[PermanentPut]]:
        """``(expired, to_warn)``: puts whose lifetime ended (now forgotten: cancel them on the node) and puts
        whose refresh warning is due.
        """
        expired: list[PermanentPut] = []
        warn: list[PermanentPut] = []
        while self._heap and self._heap[0][0] <= now:
            when, _, key, vid = heapq.heappop(self._heap)
            held = self.get(key, vid)
            if held is None:
                continue
            if held.expires_at == when:
                self.remove(key, vid)
                expired.append(held)
            elif held.refresh_at == when:
                held.refresh_at = None
                warn.append(held)
        return expired, warn

    def _schedule(self, when: float, held: PermanentPut) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), held.key, held.value.id))
        if len(self._heap) > 64 + 4 * self.total:  # renewals leave stale entries behind: compact
            live = []
            for by_id in self._puts.values():
                for p in by_id.values():
                    live.append((p.expires_at, next(self._seq), p.key, p.value.id))
                    if p.refresh_at is not None:
                        live.append((p.refresh_at, next(self._seq), p.key, p.value.id))
            heapq.heapify(live)
            self._heap = live


def _with_session(push: PushTarget, session_id: str) -> PushTarget:
    return PushTarget(push.token, push.client_id, push.platform, session_id, push.topic)
