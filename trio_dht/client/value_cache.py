"""What a listener has seen of one key (sans-IO): which values are real changes, and which are repeats.

A listen may learn the same value several times: a LISTEN stream restarted after a drop replays every
current value, a push wake-up GETs them all again, a SUBSCRIBE reply may stream them. :class:`ValueCache`
turns each of these into the events a listener must see, exactly once each: a value never seen, an edit
(same id, new content, a ``seq`` not older), an expiration of a value it holds.

Timestamps (OpenDHT's): a push carries ``t``, the proxy's send time in ms. Each held value remembers the
newest ``t`` that confirmed it, so a late, older push cannot expire a value a newer one confirmed. Updates
without a ``t`` (a stream line, a GET of our own) are stamped with the newest ``t`` seen so far.

Resync (after a LISTEN stream restart): :meth:`begin_resync` marks every held value unconfirmed; each value
seen afterwards (on the new stream, or in a GET) is confirmed; :meth:`end_resync` expires the others, which
vanished while the stream was down.
"""

from __future__ import annotations

from collections.abc import Iterable

from trio_dht.api import ValueEvent
from trio_dht.value import Value


class _Held:
    __slots__ = ("t", "value")

    def __init__(self, value: Value, t: int) -> None:
        self.value = value
        self.t = t


class ValueCache:
    """The values of one key a listener holds, by id."""

    def __init__(self) -> None:
        self._held: dict[int, _Held] = {}
        self._newest_t = -1
        self._unconfirmed: set[int] | None = None

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, value_id: int) -> bool:
        return value_id in self._held

    def values(self) -> list[Value]:
        return [held.value for held in self._held.values()]

    def _stamp(self, t: int | None) -> int:
        if t is None:
            return self._newest_t
        self._newest_t = max(self._newest_t, t)
        return t

    def _confirm(self, value_id: int) -> None:
        if self._unconfirmed is not None:
            self._unconfirmed.discard(value_id)

    def update(self, value: Value, t: int | None = None) -> ValueEvent | None:
        """Take ``value`` in; the event to deliver if it is new or an edit, else None."""
        stamp = self._stamp(t)
        self._confirm(value.id)
        held = self._held.get(value.id)
        if held is None:
            self._held[value.id] = _Held(value, stamp)
            return ValueEvent(value)
        if held.value.same_content(value):
            held.t = max(held.t, stamp)
            return None
        if value.seq < held.value.seq or held.t > stamp:
            return None  # an older edit, or news older than what we hold
        held.value, held.t = value, stamp
        return ValueEvent(value)

    def expire(self, value_id: int, t: int | None = None) -> ValueEvent | None:
        """Forget ``value_id``; its expiration event, or None if not held or confirmed after ``t``."""
        stamp = self._stamp(t)
        held = self._held.get(value_id)
        if held is None or held.t > stamp:
            return None
        del self._held[value_id]
        self._confirm(value_id)
        return ValueEvent(held.value, expired=True)

    def apply(self, event: ValueEvent, t: int | None = None) -> ValueEvent | None:
        """A LISTEN stream event: :meth:`update` or :meth:`expire`."""
        if event.expired:
            return self.expire(event.value.id, t)
        return self.update(event.value, t)

    def expire_ids(self, value_ids: Iterable[int], t: int | None = None) -> list[ValueEvent]:
        """Expire these ids (an ``exp`` push)."""
        return [ev for vid in value_ids if (ev := self.expire(vid, t)) is not None]

    def reconcile(self, snapshot: Iterable[Value], t: int | None = None) -> list[ValueEvent]:
        """Take a full listing of the key (a GET): new and edited values, then expirations of the missing."""
        stamp = self._stamp(t)
        events: list[ValueEvent] = []
        seen: set[int] = set()
        for value in snapshot:
            seen.add(value.id)
            if (event := self.update(value, stamp)) is not None:
                events.append(event)
        missing = [vid for vid in self._held if vid not in seen]
        events.extend(self.expire_ids(missing, stamp))
        return events

    def begin_resync(self) -> None:
        """Start a resync: every held value is unconfirmed until seen again."""
        self._unconfirmed = set(self._held)

    def end_resync(self) -> list[ValueEvent]:
        """End a resync: expirations of the values not seen since :meth:`begin_resync`."""
        unconfirmed, self._unconfirmed = self._unconfirmed or set(), None
        return self.expire_ids(sorted(unconfirmed))
