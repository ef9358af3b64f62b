"""Permanent puts held by the proxy (sans-IO): 24 h lifetimes, refresh warnings at 22 h, and OpenDHT's merge
rule.

A permanent put is re-announced by the node until the proxy cancels it when its lifetime lapses; the client
keeps it alive by re-POSTing (at 22 h, or when told to by a ``timeout``/``vid`` push). A POST *without* an id
whose content, push token and client id match a held put just renews that put.

Each put belongs to the source (client address bucket) that first made it. A source holds at most
``per_source`` puts, whose values weigh at most ``bytes_per_source`` (their packed size): a new put beyond,
or a re-POST that would weigh more, is refused with :class:`TooManyPuts` (status 429; a renewal or a
re-POST of a held id is not a new put). The values held weigh at most ``max_bytes`` in all: a put that
would weigh more is refused with :class:`TooManyPuts` (status 503).

With a journal, every change is written first: if the write fails (the journal raises), the held puts stay
as they were.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from trio_dht.infohash import InfoHash
from trio_dht.limits import DEFAULT as DEFAULT_LIMITS
from trio_dht.rest.value_json import PERMANENT_PUT_LIFETIME as LIFETIME
from trio_dht.rest.value_json import PERMANENT_PUT_REFRESH_MARGIN as REFRESH_MARGIN
from trio_dht.rest.value_json import PushTarget
from trio_dht.value import Value, random_value_id


@dataclass(slots=True)
class PermanentPut:
    """One held put. ``push`` (if any) is whom to warn at ``refresh_at``; ``source`` made it."""

    key: InfoHash
    value: Value
    expires_at: float
    push: PushTarget | None = None
    refresh_at: float | None = None
    source: str = ""


class TooManyPuts(Exception):
    """A permanent put refused by a limit: ``status`` 429 (its source holds its share already) or 503 (the
    proxy holds its bytes already); ``message`` says which."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class PutJournal(Protocol):
    """Where held puts are written as they change (``-f/--persist``), to survive a restart."""

    def saved(self, held: PermanentPut) -> None:
        """Write ``held`` (as it is about to be held); raise :class:`~trio_dht.persist.PersistError` if it
        cannot be written."""
        ...

    def removed(self, key: InfoHash, value_id: int) -> None:
        """Forget a put that lapsed (a failure is the journal's to log: a lapsed row is dropped on load)."""
        ...

    def load(self) -> list[PermanentPut]:
        """The puts written before a restart and still alive."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters of the journal's file, for ``/node/stats`` (``stateFile``)."""
        ...


class PermanentPuts:
    """The held permanent puts, by key then value id, with their two deadlines on one heap."""

    def __init__(
        self,
        journal: PutJournal | None = None,
        *,
        per_source: int = DEFAULT_LIMITS.permanent_puts_per_source,
        bytes_per_source: int = DEFAULT_LIMITS.permanent_puts_bytes_per_source,
        max_bytes: int = DEFAULT_LIMITS.permanent_puts_bytes,
    ) -> None:
        self.journal = journal
        self.per_source = per_source
        self._puts: dict[InfoHash, dict[int, PermanentPut]] = {}
        self._heap: list[tuple[float, int, InfoHash, int]] = []
        self._seq = itertools.count()
        self._by_source: Counter[str] = Counter()
        self._total = 0
        self.bytes_per_source = bytes_per_source
        self._bytes_by_source: Counter[str] = Counter()
        self.refused = 0
        """Puts refused because their source held ``per_source`` puts or ``bytes_per_source`` already."""
        self.max_bytes = max_bytes
        self.bytes = 0
        """Packed size of the values held."""
        self.refused_full = 0
        """Puts refused because the values held would weigh more than ``max_bytes``."""

    @property
    def key_count(self) -> int:
        """Keys holding at least one permanent put (``putCount``)."""
        return len(self._puts)

    @property
    def total(self) -> int:
        """All held puts (``totalPermanentPuts``)."""
        return self._total

    @property
    def source_count(self) -> int:
        """Sources holding at least one put."""
        return len(self._by_source)

    def held_by(self, source: str) -> int:
        """Puts held for ``source``."""
        return self._by_source.get(source, 0)

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
        changed = dataclasses.replace(held, expires_at=now + LIFETIME, push=_merged(held.push, push))
        if self.journal is not None:
            self.journal.saved(changed)
        held.expires_at, held.push = changed.expires_at, changed.push
        self._schedule(held.expires_at, held)

    def record(
        self, key: InfoHash, value: Value, push: PushTarget | None, now: float, source: str = ""
    ) -> PermanentPut:
        """Hold (or re-hold) ``value`` for 24 h, giving it a random id if it has none.

        Raises :class:`TooManyPuts` (and holds nothing) if the put is new and ``source`` (``""``: unknown,
        never refused) holds ``per_source`` puts already, if the values of its source (the one that made it)
        would weigh more than ``bytes_per_source``, or all values more than ``max_bytes``; the journal's error
        if it cannot write the put.
        """
        if not value.id:
            value.id = random_value_id()
        held = self.get(key, value.id)
        if held is None:
            if source and self._by_source[source] >= self.per_source:
                self.refused += 1
                raise TooManyPuts(429, "Too many permanent puts from this address")
            changed = PermanentPut(key, value, now + LIFETIME, push, source=source)
        else:
            changed = dataclasses.replace(
                held, value=value, expires_at=now + LIFETIME, push=_merged(held.push, push)
            )
        if changed.push is not None:
            changed.refresh_at = now + LIFETIME - REFRESH_MARGIN
        grows = len(value.packed()) - (0 if held is None else len(held.value.packed()))
        owner = changed.source
        if grows > 0 and owner and self._bytes_by_source[owner] + grows > self.bytes_per_source:
            self.refused += 1
            raise TooManyPuts(429, "Too many permanent puts from this address")
        if grows > 0 and self.bytes + grows > self.max_bytes:
            self.refused_full += 1
            raise TooManyPuts(503, "Too many permanent puts on this proxy")
        if self.journal is not None:
            self.journal.saved(changed)
        if held is None:
            held = changed
            self._hold(held)
        else:
            self.bytes += grows
            self._bytes_by_source[held.source] += grows
            held.value, held.expires_at, held.push = changed.value, changed.expires_at, changed.push
            held.refresh_at = changed.refresh_at
        self._schedule(held.expires_at, held)
        if held.refresh_at is not None:
            self._schedule(held.refresh_at, held)
        return held

    def restore(self, held: PermanentPut) -> None:
        """Hold a put read back from the journal, with its deadlines as they were (not written again)."""
        self._hold(held)
        self._schedule(held.expires_at, held)
        if held.refresh_at is not None:
            self._schedule(held.refresh_at, held)

    def remove(self, key: InfoHash, value_id: int) -> PermanentPut | None:
        by_id = self._puts.get(key)
        held = by_id.pop(value_id, None) if by_id else None
        if by_id is not None and not by_id:
            del self._puts[key]
        if held is not None:
            self._release(held)
            if self.journal is not None:
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

    def _hold(self, held: PermanentPut) -> None:
        by_id = self._puts.setdefault(held.key, {})
        replaced = by_id.get(held.value.id)
        if replaced is not None:
            self._release(replaced)
        by_id[held.value.id] = held
        self._total += 1
        self._by_source[held.source] += 1
        self.bytes += len(held.value.packed())
        self._bytes_by_source[held.source] += len(held.value.packed())

    def _release(self, held: PermanentPut) -> None:
        self._total -= 1
        self._by_source[held.source] -= 1
        if not self._by_source[held.source]:
            del self._by_source[held.source]
            del self._bytes_by_source[held.source]
        else:
            self._bytes_by_source[held.source] -= len(held.value.packed())
        self.bytes -= len(held.value.packed())

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


def _merged(held: PushTarget | None, push: PushTarget | None) -> PushTarget | None:
    """A held put's push target after a re-POST: with the re-POST's session id, if it has one (as OpenDHT)."""
    if held is None or push is None or not push.session_id:
        return held
    return PushTarget(held.token, held.client_id, held.platform, push.session_id, held.topic)
