"""The DHT node's Trio shell: the UDP sockets, the clock and the tasks around the sans-IO protocol.

:class:`DhtNode` binds an IPv4 socket and, when it can, an IPv6 one on the same port, and hands each datagram
received to :class:`~trio_dht.node.protocol.NodeProtocol` with the time; the protocol answers through
:meth:`DhtNode._send`. The node's nursery runs the sockets' receive loops and the timers the protocol asks
for: request retransmissions, value expiry, confirmation pings, maintenance (tokens, buckets, remote
listeners), bootstrap, the listen driver (``node.listen_driver``) and the get rounds of the searches
(``node.search_driver``). Puts and their periodic re-announces are here.

A node may run with an :class:`~trio_dht.crypto.Identity` (OpenDHT's SecureDht): its id is then SHA-1 of
"node:" and the key id in lowercase hex; it signs, encrypts and announces its certificate through the
operations of :class:`~trio_dht.node.secure.SecureOperations`, which :class:`DhtNode` inherits.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from trio_dht.api import FamilyStats, GetCallback, NodeInfo, NoIdentity, RecipientNotFound, ValueEvent
from trio_dht.backoff import Backoff
from trio_dht.infohash import InfoHash
from trio_dht.limits import DEFAULT, Limits
from trio_dht.node.listen_driver import ListenDriver
from trio_dht.node.local_listens import Listener
from trio_dht.node.protocol import NodeProtocol, Request
from trio_dht.node.ratelimit import UdpRateLimiter
from trio_dht.node.routing import K, Node
from trio_dht.node.search_driver import Searches, wait_for
from trio_dht.node.secure import CERTIFICATE_VALUE_ID, SecureOperations, certificate_keys, identity_node_id
from trio_dht.node.storage import Storage
from trio_dht.node.transactions import FAIL_AFTER
from trio_dht.node.udp import UdpEndpoint
from trio_dht.value import Query, Value, random_value_id, type_expiration
from trio_dht.wire.compact import Address, is_ipv6, normalize
from trio_dht.wire.message import Kind, Message

if TYPE_CHECKING:
    from trio_dht.crypto import Identity

log = logging.getLogger("trio_dht.node")

DEFAULT_PORT = 4222
TABLE_WATCH = 5.0
EXTRA_ANNOUNCE_INTERVAL = 60.0
"""Least seconds between two announces of a permanent put caused by new nodes (see ``_reannounce``)."""
"""Seconds between two looks for new nodes in the routing tables (see :meth:`DhtNode._table_watch`)."""
__all__ = [
    "CERTIFICATE_VALUE_ID",
    "DhtNode",
    "NoIdentity",
    "RecipientNotFound",
    "certificate_keys",
    "identity_node_id",
    "open_node",
]


class RequestFailed(Exception):
    """A request got no reply after every retransmission, or got an error reply."""

    def __init__(self, message: str, error: Message | None = None):
        super().__init__(message)
        self.error = error


def _reply_or_raise(reply: Message | None, method: str, addr: Address) -> Message:
    if reply is None:
        raise RequestFailed(f"{method} to {addr[0]}:{addr[1]} timed out")
    if reply.kind is Kind.ERROR:
        raise RequestFailed(f"{method} to {addr[0]}:{addr[1]}: error {reply.error_code}", reply)
    return reply


class DhtNode(SecureOperations):
    """A running node. Create it with :func:`open_node`."""

    def __init__(
        self, *, node_id: InfoHash | None = None, identity: Identity | None = None, **options: Any
    ) -> None:
        """``options``: the :class:`~trio_dht.node.protocol.NodeProtocol`'s (``network``, ``is_client``,
        ``storage``, ``rate_limiter``, ``limits``). With an ``identity`` and no ``node_id``, the node id is
        :func:`identity_node_id`."""
        SecureOperations.__init__(self, identity)
        if node_id is None and identity is not None:
            node_id = identity_node_id(identity)
        self._clock = trio.lowlevel.current_clock().current_time  # trio.current_time, minus 2 calls
        self.protocol = protocol = NodeProtocol(
            node_id or InfoHash.random(), now=self._clock(), wall_clock=time.time, **options
        )
        protocol.screen.identity = identity
        self.network = protocol.network
        # The protocol's parts that callers and tests read:
        self.storage = protocol.storage
        self.tables = protocol.tables
        self.counters = protocol.counters
        self.remote_listeners = protocol.remote_listeners
        self.listens = protocol.listens
        self.searches = Searches(protocol)
        self.listen_driver = ListenDriver(protocol, self.searches)
        protocol.send = self._send
        protocol.wake_requests = self._wake_requests
        protocol.wake_expiry = self._wake_expiry
        protocol.wake_confirms = self._wake_confirms
        protocol.listens_changed = self.listen_driver.changed
        self._socks: dict[bool, UdpEndpoint] = {}
        self._requests_wake = trio.Event()
        self._expiry_wake = trio.Event()
        self._confirm_wake = trio.Event()
        self._permanent: dict[tuple[InfoHash, int], trio.CancelScope] = {}
        self._tables_grew = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._bootstrap: list[tuple[str, int]] = []
        self.bound_port = 0
        self.bound: dict[bool, Address] = {}

    # -- properties -----------------------------------------------------------------------------------------

    @property
    def node_id(self) -> InfoHash:
        return self.protocol.id

    @property
    def public_address(self) -> Address | None:
        return self.protocol.public_address

    def info(self) -> NodeInfo:
        now = trio.current_time()
        fams = {}
        for v6, table in self.tables.items():
            good, dubious = table.counts(now)
            fams[v6] = FamilyStats(good=good, dubious=dubious, cached=0, incoming=0, searches=0)
        st = self.storage
        return NodeInfo(
            node_id=self.node_id,
            ipv4=fams[False],
            ipv6=fams[True],
            storage_size=st.total_bytes + st.local_bytes,
            storage_values=st.value_count,
            storage_keys=st.key_count,
            listeners=self.remote_listeners.count(),
            public_address=self.public_address,
            bound_port=self.bound_port,
            extra={
                "received": self.counters.received,
                "sent": self.counters.sent,
                "dropped_malformed": self.counters.dropped_malformed,
                "dropped_rate": self.counters.dropped_rate,
                "dropped_network": self.counters.dropped_network,
                **self.limit_counters(),
            },
        )

    def limit_counters(self) -> dict[str, int]:
        """What each UDP limit dropped, cut or evicted (and what it holds now), for ``/node/stats``."""
        protocol = self.protocol
        reassembler, confirms, validation = protocol.reassembler, protocol.confirms, protocol.validation
        return {
            "dropped_unsolicited_fragments": self.counters.dropped_unsolicited + reassembler.unsolicited,
            "reassembly_dropped": reassembler.dropped,
            "reassembly_dropped_budget": reassembler.dropped_budget,
            "reassembly_bytes": reassembler.held,
            "listeners_refused": self.remote_listeners.refused,
            "confirm_queued": len(confirms),
            "confirm_in_flight": confirms.in_flight,
            "confirm_dropped_full": confirms.dropped_full,
            "confirm_dropped_stale": confirms.dropped_stale,
            "rate_sources": len(protocol.rate_limiter),
            "rate_sources_evicted": protocol.rate_limiter.evicted,
            "validated_addresses": len(validation),
            "validation_evicted": validation.evicted,
            "amplification_limited": validation.limited,
            "amplification_withheld_bytes": validation.withheld_bytes,
            "amplification_deferred": validation.deferred,
            "verify_refused_keys": protocol.verifier.refused_keys,
            "verify_cache_hits": protocol.verifier.cache_hits,
            "values_bad_signature": protocol.screen.bad_signatures,
            "values_decrypted": protocol.screen.decrypted,
            "values_not_for_us": protocol.screen.not_for_us,
            "values_over_decrypt_budget": protocol.screen.over_budget,
            "send_queue_dropped": sum(endpoint.queue_drops for endpoint in self._socks.values()),
        }

    def is_connected(self) -> bool:
        now = trio.current_time()
        return any(self.tables[v6].is_connected(now) for v6 in self.protocol.families)

    # -- lifecycle ------------------------------------------------------------------------------------------

    def _bind(self, host: str, port: int, host6: str | None) -> None:
        """Bind IPv4 on ``host`` and, when ``host6`` is given and IPv6 works, the same port on ``host6``."""
        self._socks[False] = UdpEndpoint(socket.AF_INET, host, port)
        self.bound[False] = self._socks[False].address
        self.bound_port = self.protocol.bound_port = self.bound[False][1]
        if host6 is not None:
            try:
                self._socks[True] = UdpEndpoint(socket.AF_INET6, host6, self.bound_port)
            except OSError as exc:
                log.info("no IPv6 socket on [%s]:%d: %s", host6, self.bound_port, exc)
            else:
                self.bound[True] = self._socks[True].address
        self.protocol.families.update(self._socks)

    async def _run(
        self,
        bootstrap: Iterable[tuple[str, int]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = self.searches.nursery = nursery
            for endpoint in self._socks.values():
                nursery.start_soon(endpoint.serve, self._datagram_received)
            nursery.start_soon(self._expiry_loop)
            nursery.start_soon(self._maintenance_loop)
            nursery.start_soon(self._confirm_loop)
            nursery.start_soon(self.listen_driver.run)
            nursery.start_soon(self._request_timer)
            nursery.start_soon(self._table_watch)
            self._bootstrap = list(bootstrap)
            bootstrapped = trio.Event()
            if self._bootstrap:
                nursery.start_soon(self._bootstrap_loop, bootstrapped)
            else:
                bootstrapped.set()
            if self._identity is not None:
                nursery.start_soon(self._announce_certificate, self._identity, bootstrapped)
            task_status.started()

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()

    # -- datagrams ------------------------------------------------------------------------------------------

    def _datagram_received(self, data: bytes, addr: Address) -> None:
        self.protocol.datagram_received(data, addr, self._clock())

    async def handle_datagram(self, data: bytes, addr: Address) -> None:
        """Process a datagram as if received from ``addr`` (for tests that drive the node without sockets)."""
        self._datagram_received(data, addr)
        await trio.lowlevel.checkpoint()

    def _send(self, data: bytes, addr: Address) -> None:
        endpoint = self._socks.get(is_ipv6(addr[0]))
        if endpoint is not None:
            endpoint.send(data, addr)
            self.counters.sent += 1

    # -- requests -------------------------------------------------------------------------------------------

    def start_request(
        self,
        addr: Address,
        method: str,
        args: dict[str, Any],
        on_done: Callable[[Message | None], None],
        *,
        node_id: InfoHash | None = None,
        values: list[Value] | None = None,
        on_slow: Callable[[], None] | None = None,
    ) -> int:
        """Send a request with OpenDHT's retransmissions; ``on_done`` gets the reply (or error reply), or None
        if none came. Returns its transaction id (for :meth:`abandon_request`). Costs no task."""
        return self.protocol.start_request(
            addr, method, args, on_done, trio.current_time(), node_id=node_id, values=values, on_slow=on_slow
        )

    def abandon_request(self, tid: int) -> None:
        """Forget a pending request: its reply is ignored and its callback never called."""
        self.protocol.abandon_request(tid)

    async def request(
        self,
        addr: Address,
        method: str,
        args: dict[str, Any],
        *,
        node_id: InfoHash | None = None,
        values: list[Value] | None = None,
        on_slow: Callable[[], None] | None = None,
    ) -> Message:
        """Send a request with OpenDHT's retransmissions; return the reply or raise :class:`RequestFailed`."""

        def start(on_done: Callable[[Message | None], None]) -> Callable[[], None]:
            tid = self.start_request(
                addr, method, args, on_done, node_id=node_id, values=values, on_slow=on_slow
            )
            return functools.partial(self.abandon_request, tid)

        return _reply_or_raise(await wait_for(start), method, addr)

    async def request_all(self, requests: list[Request]) -> list[Message | None]:
        """Send every ``(addr, method, args, node_id, values)`` request at once; their replies, in order (None
        for each that failed or got an error)."""
        return await wait_for(lambda done: self.protocol.start_requests(requests, done, trio.current_time()))

    # -- the timers -----------------------------------------------------------------------------------------

    def _wake_requests(self) -> None:
        self._requests_wake.set()

    def _wake_expiry(self) -> None:
        self._expiry_wake.set()

    def _wake_confirms(self) -> None:
        self._confirm_wake.set()

    async def _request_timer(self) -> None:
        """Retransmit, report slow requests and fail unanswered ones when due (``NodeProtocol.timer``)."""
        protocol = self.protocol
        while True:
            self._requests_wake = trio.Event()
            protocol.requests_at = protocol.transactions.next_due()
            with trio.move_on_at(protocol.requests_at):
                await self._requests_wake.wait()
            protocol.timer(trio.current_time())

    async def _expiry_loop(self) -> None:
        """Expire stored values at their exact time, and tell listeners."""
        protocol = self.protocol
        while True:
            nxt = self.storage.next_expiration()
            protocol.expiry_at = nxt if nxt is not None else math.inf
            self._expiry_wake = trio.Event()
            with trio.move_on_at(protocol.expiry_at):
                await self._expiry_wake.wait()
            protocol.expire(trio.current_time())

    async def _confirm_loop(self) -> None:
        """Ping nodes we heard of, so the routing table fills with good nodes (the queue's pings are sent
        here, after the datagram that queued them was answered, and as earlier pings end)."""
        while True:
            await self._confirm_wake.wait()
            self._confirm_wake = trio.Event()
            self.protocol.send_confirmations(self._clock())

    async def _maintenance_loop(self) -> None:
        await trio.sleep(random.uniform(3, 5))
        while True:
            finds = self.protocol.maintain(trio.current_time())
            assert self._nursery is not None
            for node, target in finds:
                self._nursery.start_soon(self._maintenance_find, node, target)
            await trio.sleep(random.uniform(5, 25) if finds else random.uniform(60, 180))

    async def _maintenance_find(self, node: Node, target: InfoHash) -> None:
        with trio.move_on_after(FAIL_AFTER + 1):
            with contextlib.suppress(RequestFailed):
                await self.request(node.addr, "find", {"target": target, "w": [2, 10]}, node_id=node.id)

    async def _bootstrap_loop(self, bootstrapped: trio.Event) -> None:
        """Ping the bootstrap nodes until connected (retry after 10 s, doubling up to a day), then search our
        own id and set ``bootstrapped``."""
        backoff = Backoff(10.0, 24 * 3600.0, jitter=0.0)
        while True:
            addrs = await self._resolve(self._bootstrap)
            async with trio.open_nursery() as nursery:
                for addr in addrs:
                    nursery.start_soon(self._bootstrap_ping, addr)
            if self.is_connected():
                break
            await trio.sleep(backoff.failed())
        for v6 in sorted(self.protocol.families):
            await self.searches.search(self.node_id, v6, "find", {"target": self.node_id})
        bootstrapped.set()

    async def _bootstrap_ping(self, addr: Address) -> None:
        try:
            await self.request(addr, "ping", {})
        except RequestFailed:
            log.info("bootstrap node %s:%d did not answer", *addr)

    async def _resolve(self, hosts: list[tuple[str, int]]) -> list[Address]:
        out: list[Address] = []
        for host, port in hosts:
            try:
                infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            except OSError as exc:
                log.warning("cannot resolve bootstrap host %s: %s", host, exc)
                continue
            for *_, sockaddr in infos:
                addr = normalize(sockaddr)
                if is_ipv6(addr[0]) in self.protocol.families and addr not in out:
                    out.append(addr)
        return out

    # -- public operations ----------------------------------------------------------------------------------

    async def get(
        self, key: InfoHash, query: Query | None = None, *, on_values: GetCallback | None = None
    ) -> list[Value]:
        """All values found under ``key`` (local storage and the closest nodes), merged by id."""
        return await self.searches.get(key, query, on_values=on_values)

    async def put(self, key: InfoHash, value: Value, *, permanent: bool = False) -> bool:
        """Store locally, then announce to the 8 closest nodes; True if stored anywhere."""
        if not value.id:
            value.id = random_value_id()
        self.protocol.store(key, value, trio.current_time(), local=True, permanent=permanent)
        if key in self.listens.by_key:
            # What local listeners started (a push) goes out before the announce: the first step lets the
            # tasks they spawned start (Trio runs a step's tasks in no fixed order), the second lets those
            # run to their first wait (the push's send) before this task goes on.
            await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()
        asked: set[InfoHash] = set()
        reached = await self._announce(key, value, asked)
        if permanent:
            assert self._nursery is not None
            scope = trio.CancelScope()
            old = self._permanent.pop((key, value.id), None)
            if old is not None:
                old.cancel()
            self._permanent[(key, value.id)] = scope
            # The re-announcing outlives this call (until cancel_put), so the node's nursery owns it.
            self._nursery.start_soon(self._reannounce, key, value, scope, reached, asked)
        return bool(reached) or self.storage.get_value(key, value.id) is not None

    async def _announce(
        self, key: InfoHash, value: Value, asked: set[InfoHash] | None = None
    ) -> set[InfoHash]:
        """Put ``value`` to the closest nodes of ``key`` in each family; the ids of those that stored it (and
        of every node asked, added to ``asked``)."""
        acked: set[InfoHash] = set()

        async def announce_family(v6: bool) -> None:
            state = await self.searches.search(key, v6, "find", {"target": key})
            created = int(time.time())
            synced = state.synced(K)
            replies = await self.request_all(
                [
                    (sn.node.addr, "put", {"h": key, "c": created, "token": sn.token}, sn.node.id, [value])
                    for sn in synced
                ]
            )
            for sn, reply in zip(synced, replies, strict=True):
                if reply is not None and reply.value_id == value.id:
                    acked.add(sn.node.id)
                if asked is not None:
                    asked.add(sn.node.id)

        await self.searches.each_family(announce_family)
        return acked

    async def _reannounce(
        self,
        key: InfoHash,
        value: Value,
        scope: trio.CancelScope,
        reached: set[InfoHash],
        asked: set[InfoHash],
    ) -> None:
        """Put a permanent value again before it expires on the nodes that store it, and when the routing
        tables show a node closer to ``key`` than the farthest that stored it (a node that joined or came
        back), as OpenDHT announces to each node that enters a search's closest. Node ids cost a stranger
        nothing, so those extra announces come at most every :data:`EXTRA_ANNOUNCE_INTERVAL` seconds (with up
        to a tenth more at random, so that puts do not all go at once), and a node asked once that did not
        store it (it refused, or its answer was lost) calls for none until the next full announce."""
        lifetime = max(1.0, type_expiration(value.type) - 10)
        with scope:
            due = trio.current_time() + lifetime
            while True:
                with trio.move_on_at(due):
                    await self._tables_grew.wait()
                    if self._closer_node_known(key, reached, asked):
                        reached |= await self._announce(key, value, asked)
                        await trio.sleep(EXTRA_ANNOUNCE_INTERVAL * (1 + random.random() / 10))
                    continue
                asked = set()
                reached = await self._announce(key, value, asked)
                due = trio.current_time() + lifetime

    def _closer_node_known(
        self, key: InfoHash, reached: set[InfoHash], asked: Iterable[InfoHash] = ()
    ) -> bool:
        """Whether a good node among the closest of ``key`` known now, not yet ``asked``, is closer to ``key``
        than the farthest of the ``reached`` nodes that stored the value (any such node while fewer than 8
        did). A table's nearest buckets hold nodes farther from a far key than the ones a search finds: those
        do not count."""
        now = trio.current_time()
        radius = max((node_id.distance(key) for node_id in reached), default=0) if len(reached) >= K else None
        return any(
            node.id not in reached
            and node.id not in asked
            and (radius is None or node.id.distance(key) < radius)
            for v6 in self.protocol.families
            for node in self.tables[v6].closest(key, K, now=now)
        )

    async def _table_watch(self) -> None:
        """Wake the permanent puts' re-announcing when a routing table gained nodes, at most every
        :data:`TABLE_WATCH` seconds (one event for every put, so a burst of new nodes costs each put one
        check)."""
        seen = [table.grown_at for table in self.tables.values()]
        while True:
            await trio.sleep(TABLE_WATCH)
            grown = [table.grown_at for table in self.tables.values()]
            if grown != seen:
                seen = grown
                self._tables_grew.set()
                self._tables_grew = trio.Event()

    def cancel_put(self, key: InfoHash, value_id: int) -> bool:
        scope = self._permanent.pop((key, value_id), None)
        if scope is None:
            return False
        scope.cancel()
        self.storage.remove(key, value_id)
        return True

    def add_listener(
        self, key: InfoHash, callback: Callable[[ValueEvent], None], query: Query | None = None
    ) -> Listener:
        """Call ``callback`` for each value under ``key`` as it appears (stored ones first) and expires.

        Costs no task: every listener of a key shares one remote listen, kept by the listen driver. Stop it
        with ``listener.cancel()``.
        """
        return self.listen_driver.add_listener(key, callback, query)

    def listen(
        self, key: InfoHash, query: Query | None = None
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[ValueEvent]]:
        """Values under ``key`` as they appear (current ones first) and expire, until the block exits:
        ``async with node.listen(key) as events: async for event in events: ...``."""
        return self.listen_driver.listen(key, query)


@asynccontextmanager
async def open_node(
    *,
    port: int = DEFAULT_PORT,
    host: str = "0.0.0.0",
    host6: str | None = "::",
    bootstrap: Iterable[tuple[str, int]] = (),
    network: int = 0,
    node_id: InfoHash | None = None,
    is_client: bool = False,
    storage: Storage | None = None,
    rate_limiter: UdpRateLimiter | None = None,
    limits: Limits = DEFAULT,
    identity: Identity | None = None,
) -> AsyncIterator[DhtNode]:
    """Run a DHT node for the duration of the block.

    ``async with open_node(port=4222, bootstrap=[("bootstrap.jami.net", 4222)]) as node:``. It binds UDP on
    ``host`` (and ``host6`` for IPv6, when given and available) and pings the bootstrap nodes in the
    background. With an ``identity`` it signs values (:meth:`DhtNode.put_signed`) and announces its
    certificate.
    """
    node = DhtNode(
        node_id=node_id,
        identity=identity,
        network=network,
        is_client=is_client,
        storage=storage,
        rate_limiter=rate_limiter,
        limits=limits,
    )
    node._bind(host, port, host6)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(node._run, bootstrap)
            try:
                yield node
            finally:
                nursery.cancel_scope.cancel()
    finally:
        node.close()
