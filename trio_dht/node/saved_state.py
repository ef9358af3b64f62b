"""What a node keeps across a restart, sans-IO: its id, the good nodes it knew, and the values it stores for
others with what remains of their lives.

As OpenDHT's saved state: a restarted node comes back as itself (the same id), rejoins its network through
the nodes it knew (no ``-b`` needed), and answers gets for what it stored before. Lifetimes are kept as Unix
times (the shell passes the wall clock beside the node's own), so the time the node was down counts: a
value lives what remained of its life, not a fresh one. The node's own values are not kept here (the proxy
keeps its permanent puts itself, and a library user re-puts its own).

Budgets: at most :data:`MAX_NODES` nodes (the most recently answering first) and what the storage quota
holds; a value that no longer parses, or whose life ended while the node was down, is dropped on restore.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from trio_dht.infohash import InfoHash
from trio_dht.node.routing import Node, RoutingTable
from trio_dht.node.storage import PutResult, Storage
from trio_dht.value import InvalidValue, Value, type_expiration
from trio_dht.wire.compact import Address

MAX_NODES = 256
"""Good nodes saved (per save, both families together)."""


@dataclass(frozen=True, slots=True)
class SavedNode:
    node_id: bytes
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class SavedValue:
    key: bytes
    packed: bytes
    """``Value.packed()``."""
    expires: float
    """Unix time."""
    bucket: str
    """The storage quota bucket of its sender."""


@dataclass(frozen=True, slots=True)
class NodeState:
    node_id: bytes
    nodes: tuple[SavedNode, ...] = ()
    values: tuple[SavedValue, ...] | None = ()
    """None: the values saved before stay as they are (a save of the id and nodes alone)."""


def capture(
    node_id: InfoHash,
    tables: dict[bool, RoutingTable],
    storage: Storage | None,
    now: float,
    wall: float,
) -> NodeState:
    """The state to save: ``now`` is the node's clock, ``wall`` the Unix time at the same instant. Without
    ``storage``, the id and nodes alone (values left as saved before)."""
    good: list[Node] = [n for table in tables.values() for n in table if n.is_good(now)]
    good.sort(key=lambda n: n.last_replied, reverse=True)
    nodes = tuple(SavedNode(bytes(n.id), n.addr[0], n.addr[1]) for n in good[:MAX_NODES])
    if storage is None:
        return NodeState(bytes(node_id), nodes, None)
    values = tuple(
        SavedValue(bytes(key), stored.value.packed(), wall + (stored.expiration - now), stored.bucket)
        for key, stored in storage.items()
        if stored.bucket is not None and math.isfinite(stored.expiration)
    )
    return NodeState(bytes(node_id), nodes, values)


def restore_values(
    store: Callable[..., PutResult], values: tuple[SavedValue, ...], now: float, wall: float
) -> int:
    """Store the saved values that are still alive, each for what remains of its life, with ``store`` (the
    running node's ``NodeProtocol.store``, which schedules their expiry, or a ``Storage.put``); returns how
    many were taken."""
    restored = 0
    for saved in values:
        remaining = saved.expires - wall
        if remaining <= 0 or len(saved.key) != 20:
            continue
        try:
            value = Value.unpack(saved.packed)
        except InvalidValue:
            continue
        lifetime = type_expiration(value.type)
        created = now - max(0.0, lifetime - remaining)  # so that it expires at now + remaining (at most)
        if store(InfoHash(saved.key), value, now, created=created, source=saved.bucket).accepted:
            restored += 1
    return restored


def bootstrap_addresses(state: NodeState) -> list[Address]:
    """The saved nodes' addresses, to ping at start as bootstrap nodes."""
    return [(n.host, n.port) for n in state.nodes]
