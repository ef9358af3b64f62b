"""The proxy client's book of listens and permanent puts (sans-IO): what exists, its subscription state and
deadlines, the requests to send, and what a push notification means.

One :class:`Watch` per listened key, shared by every local listener on it (the proxy knows one subscription
per (push token, key, client id), or one LISTEN stream). A watch holds the key's
:class:`~trio_dht.client.value_cache.ValueCache`, so a listener sees each change once.

Life of a push-mode watch (explicit states)::

    NEW ──subscribed──► SUBSCRIBED ──(refresh_at: before the proxy's deadline)──► re-SUBSCRIBE (refresh)
     │                    ▲    │
     └──failed──► FAILED ─┘    └── timeout push / push for another session / new token ──► re-SUBSCRIBE
                (retry_at, backoff)

Two dialects (:class:`~trio_dht.push.payloads.Dialect`):

- current OpenDHT: SUBSCRIBE ``{client_id, key, platform, session_id, topic[, refresh]}``, reply ``{}`` or the
  values; UNSUBSCRIBE ``{client_id, key}``; pushes ``{key, to, t, s[, exp]}`` (values) and
  ``{timeout, to, s[, vid]}`` (subscription or permanent put about to lapse);
- seed: SUBSCRIBE ``{key, callback_id, platform[, topic]}``, reply ``{"token": x}``; UNSUBSCRIBE
  ``{key, token: x, callback_id}``; pushes ``{token: x, callback_id}`` (wake-up) and
  ``{token: x, callback_id, timeout: hash}``.

Pushes for another session (an iOS app and its notification extension, or a previous run of the app, share
the token and client id, each with its own session id) are not dropped: the key is fetched and re-subscribed,
so the change is seen and later pushes come here.

All times are seconds on the caller's clock; push timestamps ``t`` are the proxy's milliseconds.
"""

from __future__ import annotations

import enum
import json
import math
import secrets
import string
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from trio_dht.api import ValueEvent
from trio_dht.backoff import Backoff
from trio_dht.client.ndjson import LineSplitter, parse_line
from trio_dht.client.value_cache import ValueCache
from trio_dht.infohash import InfoHash
from trio_dht.push.payloads import Dialect
from trio_dht.rest.value_json import PERMANENT_PUT_LIFETIME, PERMANENT_PUT_REFRESH_MARGIN
from trio_dht.value import Query, Value

SESSION_ALPHABET = string.ascii_letters + string.digits + "!#$%&()*+,./:;<=>?@[]^_`{|}~"
"""The characters of OpenDHT's session ids."""
SUBSCRIPTION_REFRESH = 5 * 3600.0
"""Re-SUBSCRIBE this long after the last subscription, timeout push or not. Below the shortest server
lifetime in use (our proxy's default 6 h; OpenDHT's is 24 h): a refresh too early
costs one small request, one too late loses the subscription."""
PUT_REFRESH = PERMANENT_PUT_LIFETIME - PERMANENT_PUT_REFRESH_MARGIN
"""Re-POST a permanent put this long after the last POST (OpenDHT: 22 h of a 24 h lifetime)."""
RESUBSCRIBE_GUARD = 30.0
"""A push for another session re-subscribes a key at most this often (the key is still fetched each time)."""


def new_session_id() -> str:
    """8 random characters, as OpenDHT draws a session id for each client instance."""
    return "".join(secrets.choice(SESSION_ALPHABET) for _ in range(8))


class InvalidPushNotification(ValueError):
    """What was handed to ``push_notification_received`` is not a JSON object."""


class PushResult(enum.Enum):
    """What ``push_notification_received`` did (OpenDHT's ``PushNotificationResult``)."""

    VALUES = "values"
    """Fetched the key; new, edited and vanished values went to its listeners."""
    VALUES_EXPIRED = "values-expired"
    """Expired the values the push named (``exp``)."""
    LISTEN_REFRESH = "listen-refresh"
    """Re-subscribed the key (a timeout push)."""
    PUT_REFRESH = "put-refresh"
    """Re-POSTed the permanent put the push named (``vid``)."""
    IGNORED_WRONG_SESSION = "ignored-wrong-session"
    """The push was for another session; its key was fetched and re-subscribed so pushes come here again."""
    IGNORED_NO_OP = "ignored-no-op"
    """Nothing to do: not a DHT push, another client id, or a key not listened to."""
    IGNORED_STOPPED = "ignored-stopped"
    """The client is closed."""


class SubscriptionState(enum.Enum):
    NEW = "new"
    """Not subscribed yet (or a stream-mode watch, which never subscribes)."""
    SUBSCRIBED = "subscribed"
    FAILED = "failed"
    """The last SUBSCRIBE failed; retried at ``retry_at``."""


@dataclass(eq=False, slots=True)
class Listener:
    """One local ``listen``: its filter and where its events go."""

    query: Query | None
    deliver: Callable[[ValueEvent], None]

    def offer(self, event: ValueEvent) -> None:
        if self.query is None or self.query.matches(event.value):
            self.deliver(event)


@dataclass(eq=False, slots=True)
class Watch:
    """One listened key: its listeners, its values, and (push mode) its subscription."""

    key: InfoHash
    listeners: list[Listener] = field(default_factory=list)
    cache: ValueCache = field(default_factory=ValueCache)
    state: SubscriptionState = SubscriptionState.NEW
    token: str = ""
    """The push token of the current subscription."""
    seed_token: Any = None
    """Seed dialect: the ``token`` the SUBSCRIBE reply gave (sent back as received)."""
    subscribed_at: float = -math.inf
    refresh_at: float = math.inf
    retry_at: float = math.inf
    backoff: Backoff = field(default_factory=lambda: Backoff(1.0, 300.0))

    def publish(self, events: list[ValueEvent]) -> None:
        for event in events:
            for listener in list(self.listeners):
                listener.offer(event)


@dataclass(eq=False, slots=True)
class HeldPut:
    """A permanent put this client keeps alive by re-POSTing it."""

    key: InfoHash
    value: Value
    refresh_at: float


@dataclass(frozen=True, slots=True)
class PushDecision:
    """What a push asks for; the shell does the I/O, in this order: expire, fetch, re-subscribe, re-POST."""

    result: PushResult
    t: int | None = None
    expire: tuple[InfoHash, tuple[int, ...]] | None = None
    fetch: tuple[InfoHash, ...] = ()
    resubscribe: tuple[InfoHash, ...] = ()
    refresh_put: tuple[InfoHash, int] | None = None


# -- notifications -------------------------------------------------------------------------------------------

_DHT_FIELDS = ("key", "timeout", "token")


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return json.dumps(value)


def parse_notification(notification: str | bytes | Mapping[str, Any]) -> dict[str, str]:
    """A push's data as ``{name: text}``, from a JSON string or a mapping (values as strings or not).

    A gateway envelope with the data under ``"data"`` is unwrapped. Raises :class:`InvalidPushNotification`.
    """
    if isinstance(notification, str | bytes | bytearray):
        try:
            obj = json.loads(notification)
        except (ValueError, RecursionError):
            raise InvalidPushNotification("a push notification is a JSON object; this is not JSON") from None
    else:
        obj = notification
    if not isinstance(obj, Mapping):
        raise InvalidPushNotification("a push notification is a JSON object")
    inner = obj.get("data")
    if isinstance(inner, str) and inner.lstrip().startswith("{"):
        try:
            inner = json.loads(inner)
        except (ValueError, RecursionError):
            inner = None
    if isinstance(inner, Mapping) and not any(name in obj for name in _DHT_FIELDS):
        obj = inner
    return {str(name): _as_text(value) for name, value in obj.items() if value is not None}


def _hash(text: str | None) -> InfoHash | None:
    if text is None:
        return None
    try:
        return InfoHash.from_hex(text.strip())
    except ValueError:
        return None


def _ids(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip().isdecimal())


def _millis(text: str | None) -> int | None:
    try:
        return int(float(text)) if text is not None else None
    except (ValueError, OverflowError):
        return None


# -- the book ------------------------------------------------------------------------------------------------


class ListenBook:
    """Watches (by key) and held permanent puts of one proxy client; no I/O, no clock."""

    def __init__(
        self,
        *,
        dialect: Dialect = Dialect.CURRENT,
        client_id: str = "",
        session_id: str | None = None,
        subscription_refresh: float = SUBSCRIPTION_REFRESH,
        put_refresh: float = PUT_REFRESH,
        resubscribe_guard: float = RESUBSCRIBE_GUARD,
    ) -> None:
        self.dialect = dialect
        self.client_id = client_id
        self.session_id = session_id if session_id is not None else new_session_id()
        self.subscription_refresh = subscription_refresh
        self.put_refresh = put_refresh
        self.resubscribe_guard = resubscribe_guard
        self.watches: dict[InfoHash, Watch] = {}
        self.puts: dict[tuple[InfoHash, int], HeldPut] = {}

    # -- listeners -------------------------------------------------------------------------------------------

    def add_listener(self, key: InfoHash, listener: Listener) -> tuple[Watch, bool]:
        """Attach ``listener`` to the watch of ``key`` (created if needed: then ``True``).

        Joining an existing watch, the listener is first given the values it holds.
        """
        watch = self.watches.get(key)
        created = watch is None
        if watch is None:
            watch = self.watches[key] = Watch(key)
        else:
            for value in watch.cache.values():
                listener.offer(ValueEvent(value))
        watch.listeners.append(listener)
        return watch, created

    def remove_listener(self, key: InfoHash, listener: Listener) -> Watch | None:
        """Detach ``listener``; the watch if that was its last listener (now removed: unsubscribe it)."""
        watch = self.watches.get(key)
        if watch is None or listener not in watch.listeners:
            return None
        watch.listeners.remove(listener)
        if watch.listeners:
            return None
        del self.watches[key]
        return watch

    # -- subscriptions ---------------------------------------------------------------------------------------

    def subscribe_body(
        self, watch: Watch, token: str, *, platform: str, topic: str, refresh: bool
    ) -> dict[str, Any]:
        """The SUBSCRIBE body for ``watch`` with push ``token``."""
        if self.dialect is Dialect.SEED:
            seed: dict[str, Any] = {"callback_id": self.client_id, "key": token, "platform": platform}
            if topic:  # not part of the seed body, but UnifiedPush needs its "<p256dh>|<auth>" to encrypt
                seed["topic"] = topic
            return seed
        body: dict[str, Any] = {
            "client_id": self.client_id,
            "key": token,
            "platform": platform,
            "session_id": self.session_id,
            "topic": topic,
        }
        if refresh:
            body["refresh"] = True
        return body

    def unsubscribe_body(self, watch: Watch) -> dict[str, Any] | None:
        """The UNSUBSCRIBE body for the current subscription of ``watch``; None if it has none."""
        if not watch.token or watch.state is SubscriptionState.NEW:
            return None
        if self.dialect is Dialect.SEED:
            body: dict[str, Any] = {"callback_id": self.client_id, "key": watch.token}
            if watch.seed_token is not None:
                body["token"] = watch.seed_token
            return body
        return {"client_id": self.client_id, "key": watch.token}

    def subscribed(self, watch: Watch, token: str, reply: bytes, now: float) -> list[Value] | None:
        """A 200 reply to SUBSCRIBE: the subscription is live until ``refresh_at``.

        Returns the values the reply streamed (a full listing, current dialect, existing subscription without
        refresh), or None when it carried none (``{}``, or the seed dialect's ``{"token": x}``). Raises
        ValueError for a reply that is neither.
        """
        values: list[Value] | None = None
        if self.dialect is Dialect.SEED:
            try:
                doc = json.loads(reply)
            except (ValueError, RecursionError):
                raise ValueError("the seed SUBSCRIBE reply is not JSON") from None
            if not isinstance(doc, dict) or doc.get("token") in (None, ""):
                raise ValueError('the seed SUBSCRIBE reply has no "token"')
            watch.seed_token = doc["token"]
        else:
            splitter = LineSplitter()
            lines = [*splitter.feed(reply), *splitter.end()]
            events = [parse_line(line) for line in lines]
            if not events or events[0] is not None:
                values = [ev.value for ev in events if ev is not None and not ev.expired]
        watch.state = SubscriptionState.SUBSCRIBED
        watch.token = token
        watch.subscribed_at = now
        watch.refresh_at = now + self.subscription_refresh
        watch.retry_at = math.inf
        watch.backoff.succeeded()
        return values

    def subscribe_failed(self, watch: Watch, now: float) -> float:
        """SUBSCRIBE failed (unreachable, timeout, an error status); the time of the retry."""
        watch.state = SubscriptionState.FAILED
        watch.retry_at = now + watch.backoff.failed()
        return watch.retry_at

    def subscription_due(self, watch: Watch, token: str, now: float) -> bool:
        """Whether ``watch`` must (re-)SUBSCRIBE now: never done, retry time, refresh time, or a new token."""
        if watch.state is SubscriptionState.NEW:
            return True
        if watch.state is SubscriptionState.FAILED:
            return now >= watch.retry_at
        return now >= watch.refresh_at or watch.token != token

    def next_subscription_action(self, watch: Watch) -> float:
        """When :meth:`subscription_due` next becomes true (barring pushes)."""
        if watch.state is SubscriptionState.NEW:
            return -math.inf
        if watch.state is SubscriptionState.FAILED:
            return watch.retry_at
        return watch.refresh_at

    def retry_now(self, watch: Watch, now: float) -> None:
        """Retry a failed subscription at once (the proxy is reachable again)."""
        if watch.state is SubscriptionState.FAILED:
            watch.retry_at = now

    # -- permanent puts --------------------------------------------------------------------------------------

    def hold_put(self, key: InfoHash, value: Value, now: float) -> HeldPut:
        """Keep re-POSTing ``value`` (it has its id) every :attr:`put_refresh` seconds."""
        held = self.puts[(key, value.id)] = HeldPut(key, value, now + self.put_refresh)
        return held

    def drop_put(self, key: InfoHash, value_id: int) -> bool:
        return self.puts.pop((key, value_id), None) is not None

    def puts_due(self, now: float) -> list[HeldPut]:
        return [held for held in self.puts.values() if held.refresh_at <= now]

    def next_put_refresh(self) -> float:
        return min((held.refresh_at for held in self.puts.values()), default=math.inf)

    def put_refreshed(self, held: HeldPut, now: float) -> None:
        held.refresh_at = now + self.put_refresh

    # -- push notifications ----------------------------------------------------------------------------------

    def interpret(
        self, data: Mapping[str, str], now: float, *, push_mode: bool = True, stopped: bool = False
    ) -> PushDecision:
        """What the push ``data`` (see :func:`parse_notification`) asks this client to do."""
        if stopped:
            return PushDecision(PushResult.IGNORED_STOPPED)
        if not push_mode:
            return PushDecision(PushResult.IGNORED_NO_OP)
        if self.dialect is Dialect.SEED:
            return self._interpret_seed(data, now)
        return self._interpret_current(data, now)

    def _interpret_current(self, data: Mapping[str, str], now: float) -> PushDecision:
        to = data.get("to")
        if to is not None and to != self.client_id:
            return PushDecision(PushResult.IGNORED_NO_OP)  # for another client id on this device
        is_timeout = "timeout" in data
        key = _hash(data.get("timeout") if is_timeout else data.get("key"))
        if key is None:
            return PushDecision(PushResult.IGNORED_NO_OP)
        vid = _ids(data["vid"]) if "vid" in data else ()
        session = data.get("s")
        if session is not None and session != self.session_id:
            return self._other_session(key, now, is_timeout=is_timeout, vid=vid)
        if is_timeout:
            if "vid" in data:
                if vid and (key, vid[0]) in self.puts:
                    return PushDecision(PushResult.PUT_REFRESH, refresh_put=(key, vid[0]))
                return PushDecision(PushResult.IGNORED_NO_OP)
            if key in self.watches:
                return PushDecision(PushResult.LISTEN_REFRESH, resubscribe=(key,))
            return PushDecision(PushResult.IGNORED_NO_OP)
        if key not in self.watches:
            return PushDecision(PushResult.IGNORED_NO_OP)
        t = _millis(data.get("t"))
        expired = _ids(data["exp"]) if "exp" in data else ()
        if expired:
            return PushDecision(PushResult.VALUES_EXPIRED, t=t, expire=(key, expired))
        return PushDecision(PushResult.VALUES, t=t, fetch=(key,))

    def _other_session(
        self, key: InfoHash, now: float, *, is_timeout: bool, vid: tuple[int, ...]
    ) -> PushDecision:
        """A push for another session on the same token and client id: take the subscription back."""
        if is_timeout and vid:
            held = (key, vid[0]) in self.puts
            return PushDecision(PushResult.IGNORED_WRONG_SESSION, refresh_put=(key, vid[0]) if held else None)
        watch = self.watches.get(key)
        if watch is None:
            return PushDecision(PushResult.IGNORED_WRONG_SESSION)
        guarded = now - watch.subscribed_at < self.resubscribe_guard
        return PushDecision(
            PushResult.IGNORED_WRONG_SESSION,
            fetch=() if is_timeout else (key,),
            resubscribe=() if guarded and not is_timeout else (key,),
        )

    def _interpret_seed(self, data: Mapping[str, str], now: float) -> PushDecision:
        callback_id = data.get("callback_id")
        if callback_id is not None and callback_id != self.client_id:
            return PushDecision(PushResult.IGNORED_NO_OP)
        token = data.get("token")
        if token is None:
            return PushDecision(PushResult.IGNORED_NO_OP)
        watch = next(self._by_seed_token(token), None)
        if "timeout" in data:
            key = watch.key if watch is not None else _hash(data["timeout"])
            if watch is not None:
                return PushDecision(PushResult.LISTEN_REFRESH, resubscribe=(key,))
            if key is not None and key in self.watches:  # a subscription token we do not hold: not ours
                return PushDecision(PushResult.IGNORED_WRONG_SESSION, resubscribe=(key,))
            return PushDecision(PushResult.IGNORED_NO_OP)
        if watch is not None:
            return PushDecision(PushResult.VALUES, fetch=(watch.key,))
        if not self.watches:
            return PushDecision(PushResult.IGNORED_NO_OP)
        # A wake-up for a subscription token we do not hold names no key: fetch them all, and re-subscribe
        # (re-learning the tokens) those not subscribed recently.
        keys = tuple(self.watches)
        stale = tuple(k for k, w in self.watches.items() if now - w.subscribed_at >= self.resubscribe_guard)
        return PushDecision(PushResult.IGNORED_WRONG_SESSION, fetch=keys, resubscribe=stale)

    def _by_seed_token(self, token: str) -> Iterator[Watch]:
        for watch in self.watches.values():
            if watch.seed_token is not None and _as_text(watch.seed_token) == token:
                yield watch
