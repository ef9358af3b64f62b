"""An in-memory :class:`~trio_dht.api.Dht`: one node's storage and listeners, no network.

Values expire by type (``type_expiration``, or the ``lifetime`` given) on the Trio clock, so
``trio.testing.MockClock`` drives expiry.
Permanent puts never expire until :meth:`MemoryDht.cancel_put`. ``fail_puts`` makes every put report failure
(the value is still stored, as on an isolated OpenDHT node), for testing a proxy's 502.

With an ``identity`` (:class:`trio_dht.crypto.Identity`) it signs and encrypts values as a node does
(:meth:`MemoryDht.put_signed`, :meth:`MemoryDht.put_encrypted`); a recipient named by its key id or long id is
its own key or one whose certificate was put into it (a type 8 value, under any key).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import trio

from trio_dht.api import (
    FamilyStats,
    GetCallback,
    ListenCallback,
    NodeInfo,
    NoIdentity,
    RecipientNotFound,
    ValueEvent,
)
from trio_dht.infohash import InfoHash
from trio_dht.value import MAX_VALUE_SIZE, Query, Value, random_value_id, type_expiration

if TYPE_CHECKING:
    from trio_dht.crypto import Identity, PublicKey


@dataclass(slots=True)
class _Stored:
    value: Value
    expires_at: float
    permanent: bool


class _Listener:
    """One listen: an async iterator of events, woken by puts and by the next expiry on its key."""

    def __init__(self, dht: MemoryDht, key: InfoHash, query: Query | None) -> None:
        self.dht = dht
        self.key = key
        self.query = query
        self._pending: deque[ValueEvent] = deque()
        self._wakeup = trio.Event()

    def matches(self, value: Value) -> bool:
        return self.query is None or self.query.matches(value)

    def deliver(self, event: ValueEvent) -> None:
        if self.matches(event.value):
            self._pending.append(event)
            self._wakeup.set()

    def wake(self) -> None:
        self._wakeup.set()

    def __aiter__(self) -> _Listener:
        return self

    async def __anext__(self) -> ValueEvent:
        while not self._pending:
            with trio.move_on_at(self.dht.next_expiry(self.key)):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            self.dht.expire(self.key, trio.current_time())
        return self._pending.popleft()


class _CallbackListener:
    """One :meth:`MemoryDht.add_listener`: events go straight to a callback; :meth:`MemoryDht.run` expires."""

    def __init__(self, dht: MemoryDht, key: InfoHash, query: Query | None, callback: ListenCallback) -> None:
        self.dht = dht
        self.key = key
        self.query = query
        self.callback = callback

    def deliver(self, event: ValueEvent) -> None:
        if self.query is None or self.query.matches(event.value):
            self.callback(event)
        self.wake()

    def wake(self) -> None:
        self.dht._expiry_wake.set()

    def cancel(self) -> None:
        self.dht._remove_listener(self)


class MemoryDht:
    """A :class:`~trio_dht.api.Dht` kept in memory. ``info()`` reports ``good_nodes`` good IPv4 nodes.

    ``lifetime(value)`` gives a value's lifetime in seconds (default: its type's).
    """

    def __init__(
        self,
        node_id: InfoHash | None = None,
        *,
        good_nodes: int = 8,
        fail_puts: bool = False,
        lifetime: Callable[[Value], float] | None = None,
        identity: Identity | None = None,
    ) -> None:
        self.identity = identity
        self.lifetime = lifetime or (lambda value: type_expiration(value.type))
        self._node_id = node_id if node_id is not None else InfoHash.random()
        self.good_nodes = good_nodes
        self.fail_puts = fail_puts
        self._store: dict[InfoHash, dict[int, _Stored]] = {}
        self._listeners: dict[InfoHash, set[_Listener | _CallbackListener]] = {}
        self._expiry_wake = trio.Event()

    @property
    def node_id(self) -> InfoHash:
        return self._node_id

    # -- storage ---------------------------------------------------------------------------------------------

    def values(self, key: InfoHash, query: Query | None = None) -> list[Value]:
        """The live values under ``key`` (no checkpoint: for assertions)."""
        self.expire(key, trio.current_time())
        stored = self._store.get(key, {}).values()
        return [s.value for s in stored if query is None or query.matches(s.value)]

    def next_expiry(self, key: InfoHash) -> float:
        return min((s.expires_at for s in self._store.get(key, {}).values()), default=math.inf)

    def expire(self, key: InfoHash, now: float) -> None:
        """Drop the values under ``key`` whose time has come, telling listeners."""
        by_id = self._store.get(key)
        if not by_id:
            return
        gone = [vid for vid, s in by_id.items() if s.expires_at <= now]
        for vid in gone:
            stored = by_id.pop(vid)
            for listener in list(self._listeners.get(key, ())):
                listener.deliver(ValueEvent(stored.value, expired=True))
        if not by_id:
            del self._store[key]

    # -- Dht -------------------------------------------------------------------------------------------------

    async def get(
        self, key: InfoHash, query: Query | None = None, *, on_values: GetCallback | None = None
    ) -> list[Value]:
        await trio.lowlevel.checkpoint()
        values = self.values(key, query)
        if values and on_values is not None:
            on_values(list(values))
        return values

    async def put(self, key: InfoHash, value: Value, *, permanent: bool = False) -> bool:
        await trio.lowlevel.checkpoint()
        if value.size > MAX_VALUE_SIZE:
            return False
        if not value.id:
            value.id = random_value_id()
        now = trio.current_time()
        self.expire(key, now)
        by_id = self._store.setdefault(key, {})
        expires_at = math.inf if permanent else now + self.lifetime(value)
        old = by_id.get(value.id)
        by_id[value.id] = _Stored(value, expires_at, permanent)
        if old is None or not old.value.same_content(value):
            for listener in list(self._listeners.get(key, ())):
                listener.deliver(ValueEvent(value))
        return not self.fail_puts

    async def put_signed(self, key: InfoHash, value: Value, *, permanent: bool = False) -> bool:
        """:meth:`put` ``value`` signed by the identity, its ``seq`` one above ours stored with its id."""
        identity = self._require_identity("put_signed")
        value = replace(value, id=value.id or random_value_id(), _packed=None)
        stored = self._store.get(key, {}).get(value.id)
        previous = [stored.value] if stored is not None else []
        return await self.put(key, identity.sign_value(value, previous), permanent=permanent)

    async def put_encrypted(
        self, key: InfoHash, value: Value, to: PublicKey | bytes, *, permanent: bool = False
    ) -> bool:
        """:meth:`put` ``value`` signed by the identity and encrypted for ``to`` (a public key, or the key id
        or long id of our own key or of a certificate put into this DHT); :class:`RecipientNotFound` if
        there is none."""
        identity = self._require_identity("put_encrypted")
        recipient = self.find_public_key(to) if isinstance(to, bytes) else to
        if recipient is None:
            raise RecipientNotFound(f"no certificate of key {to.hex()} in this DHT")
        value = replace(value, id=value.id or random_value_id(), _packed=None)
        return await self.put(key, identity.encrypt_value(value, recipient), permanent=permanent)

    def find_public_key(self, key_id: bytes) -> PublicKey | None:
        """The public key with this key id (20 bytes) or long id (32): ours, or a stored certificate's."""
        from trio_dht.crypto import Certificate, CryptoError
        from trio_dht.node.storage import CERTIFICATE_TYPE

        if self.identity is not None and key_id in (self.identity.id, self.identity.public_key.long_id):
            return self.identity.public_key
        for by_id in self._store.values():
            for stored in by_id.values():
                if stored.value.type != CERTIFICATE_TYPE:
                    continue
                try:
                    cert = Certificate.from_pem(stored.value.data)
                except CryptoError:
                    continue
                if key_id in (cert.id, cert.long_id):
                    return cert.public_key
        return None

    def _require_identity(self, operation: str) -> Identity:
        if self.identity is None:
            raise NoIdentity(f"{operation} needs an identity (MemoryDht(identity=...))")
        return self.identity

    def cancel_put(self, key: InfoHash, value_id: int) -> bool:
        stored = self._store.get(key, {}).get(value_id)
        if stored is None or not stored.permanent:
            return False
        stored.permanent = False
        stored.expires_at = trio.current_time() + self.lifetime(stored.value)
        for listener in list(self._listeners.get(key, ())):
            listener.wake()  # its next expiry moved
        return True

    @asynccontextmanager
    async def listen(
        self, key: InfoHash, query: Query | None = None
    ) -> AsyncIterator[AsyncIterator[ValueEvent]]:
        listener = _Listener(self, key, query)
        for value in self.values(key, query):
            listener.deliver(ValueEvent(value))
        self._listeners.setdefault(key, set()).add(listener)
        try:
            yield listener
        finally:
            self._remove_listener(listener)

    def _remove_listener(self, listener: _Listener | _CallbackListener) -> None:
        listeners = self._listeners.get(listener.key)
        if listeners is not None:
            listeners.discard(listener)
            if not listeners:
                del self._listeners[listener.key]

    def add_listener(
        self, key: InfoHash, callback: ListenCallback, query: Query | None = None
    ) -> _CallbackListener:
        """Callback listen; expiry events need :meth:`run` running (``await nursery.start(dht.run)``)."""
        listener = _CallbackListener(self, key, query, callback)
        for value in self.values(key, query):
            listener.deliver(ValueEvent(value))
        self._listeners.setdefault(key, set()).add(listener)
        return listener

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Expire values on time for callback listeners (iterator listens expire values themselves)."""
        task_status.started()
        while True:
            self._expiry_wake = trio.Event()
            keys = [
                k for k, ls in self._listeners.items() if any(isinstance(x, _CallbackListener) for x in ls)
            ]
            with trio.move_on_at(min((self.next_expiry(k) for k in keys), default=math.inf)):
                await self._expiry_wake.wait()
            now = trio.current_time()
            for key in keys:
                self.expire(key, now)

    def listener_count(self, key: InfoHash | None = None) -> int:
        """Open listens (on ``key``, or in all)."""
        if key is not None:
            return len(self._listeners.get(key, ()))
        return sum(len(ls) for ls in self._listeners.values())

    def info(self) -> NodeInfo:
        stored = [s for by_id in self._store.values() for s in by_id.values()]
        return NodeInfo(
            node_id=self._node_id,
            ipv4=FamilyStats(good=self.good_nodes),
            storage_size=sum(s.value.size for s in stored),
            storage_values=len(stored),
            storage_keys=len(self._store),
            listeners=self.listener_count(),
        )
