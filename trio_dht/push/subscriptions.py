"""The subscription book (sans-IO): who is subscribed to which key, until when, and what to push.

Identity. A current-dialect subscription is identified, as in OpenDHT, by (device token, key, client_id); a
seed-dialect one by (device token, key, callback_id). Each also has a random 63-bit ``sid``: the seed
dialect's ``token`` reply, the dispatcher's coalescing slot and the persistence row id.

Life of a subscription (explicit states, one transition per event)::

    subscribe ──► ACTIVE ──(deadline - margin)──► TIMEOUT_PUSH_SENT ──(deadline)──► EXPIRED
                    ▲  ▲                               │
                    │  └────────── refreshed ──────────┘        (any state) ──unsubscribe──► UNSUBSCRIBED
                    └─ refreshed (deadline moves)                (any state) ──token gone──► UNSUBSCRIBED

A SUBSCRIBE is two steps, so that a caller can write the change to disk before memory changes:
:meth:`SubscriptionBook.prepare` checks it and builds the subscription as it will be (nothing changes), and
:meth:`SubscriptionBook.commit` applies it (:meth:`SubscriptionBook.subscribe` does both).

A refresh (any SUBSCRIBE of an existing identity, as OpenDHT) moves the deadline to ``now + lifetime`` and
returns the subscription to ACTIVE, so its timeout push moves too. A refresh is not a new subscription: each
subscription counts for the ``source`` (the client's address bucket) that created it, and a source holds at
most ``per_source`` of them; a new one beyond is refused with a 429 :class:`BadRequest` (counted in
:attr:`SubscriptionBook.refused_per_source`). A source of ``""`` (unknown) is never refused. The book holds
at most ``total`` subscriptions: a new one beyond is a 503 (:attr:`SubscriptionBook.refused_full`).

The lifetime defaults to 6 h; 24 h gives OpenDHT's behaviour. The margin defaults to 1/12 of the lifetime
(OpenDHT: 2 h of 24 h), so a device that refreshes on the timeout push never has a gap.

Why a heap and not a task per subscription: a Trio task costs about 3 KB and 35 µs to start or cancel, a
heap entry about 220 B. The book keeps every subscription's next due time in one
heap (lazily invalidated: an entry counts only if it still equals the subscription's ``due``), and one Trio
task in the service sleeps until :meth:`SubscriptionBook.next_due` and calls :meth:`SubscriptionBook.advance`.
The DHT listens are per key (shared by all subscriptions on it, :meth:`SubscriptionBook.watched`): the
service ends a key's listen when an expiry or an unsubscribe leaves the key without subscriptions.

All times are seconds on the caller's clock (the service uses ``trio.current_time()``).
"""

from __future__ import annotations

import enum
import heapq
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

from trio_dht.infohash import InfoHash
from trio_dht.limits import DEFAULT as DEFAULT_LIMITS
from trio_dht.push.payloads import (
    Dialect,
    Platform,
    Push,
    PushKind,
    data_limit,
    encode_data,
    timeout_data,
    values_data,
)
from trio_dht.push.subscribe_bodies import BadRequest, SubscribeRequest, UnsubscribeRequest

DEFAULT_LIFETIME = 6 * 3600.0
"""Six hours. OpenDHT's proxy uses 24 h (``--subscription-lifetime 24h``)."""
MARGIN_FRACTION = 1 / 12


class SubscriptionState(enum.Enum):
    ACTIVE = "active"
    TIMEOUT_PUSH_SENT = "timeout-push-sent"
    EXPIRED = "expired"
    UNSUBSCRIBED = "unsubscribed"


class Subscription:
    """One device's subscription to one key. Mutated only by :class:`SubscriptionBook`."""

    __slots__ = (
        "client_id",
        "deadline",
        "dialect",
        "due",
        "key",
        "platform",
        "session_id",
        "sid",
        "source",
        "state",
        "token",
        "topic",
    )

    def __init__(
        self,
        *,
        sid: int,
        dialect: Dialect,
        token: str,
        key: InfoHash,
        client_id: str,
        session_id: str,
        platform: Platform,
        topic: str,
        deadline: float,
        state: SubscriptionState = SubscriptionState.ACTIVE,
        source: str = "",
    ) -> None:
        self.sid = sid
        self.dialect = dialect
        self.token = token
        self.key = key
        self.client_id = client_id
        self.session_id = session_id
        self.platform = platform
        self.topic = topic
        self.deadline = deadline
        self.state = state
        self.source = source
        self.due = math.inf

    @property
    def identity(self) -> tuple[Dialect, InfoHash, str]:
        """Unique within the subscriptions of one device token."""
        return (self.dialect, self.key, self.client_id)

    @property
    def live(self) -> bool:
        return self.state in (SubscriptionState.ACTIVE, SubscriptionState.TIMEOUT_PUSH_SENT)

    def __repr__(self) -> str:
        return f"<Subscription {self.sid} {self.dialect.value} {self.key.hex()[:8]} {self.state.value}>"


@dataclass(frozen=True, slots=True)
class Transition:
    """A timer-driven state change reported by :meth:`SubscriptionBook.advance`."""

    subscription: Subscription
    state: SubscriptionState
    """TIMEOUT_PUSH_SENT (send :meth:`SubscriptionBook.timeout_push`) or EXPIRED (stop and forget)."""


@dataclass(slots=True)
class Change:
    """A SUBSCRIBE checked by :meth:`SubscriptionBook.prepare`, to apply with :meth:`SubscriptionBook.commit`:
    the subscription (a new one, not in the book yet; or the one refreshed, not changed yet) and its values
    once applied."""

    sub: Subscription
    created: bool
    platform: Platform
    topic: str
    session_id: str
    deadline: float


class SubscriptionBook:
    """Every push subscription, indexed by sid, by device token and by key, with one deadline heap."""

    def __init__(
        self,
        *,
        lifetime: float = DEFAULT_LIFETIME,
        margin: float | None = None,
        per_source: int = DEFAULT_LIMITS.subscriptions_per_source,
        total: int = DEFAULT_LIMITS.subscriptions_total,
    ) -> None:
        if lifetime <= 0:
            raise ValueError("lifetime must be positive")
        self.lifetime = lifetime
        self.margin = lifetime * MARGIN_FRACTION if margin is None else margin
        if not 0 <= self.margin < lifetime:
            raise ValueError("margin must be shorter than the lifetime")
        self._by_sid: dict[int, Subscription] = {}
        self._by_token: dict[str, dict[tuple[Dialect, InfoHash, str], Subscription]] = {}
        self._by_key: dict[InfoHash, dict[int, Subscription]] = {}
        self._heap: list[tuple[float, int]] = []
        self.per_source = per_source
        self._by_source: dict[str, int] = {}
        self.refused_per_source = 0
        """New subscriptions refused because their source held ``per_source`` already."""
        self.total = total
        self.refused_full = 0
        """New subscriptions refused because the book held ``total`` already."""
        self.kinds: dict[tuple[Platform, Dialect], int] = {}
        """Subscriptions by platform and dialect (``/metrics``; none left: no entry)."""

    # -- queries ---------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_sid)

    @property
    def token_count(self) -> int:
        """Distinct device tokens (OpenDHT's ``pushListenersCount``)."""
        return len(self._by_token)

    @property
    def source_count(self) -> int:
        """Sources (client address buckets) holding at least one subscription."""
        return len(self._by_source)

    def held_by(self, source: str) -> int:
        """Subscriptions created by ``source``."""
        return self._by_source.get(source, 0)

    def get(self, sid: int) -> Subscription | None:
        return self._by_sid.get(sid)

    def find(self, token: str, identity: tuple[Dialect, InfoHash, str]) -> Subscription | None:
        of_token = self._by_token.get(token)
        return None if of_token is None else of_token.get(identity)

    def on_key(self, key: InfoHash) -> Iterator[Subscription]:
        """The subscriptions on ``key``."""
        subs = self._by_key.get(key)
        return iter(()) if subs is None else iter(subs.values())

    def watched(self, key: InfoHash) -> bool:
        """Whether ``key`` has subscriptions (so needs a DHT listen)."""
        return key in self._by_key

    def __iter__(self) -> Iterator[Subscription]:
        return iter(list(self._by_sid.values()))

    def next_due(self) -> float | None:
        """When :meth:`advance` next has something to do."""
        heap = self._heap
        while heap:
            due, sid = heap[0]
            sub = self._by_sid.get(sid)
            if sub is not None and sub.due == due:
                return due
            heapq.heappop(heap)
        return None

    # -- transitions -----------------------------------------------------------------------------------------

    def subscribe(
        self, key: InfoHash, request: SubscribeRequest, now: float, source: str = ""
    ) -> tuple[Subscription, bool]:
        """Create or refresh the subscription ``request`` names: :meth:`prepare`, then :meth:`commit`."""
        change = self.prepare(key, request, now, source)
        return self.commit(change), change.created

    def prepare(self, key: InfoHash, request: SubscribeRequest, now: float, source: str = "") -> Change:
        """The change ``request`` makes: a new subscription (not in the book yet) or the refresh of one (left
        as it is until :meth:`commit`); the book does not change.

        A refresh updates platform, topic and (if the body had one) session, as OpenDHT's HEAD does. Raises
        :class:`BadRequest`: 400 if this subscription's pushes could not fit the platform's payload limit,
        429 if it is new and ``source`` holds ``per_source`` subscriptions already, 503 if it is new and the
        book holds ``total``.
        """
        sub = self.find(request.token, (request.dialect, key, request.client_id))
        session = request.session_id if request.session_id is not None or sub is None else sub.session_id
        session = session or ""
        sid = self._new_sid() if sub is None else sub.sid
        _check_payload_size(request.dialect, key, request.client_id, session, sid, request.platform)
        deadline = now + self.lifetime
        if sub is not None:
            return Change(sub, False, request.platform, request.topic, session, deadline)
        if source and self._by_source.get(source, 0) >= self.per_source:
            self.refused_per_source += 1
            raise BadRequest("Too many push subscriptions from this address", 429)
        if len(self._by_sid) >= self.total:
            self.refused_full += 1
            raise BadRequest("Too many push subscriptions on this proxy", 503)
        sub = Subscription(
            sid=sid,
            dialect=request.dialect,
            token=request.token,
            key=key,
            client_id=request.client_id,
            session_id=session,
            platform=request.platform,
            topic=request.topic,
            deadline=deadline,
            source=source,
        )
        return Change(sub, True, request.platform, request.topic, session, deadline)

    def commit(self, change: Change) -> Subscription:
        """Apply what :meth:`prepare` returned (with no other change to the book in between); the
        subscription in the book."""
        sub = change.sub
        if change.created:
            self._add(sub)
        else:
            if sub.platform is not change.platform:
                self._count_kind(sub, -1)
                sub.platform = change.platform
                self._count_kind(sub, 1)
            sub.topic, sub.session_id = change.topic, change.session_id
            sub.deadline = change.deadline
            sub.state = SubscriptionState.ACTIVE
        self._schedule(sub)
        return sub

    def restore(self, sub: Subscription, now: float, *, delay: float = 0.0) -> bool:
        """Add a subscription read back from storage; overdue timeout pushes are put off by ``delay``.

        Returns False (and adds nothing) if it has already expired, or if its identity or sid is taken.
        """
        if sub.deadline <= now or sub.sid in self._by_sid or self.find(sub.token, sub.identity) is not None:
            return False
        if sub.state not in (SubscriptionState.ACTIVE, SubscriptionState.TIMEOUT_PUSH_SENT):
            return False
        self._add(sub)
        self._schedule(sub, not_before=now + delay)
        return True

    def unsubscribe(self, key: InfoHash, request: UnsubscribeRequest) -> list[Subscription]:
        """Remove what ``request`` names (nothing if unknown: UNSUBSCRIBE is idempotent); the removed ones."""
        sub = self.named(key, request)
        if sub is None:
            return []
        self.remove(sub)
        return [sub]

    def named(self, key: InfoHash, request: UnsubscribeRequest) -> Subscription | None:
        """The subscription an UNSUBSCRIBE names, if any (not removed)."""
        if request.sub_token is not None:
            sub = self._by_sid.get(request.sub_token)
            return None if sub is None or sub.token != request.token or sub.key != key else sub
        return self.find(request.token, (request.dialect, key, request.client_id))

    def remove_token(self, token: str) -> list[Subscription]:
        """Remove every subscription of a device token the gateway reported gone."""
        subs = list(self._by_token.get(token, {}).values())
        for sub in subs:
            self.remove(sub)
        return subs

    def remove(self, sub: Subscription) -> None:
        """End ``sub`` now (UNSUBSCRIBED); a subscription no longer in the book is left alone."""
        if self._by_sid.get(sub.sid) is sub:
            self._remove(sub, SubscriptionState.UNSUBSCRIBED)

    def advance(self, now: float) -> list[Transition]:
        """Fire every timer due at ``now``: timeout pushes, then expiries."""
        out: list[Transition] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, sid = heapq.heappop(heap)
            sub = self._by_sid.get(sid)
            if sub is None or sub.due != due:
                continue
            if sub.state is SubscriptionState.ACTIVE and now < sub.deadline:
                sub.state = SubscriptionState.TIMEOUT_PUSH_SENT
                self._schedule(sub)
            else:
                self._remove(sub, SubscriptionState.EXPIRED)
            out.append(Transition(sub, sub.state))
        return out

    # -- payloads --------------------------------------------------------------------------------------------

    def values_push(
        self, sub: Subscription, *, t_ms: int, high_priority: bool, expired_id: int | None = None
    ) -> Push:
        """The wake-up telling ``sub``'s device that values changed under its key."""
        data = values_data(
            sub.dialect,
            key_hex=sub.key.hex(),
            client_id=sub.client_id,
            session_id=sub.session_id,
            sub_token=sub.sid,
            t_ms=t_ms,
            expired_id=expired_id,
        )
        return Push(sub.sid, PushKind.VALUES, sub.token, sub.platform, sub.topic, data, high_priority)

    def timeout_push(self, sub: Subscription) -> Push:
        """The push asking ``sub``'s device to subscribe again before the deadline."""
        data = timeout_data(
            sub.dialect,
            key_hex=sub.key.hex(),
            client_id=sub.client_id,
            session_id=sub.session_id,
            sub_token=sub.sid,
        )
        return Push(sub.sid, PushKind.TIMEOUT, sub.token, sub.platform, sub.topic, data, False)

    # -- internals -------------------------------------------------------------------------------------------

    def _new_sid(self) -> int:
        while True:
            sid = _random_sids.next()
            if sid and sid not in self._by_sid:
                return sid

    def _add(self, sub: Subscription) -> None:
        self._by_sid[sub.sid] = sub
        self._by_token.setdefault(sub.token, {})[sub.identity] = sub
        self._by_key.setdefault(sub.key, {})[sub.sid] = sub
        self._by_source[sub.source] = self._by_source.get(sub.source, 0) + 1
        kind = (sub.platform, sub.dialect)  # (as _count_kind, without a call: SUBSCRIBE's path)
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def _count_kind(self, sub: Subscription, change: int) -> None:
        kind = (sub.platform, sub.dialect)
        left = self.kinds.get(kind, 0) + change
        if left:
            self.kinds[kind] = left
        else:
            del self.kinds[kind]

    def _remove(self, sub: Subscription, state: SubscriptionState) -> None:
        sub.state = state
        sub.due = math.inf
        del self._by_sid[sub.sid]
        of_token = self._by_token[sub.token]
        del of_token[sub.identity]
        if not of_token:
            del self._by_token[sub.token]
        of_key = self._by_key[sub.key]
        del of_key[sub.sid]
        if not of_key:
            del self._by_key[sub.key]
        left = self._by_source[sub.source] - 1
        if left:
            self._by_source[sub.source] = left
        else:
            del self._by_source[sub.source]
        self._count_kind(sub, -1)

    def _schedule(self, sub: Subscription, not_before: float = -math.inf) -> None:
        if sub.state is SubscriptionState.ACTIVE:
            due = max(sub.deadline - self.margin, not_before)
        else:
            due = sub.deadline
        sub.due = min(due, sub.deadline)
        heapq.heappush(self._heap, (sub.due, sub.sid))
        if len(self._heap) > 2 * len(self._by_sid) + 64:
            self._heap = [(s.due, s.sid) for s in self._by_sid.values()]
            heapq.heapify(self._heap)


class _RandomSids:
    """Random 63-bit ids from the OS's CSPRNG (as ``secrets.randbits``), read 4 KB at a time: one system call
    per 512 subscriptions instead of one each."""

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids: list[int] = []

    def next(self) -> int:
        if not self._ids:
            raw = os.urandom(4096)
            self._ids = [int.from_bytes(raw[i : i + 8], "little") >> 1 for i in range(0, 4096, 8)]
        return self._ids.pop()


_random_sids = _RandomSids()

_ESCAPED_CHAR_MAX = 12
"""Most bytes one character of a string takes in ``ensure_ascii`` JSON (a surrogate pair: two ``\\uXXXX``)."""


def _largest_data(dialect: Dialect, key_hex: str, client_id: str, session_id: str, sid: int) -> int:
    """Length of the largest ``data`` JSON a subscription's pushes may carry."""
    fields = {"key_hex": key_hex, "client_id": client_id, "session_id": session_id, "sub_token": sid}
    return max(
        len(encode_data(values_data(dialect, t_ms=10**13, expired_id=2**64 - 1, **fields))),
        len(encode_data(timeout_data(dialect, **fields))),
    )


_LARGEST_FIXED = {d: _largest_data(d, "0" * 40, "", "", 2**63 - 1) for d in Dialect}
"""The largest ``data`` JSON per dialect with empty strings: what the strings add comes on top."""


def _check_payload_size(
    dialect: Dialect, key: InfoHash, client_id: str, session_id: str, sid: int, platform: Platform
) -> None:
    """Refuse a subscription whose largest push would not fit its platform's limit.

    Encodes the payloads only when the bound (fixed part + every character escaped at its longest) does not
    already prove they fit: short ids, the usual case, cost no JSON encoding.
    """
    limit = data_limit(platform)
    bound = _LARGEST_FIXED[dialect] + _ESCAPED_CHAR_MAX * (len(client_id) + len(session_id))
    if bound > limit and _largest_data(dialect, key.hex(), client_id, session_id, sid) > limit:
        raise BadRequest("Push payload too large")
