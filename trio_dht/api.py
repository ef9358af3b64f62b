"""What every DHT front end offers: the node (:func:`trio_dht.open_node`), and the proxy client.

The REST proxy is written against :class:`Dht`, so it serves a real node or, in tests, an in-memory one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from trio_dht.infohash import InfoHash
from trio_dht.value import Query, Value


@dataclass(frozen=True, slots=True)
class ValueEvent:
    """A listen event: a value that appeared (or changed), or one that expired."""

    value: Value
    expired: bool = False


@dataclass(frozen=True, slots=True)
class FamilyStats:
    """Routing-table figures for one address family."""

    good: int = 0
    dubious: int = 0
    cached: int = 0
    incoming: int = 0
    searches: int = 0
    network_size_estimation: int = 0


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A snapshot of a node's state, as ``GET /node/info`` reports it."""

    node_id: InfoHash
    ipv4: FamilyStats = FamilyStats()
    ipv6: FamilyStats = FamilyStats()
    storage_size: int = 0
    storage_values: int = 0
    storage_keys: int = 0
    listeners: int = 0
    public_address: tuple[str, int] | None = None
    bound_port: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def good(self) -> int:
        return self.ipv4.good + self.ipv6.good


GetCallback = Callable[[list[Value]], None]
ListenCallback = Callable[[ValueEvent], None]


class NoIdentity(RuntimeError):
    """A signing or encrypting operation on a DHT that runs without an identity."""


class RecipientNotFound(LookupError):
    """``put_encrypted`` found no certificate of the recipient's key on the DHT."""


class ListenHandle(Protocol):
    """What :meth:`Dht.add_listener` returns."""

    def cancel(self) -> None:
        """Stop listening (idempotent)."""
        ...


class Dht(Protocol):
    """The operations a DHT front end offers. All keys are :class:`InfoHash`."""

    @property
    def node_id(self) -> InfoHash: ...

    async def get(
        self, key: InfoHash, query: Query | None = None, *, on_values: GetCallback | None = None
    ) -> list[Value]:
        """All values found under ``key``; ``on_values`` sees each batch as it arrives."""
        ...

    async def put(self, key: InfoHash, value: Value, *, permanent: bool = False) -> bool:
        """Store ``value`` (a random id is assigned if it has none); True once the closest nodes have it.

        A permanent put is re-announced until :meth:`cancel_put`.
        """
        ...

    async def put_signed(self, key: InfoHash, value: Value, *, permanent: bool = False) -> bool:
        """Sign ``value`` with the DHT's identity and put it, its ``seq`` one above the highest of ours
        already there (OpenDHT's ``putSigned``). :class:`NoIdentity` without an identity."""
        ...

    async def put_encrypted(self, key: InfoHash, value: Value, to: Any, *, permanent: bool = False) -> bool:
        """Sign ``value`` and encrypt it for ``to`` (a :class:`~trio_dht.crypto.PublicKey`, or the key id or
        32-byte long id of one whose certificate is on the DHT), then put it (OpenDHT's ``putEncrypted``).
        :class:`NoIdentity` without an identity, :class:`RecipientNotFound` if no certificate is found."""
        ...

    def cancel_put(self, key: InfoHash, value_id: int) -> bool:
        """Stop re-announcing a permanent put; True if there was one."""
        ...

    def listen(
        self, key: InfoHash, query: Query | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[ValueEvent]]:
        """``async with dht.listen(key) as events: async for ev in events`` — current values first."""
        ...

    def add_listener(
        self, key: InfoHash, callback: ListenCallback, query: Query | None = None
    ) -> ListenHandle:
        """Like :meth:`listen`, with a callback instead of a task: for many listens (the push service)."""
        ...

    def info(self) -> NodeInfo: ...
