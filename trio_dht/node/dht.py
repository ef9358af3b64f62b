"""The DHT node: a thin Trio shell that owns the UDP sockets and the clock around the sans-IO cores.

One :class:`DhtNode` runs per process family pair (IPv4 socket, optional IPv6 socket). Its nursery supervises
the receive loops, maintenance, value expiry, outgoing requests (each with OpenDHT's retransmission schedule),
and the background work of listens and permanent puts.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import socket
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from trio_dht import signature
from trio_dht.api import FamilyStats, GetCallback, NodeInfo, ValueEvent
from trio_dht.infohash import InfoHash
from trio_dht.limits import DEFAULT, Limits
from trio_dht.node.confirm import ConfirmQueue, Pushed
from trio_dht.node.listeners import ListenerBook, TooManyListeners
from trio_dht.node.listening import KeyListen, Listener, ListenRegistry, ListenTarget
from trio_dht.node.ratelimit import RateLimiter, source_key
from trio_dht.node.requests import FAIL_AFTER, Action, PendingRequest, RequestTracker
from trio_dht.node.routing import K, Node, RoutingTable
from trio_dht.node.search import SearchNode, SearchState
from trio_dht.node.storage import PutOutcome, Storage, StoredValue
from trio_dht.node.tokens import TokenIssuer
from trio_dht.node.udp import UdpEndpoint
from trio_dht.node.validation import AddressValidation, smaller_answers
from trio_dht.value import Query, Value, random_value_id, type_expiration
from trio_dht.wire.compact import (
    Address,
    NodeRecord,
    is_ipv6,
    is_loopback,
    is_martian,
    normalize,
    pack_ip,
    unpack_ip,
    want_families,
)
from trio_dht.wire.message import METHODS, Encoder, ErrorCode, Kind, MalformedMessage, Message, decode
from trio_dht.wire.reassembly import Reassembler

log = logging.getLogger("trio_dht.node")

DEFAULT_PORT = 4222
LISTEN_NODES = 4
LISTEN_REFRESH = 20.0
LISTEN_RETRY = 5.0
LISTEN_RETRY_MAX = 60.0
LISTEN_REFRESHES_IN_FLIGHT = 1024
"""Refreshes sent without a search (:meth:`DhtNode._listen_driver`) that may await their replies at once: at a
100 ms round trip, 10 k refreshes a second, enough for 200 k listened keys."""
LISTEN_SETUPS_IN_FLIGHT = 256
"""Listens that may be looking for their storing nodes at once (:meth:`DhtNode._listen_setups`)."""
LISTEN_RESYNC = 10 * 60.0
LISTENER_EXPIRE = 10 * 60.0
STORE_CLOSENESS = 14
ERROR_TEXTS = {
    "put_token": "Put with incorrect token",
    "put_id": "Put with invalid ID",
    "put_hash": "Put with no info_hash",
    "get_hash": "Get_values with no info_hash",
    "listen_token": "Listen with incorrect token",
    "listen_hash": "Listen with no info_hash",
    "listen_full": "Listen refused: too many listeners",
    "refresh_unknown": "Access operation for unknown storage",
}
_REQUEST, _REPLY, _ERROR, _FRAGMENT = Kind.REQUEST, Kind.REPLY, Kind.ERROR, Kind.FRAGMENT
_NO_ID = bytes(InfoHash())


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


def _expiry(stored: StoredValue | None, value: Value, now: float) -> float:
    """When a value expires for local listeners: its stored expiration (never, for a permanent put), or its
    type's lifetime from ``now`` when it is not stored here."""
    return stored.expiration if stored is not None else now + type_expiration(value.type)


async def _wait_for(start: Callable[[Callable[[Any], None]], Callable[[], None]]) -> Any:
    """Run a callback-style operation to its end: ``start(on_done)`` begins it and returns its stop
    function, called if the wait is cancelled."""
    done = trio.Event()
    results: list[Any] = []

    def on_done(result: Any) -> None:
        results.append(result)
        done.set()

    stop = start(on_done)
    try:
        if not results:
            await done.wait()
    finally:
        if not results:
            stop()
    return results[0]


@dataclass(slots=True, eq=False)
class _GetRound:
    """One remote get of a key (and ``where`` filter), shared by every caller that asks while it runs.

    OpenDHT's node does the same: a get never sends a request that a pending one of the same search already
    answers. Callers that join late first receive what the round has found so far.
    """

    found: dict[int, Value] = field(default_factory=dict)
    callbacks: list[Callable[[list[Value]], None]] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def on_reply(self, sn: SearchNode, reply: Message) -> None:
        new = [v for v in reply.values if v.id not in self.found]
        if new:
            for v in new:
                self.found[v.id] = v
            for callback in list(self.callbacks):
                try:
                    callback(new)
                except Exception:  # one caller's failure is not the others'
                    log.exception("a get callback failed")


@dataclass(slots=True)
class Counters:
    """Per-node figures for stats and tests."""

    received: int = 0
    sent: int = 0
    dropped_malformed: int = 0
    dropped_network: int = 0
    dropped_rate: int = 0
    dropped_self: int = 0
    dropped_martian: int = 0
    dropped_unsolicited: int = 0
    """Fragmented replies (headers) whose ``t`` is no request we sent to that address (fragments starting no
    message are counted by the reassembler)."""
    requests: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class DhtNode:
    """A running node. Create it with :func:`open_node`."""

    def __init__(
        self,
        *,
        node_id: InfoHash | None = None,
        network: int = 0,
        is_client: bool = False,
        storage: Storage | None = None,
        rate_limiter: RateLimiter | None = None,
        limits: Limits = DEFAULT,
    ) -> None:
        self._id = node_id or InfoHash.random()
        self.network = network
        self.limits = limits
        self.encoder = Encoder(self._id, network, is_client)
        self.verifier = signature.Verifier(limits)
        self.storage = storage if storage is not None else Storage(verify=self.verifier.verify)
        self.remote_listeners = ListenerBook(limits)
        self.rate_limiter = rate_limiter if rate_limiter is not None else RateLimiter(limits=limits)
        self.counters = Counters()
        self.tables = {False: RoutingTable(self._id), True: RoutingTable(self._id)}
        self._socks: dict[bool, UdpEndpoint] = {}
        self._requests = RequestTracker()
        self._requests_at = math.inf
        self._requests_wake = trio.Event()
        self._reassembler = Reassembler(limits, source_key)
        self._validation = AddressValidation(limits)
        self._tokens = TokenIssuer(trio.current_time())
        self._clock = trio.lowlevel.current_clock().current_time  # trio.current_time, minus 2 calls
        self.listens = ListenRegistry()
        self._listen_wake = trio.Event()
        self._listen_wake_at = -math.inf
        """When the listen driver plans to wake (set before it waits)."""
        self._listen_setup_queue: trio.MemorySendChannel[KeyListen] | None = None
        """Listens to start with a search (:meth:`_listen_setups`), while the listen driver runs."""
        self.listen_refresh = LISTEN_REFRESH
        self._permanent: dict[tuple[InfoHash, int], trio.CancelScope] = {}
        self._get_rounds: dict[tuple[InfoHash, tuple[tuple[int, Any], ...]], _GetRound] = {}
        self._expiry_wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._bootstrap: list[tuple[str, int]] = []
        self._confirms = ConfirmQueue(limits)
        self._expiry_at = math.inf
        self._confirm_wake = trio.Event()
        self.public_address: Address | None = None
        self.bound_port = 0
        self.bound: dict[bool, Address] = {}

    # -- properties -----------------------------------------------------------------------------------------

    @property
    def node_id(self) -> InfoHash:
        return self._id

    def info(self) -> NodeInfo:
        now = trio.current_time()
        fams = {}
        for v6, table in self.tables.items():
            good, dubious = table.counts(now)
            fams[v6] = FamilyStats(good=good, dubious=dubious, cached=0, incoming=0, searches=0)
        st = self.storage
        return NodeInfo(
            node_id=self._id,
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
        reassembler, confirms, validation = self._reassembler, self._confirms, self._validation
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
            "rate_sources": len(self.rate_limiter),
            "rate_sources_evicted": self.rate_limiter.evicted,
            "validated_addresses": len(validation),
            "validation_evicted": validation.evicted,
            "amplification_limited": validation.limited,
            "amplification_withheld_bytes": validation.withheld_bytes,
            "amplification_deferred": validation.deferred,
            "verify_refused_keys": self.verifier.refused_keys,
            "verify_cache_hits": self.verifier.cache_hits,
            "send_queue_dropped": sum(endpoint.queue_drops for endpoint in self._socks.values()),
        }

    def is_connected(self) -> bool:
        now = trio.current_time()
        return any(t.is_connected(now) for fam, t in self.tables.items() if fam in self._socks)

    # -- lifecycle ------------------------------------------------------------------------------------------

    def _bind(self, host: str, port: int, host6: str | None) -> None:
        """Bind IPv4 on ``host`` and, when ``host6`` is given and IPv6 works, the same port on ``host6``."""
        self._socks[False] = UdpEndpoint(socket.AF_INET, host, port)
        self.bound[False] = self._socks[False].address
        self.bound_port = self.bound[False][1]
        if host6 is not None:
            try:
                self._socks[True] = UdpEndpoint(socket.AF_INET6, host6, self.bound_port)
            except OSError as exc:
                log.info("no IPv6 socket on [%s]:%d: %s", host6, self.bound_port, exc)
            else:
                self.bound[True] = self._socks[True].address

    async def _run(
        self,
        bootstrap: Iterable[tuple[str, int]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for endpoint in self._socks.values():
                nursery.start_soon(endpoint.serve, self._datagram_received)
            nursery.start_soon(self._expiry_loop)
            nursery.start_soon(self._maintenance_loop)
            nursery.start_soon(self._confirm_loop)
            nursery.start_soon(self._listen_driver)
            nursery.start_soon(self._request_timer)
            self._bootstrap = list(bootstrap)
            if self._bootstrap:
                nursery.start_soon(self._bootstrap_loop)
            task_status.started()

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()

    # -- sending --------------------------------------------------------------------------------------------

    def _send(self, data: bytes, addr: Address) -> None:
        endpoint = self._socks.get(is_ipv6(addr[0]))
        if endpoint is not None:
            endpoint.send(data, addr)
            self.counters.sent += 1

    def _next_tid(self) -> int:
        return self._requests.new_tid()

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
        tid = self._next_tid()
        datagrams = (
            self.encoder.request_with_values(tid, method, args, values)
            if values is not None
            else [self.encoder.request(tid, method, args)]
        )
        now = trio.current_time()
        request = PendingRequest(tid, addr, node_id, method, datagrams, on_done, on_slow, now)
        due = self._requests.add(request)
        if due < self._requests_at:
            self._requests_wake.set()
        for d in datagrams:
            self._send(d, addr)
        return tid

    def abandon_request(self, tid: int) -> None:
        """Forget a pending request: its reply is ignored and its callback never called."""
        self._requests.pop(tid)

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

        return _reply_or_raise(await _wait_for(start), method, addr)

    def start_requests(
        self,
        requests: list[tuple[Address, str, dict[str, Any], InfoHash | None, list[Value] | None]],
        on_done: Callable[[list[Message | None]], None],
    ) -> Callable[[], None]:
        """Send every ``(addr, method, args, node_id, values)`` request at once; ``on_done`` gets their
        replies, in order (None for each that failed or got an error), once all are in. Returns a function
        that abandons the ones still out (``on_done`` is then never called)."""
        replies: list[Message | None] = [None] * len(requests)
        left = len(requests)
        tids: list[int] = []

        def finisher(i: int) -> Callable[[Message | None], None]:
            def finish(reply: Message | None) -> None:
                nonlocal left
                replies[i] = reply if reply is not None and reply.kind is Kind.REPLY else None
                left -= 1
                if not left:
                    on_done(replies)

            return finish

        for i, (addr, method, args, node_id, values) in enumerate(requests):
            tids.append(self.start_request(addr, method, args, finisher(i), node_id=node_id, values=values))
        if not requests:
            on_done(replies)

        def abandon() -> None:
            for tid in tids:
                self.abandon_request(tid)

        return abandon

    async def request_all(
        self, requests: list[tuple[Address, str, dict[str, Any], InfoHash | None, list[Value] | None]]
    ) -> list[Message | None]:
        """:meth:`start_requests`, awaited."""
        return await _wait_for(lambda done: self.start_requests(requests, done))

    async def _request_timer(self) -> None:
        """Retransmit, report slow requests and fail unanswered ones when due (see ``node.requests``)."""
        while True:
            self._requests_wake = trio.Event()
            self._requests_at = self._requests.next_due()
            with trio.move_on_at(self._requests_at):
                await self._requests_wake.wait()
            for request, action in self._requests.due(trio.current_time()):
                try:
                    if action is Action.RESEND:
                        for d in request.datagrams:
                            self._send(d, request.addr)
                    elif action is Action.SLOW:
                        assert request.on_slow is not None
                        request.on_slow()
                    else:
                        if request.node_id is not None:
                            self.tables[is_ipv6(request.addr[0])].request_failed(request.node_id)
                        request.on_done(None)
                except Exception:  # a callback's bug must not stop every other request's timer
                    log.exception("%s to %s failed in its %s step", request.method, request.addr, action)

    # -- receiving ------------------------------------------------------------------------------------------

    def _datagram_received(self, data: bytes, addr: Address) -> None:
        self.counters.received += 1
        try:
            self._process(data, addr)
        except Exception:  # one bad datagram must never take the node down
            self.counters.dropped_malformed += 1
            log.exception("error handling a datagram from %s", addr)

    async def handle_datagram(self, data: bytes, addr: Address) -> None:
        """Process a datagram as if received from ``addr`` (for tests that drive the node without sockets)."""
        self._datagram_received(data, addr)
        await trio.lowlevel.checkpoint()

    def _process(self, data: bytes, addr: Address) -> None:
        if is_martian(addr):
            self.counters.dropped_martian += 1
            return
        try:
            msg = decode(data)
        except MalformedMessage:
            self.counters.dropped_malformed += 1
            return
        if msg.network != self.network:
            self.counters.dropped_network += 1
            return
        now = self._clock()
        kind = msg.kind
        rate_checked = False  # a fragmented request is counted once, when its header arrives
        if kind is _FRAGMENT:  # may start a message only as the answer to a request we sent there
            pending = self._requests.pending.get(msg.tid)
            reply = pending is not None and pending.addr == addr
            done = self._reassembler.fragment((addr, msg.tid), msg, now, reply)
            if done is None:
                return
            msg = done
            kind = msg.kind
            rate_checked = True
        elif msg.value_sizes and (kind is _REQUEST or kind is _REPLY):  # a fragmented message's header
            if kind is _REQUEST:
                if not self.rate_limiter.allow(addr, now):
                    self.counters.dropped_rate += 1
                    return
            else:  # reassembled only as the answer to a request we sent to that address
                pending = self._requests.pending.get(msg.tid)
                if pending is None or pending.addr != addr:
                    self.counters.dropped_unsolicited += 1
                    return
            done = self._reassembler.header((addr, msg.tid), msg, now, kind is _REPLY)
            if done is None:
                return
            msg = done
            rate_checked = True
        sender = msg.sender
        if sender is None or sender == _NO_ID or sender == self._id:
            self.counters.dropped_self += 1
            return
        if kind is _REQUEST:
            if not rate_checked and not self.rate_limiter.allow(addr, now):
                self.counters.dropped_rate += 1
                return
            self._on_request(msg, addr, now, len(data))
        elif kind is _REPLY or kind is _ERROR:
            self._on_reply(msg, addr, now)

    def _on_reply(self, msg: Message, addr: Address, now: float) -> None:
        pending = self._requests.pending.get(msg.tid)
        if pending is None:
            return
        if pending.node_id is not None and pending.node_id != msg.sender:
            return
        if pending.node_id is None and pending.addr != addr:
            return
        assert msg.sender is not None
        if pending.addr == addr:
            self._validation.validate(addr)  # it got our request there
        table = self.tables[is_ipv6(addr[0])]
        if msg.kind is Kind.REPLY:
            if not msg.is_client:
                node, to_ping = table.heard(msg.sender, addr, now, replied=True)
                if to_ping is not None:
                    self._confirm(to_ping)
            if msg.requester_ip is not None:
                ip = unpack_ip(msg.requester_ip)
                if ip is not None and not is_loopback(ip):
                    self.public_address = (ip, self.bound_port)
            self._learn(msg, addr, now)
        else:
            node = table.get(msg.sender)
            if node is not None and msg.error_code == ErrorCode.UNAUTHORIZED:
                node.auth_error()
        self._requests.pop(msg.tid)
        try:
            pending.on_done(msg)
        except Exception:  # the requester's bug, not the datagram's
            log.exception("handling the reply to %s from %s failed", pending.method, addr)

    def _learn(self, msg: Message, source: Address, now: float) -> None:
        """Offer the nodes listed in a reply to the routing tables (as unconfirmed)."""
        for v6, records in ((False, msg.nodes4), (True, msg.nodes6)):
            if not records or v6 not in self._socks:
                continue
            table = self.tables[v6]
            known = table.by_id
            unknown = [record for record in records if record[0] not in known]  # most are known already
            for nid, addr in self._usable_records(unknown, source):
                if table.get(nid) is None:
                    node, _ = table.heard(nid, addr, now, replied=False)
                    node.last_heard = -math.inf
                    self._confirm(node)

    def _usable_records(self, records: list[NodeRecord], source: Address) -> list[NodeRecord]:
        out = []
        for nid, addr in records:
            if nid == self._id or not nid:
                continue
            if is_loopback(addr[0]) and is_ipv6(addr[0]) == is_ipv6(source[0]):
                addr = (source[0], addr[1])
            if is_martian(addr):
                continue
            out.append((nid, addr))
        return out

    def _confirm(self, node: Node, now: float | None = None) -> bool:
        """Queue a ping so that a node we only heard of (or from) can become good, and its address validated
        (one at a time per node; bounded, see ``node.confirm``). False if the queue is full."""
        pushed = self._confirms.push(node, self._clock() if now is None else now)
        if pushed is Pushed.SEND:
            self._confirm_wake.set()
        return pushed is not Pushed.FULL

    def _ping_to_confirm(self, node: Node, ended: Callable[[Message | None], None]) -> None:
        self.start_request(node.addr, "ping", {}, ended, node_id=node.id)

    # -- request handlers -----------------------------------------------------------------------------------

    def _on_request(self, msg: Message, addr: Address, now: float, size: int) -> None:
        sender = msg.sender
        assert sender is not None
        method = msg.method
        self.counters.requests[method] += 1
        v6 = is_ipv6(addr[0])
        credit = self._validation.received(addr, size)  # infinite once validated
        validated = credit == math.inf
        pinging = False
        held = self._confirms.held  # tested here, as most requests come from a node already held
        if not msg.is_client:
            node, to_ping = self.tables[v6].heard(sender, addr, now, replied=False)
            if to_ping is not None:
                self._confirm(to_ping, now)
            if node.last_replied == -math.inf or not validated:  # not good, or not at this address: confirm
                pinging = sender in held or self._confirm(node, now)
        elif not validated:  # a client is not a routing table's node, but its address is validated the same
            pinging = sender in held or self._confirm(Node(sender, addr), now)
        sa = pack_ip(addr[0])
        datagrams = _HANDLERS[method](self, msg, addr, sa, now)
        if not validated:
            datagrams = self._validation.within_credit(
                addr, method, datagrams, credit, pinging, self._smaller_answers, msg, addr, sa, now
            )
        for datagram in datagrams:
            self._send(datagram, addr)

    def _smaller_answers(self, msg: Message, addr: Address, sa: bytes, now: float) -> Iterable[bytes]:
        """Smaller answers to a get or find (``node.validation.smaller_answers``); none to the others."""
        target = msg.target or msg.info_hash
        if (msg.method != "get" and msg.method != "find") or target is None:
            return ()
        n4, n6 = self._closest_records(target, msg.want, is_ipv6(addr[0]), now)
        token = self._tokens.issue(addr)
        return smaller_answers(self.encoder, msg.tid, msg.method, sa, token, n4, n6, K // 2)

    def _closest_records(self, target: bytes, want: list[int] | None, requester_v6: bool, now: float):
        v4, v6 = want_families(want, requester_v6)
        return (
            self._family_records(False, target, now) if v4 else [],
            self._family_records(True, target, now) if v6 else [],
        )

    def _family_records(self, v6: bool, target: bytes, now: float) -> list[NodeRecord]:
        if v6 not in self._socks:
            return []
        return [(n.id, n.addr) for n in self.tables[v6].closest(target, K, now=now)]

    def _handle_ping(self, msg: Message, addr: Address, sa: bytes, now: float) -> list[bytes]:
        return [self.encoder.reply(msg.tid, {"sa": sa})]

    def _handle_find(self, msg: Message, addr: Address, sa: bytes, now: float) -> list[bytes]:
        target = msg.target or msg.info_hash
        if target is None:
            return [self.encoder.error(msg.tid, ErrorCode.INCOMPLETE, "Find with no target")]
        n4, n6 = self._closest_records(target, msg.want, is_ipv6(addr[0]), now)
        return [self.encoder.reply(msg.tid, Encoder.nodes_body(sa, n4, n6, self._tokens.issue(addr)))]

    def _handle_get(self, msg: Message, addr: Address, sa: bytes, now: float) -> list[bytes]:
        if msg.info_hash is None:
            return [self.encoder.error(msg.tid, ErrorCode.INCOMPLETE, ERROR_TEXTS["get_hash"])]
        n4, n6 = self._closest_records(msg.info_hash, msg.want, is_ipv6(addr[0]), now)
        body = Encoder.nodes_body(sa, n4, n6, self._tokens.issue(addr))
        values = self.storage.get(msg.info_hash, msg.query)
        if not values:
            return [self.encoder.reply(msg.tid, body)]
        query = msg.query
        if query is not None and query.select:
            flat = [item for v in values for item in query.field_items(v)]
            body["fileds"] = {"f": list(query.select), "v": flat}
            return [self.encoder.reply(msg.tid, body)]
        return self.encoder.reply_with_values(msg.tid, body, values)

    def _handle_put(self, msg: Message, addr: Address, sa: bytes, now: float) -> list[bytes]:
        if msg.info_hash is None:
            return [self.encoder.error(msg.tid, ErrorCode.INCOMPLETE, ERROR_TEXTS["put_hash"])]
        if not self._tokens.check(msg.token, addr):
            return [self.encoder.error(msg.tid, ErrorCode.UNAUTHORIZED, ERROR_TEXTS["put_token"])]
        self._validation.validate(addr)  # a token is only ever sent to the address it is bound to
        if 0 in [v.id for v in msg.values]:
            return [self.encoder.error(msg.tid, ErrorCode.INCOMPLETE, ERROR_TEXTS["put_id"])]
        created = self._created_from_wire(msg.created, now)
        store_here = self._is_close_enough(msg.info_hash, is_ipv6(addr[0]), now)
        out = []
        for value in msg.values:
            if store_here:
                self._store(msg.info_hash, value, now, created=created, source=addr[0])
            out.append(self.encoder.reply(msg.tid, {"vid": value.id, "sa": sa}))
        return out

    def _handle_refresh(self, msg: Message, addr: Address, sa: bytes, now: float) -> list[bytes]:
        if msg.info_hash is None:
            return [self.encoder.error(msg.tid, ErrorCode.INCOMPLETE, ERROR_TEXTS["put_hash"])]
        if not self._tokens.check(msg.token, addr):
            return [self.encoder.error(msg.tid, ErrorCode.UNAUTHORIZED, ERROR_TEXTS["put_token"])]
        self._validation.validate(addr)
        vid = msg.value_id or 0
        if self.storage.refresh(msg.info_hash, vid, now) is None:
            return [self.encoder.error(msg.tid, ErrorCode.NOT_FOUND, ERROR_TEXTS["refresh_unknown"])]
        self._push_ids(msg.info_hash, "re", [vid])
        return [self.encoder.reply(msg.tid, {"vid": vid, "sa": sa})]

    def _handle_listen(self, msg: Message, addr: Address, sa: bytes, now: float) -> list[bytes]:
        if msg.info_hash is None:
            return [self.encoder.error(msg.tid, ErrorCode.INCOMPLETE, ERROR_TEXTS["listen_hash"])]
        if not self._tokens.check(msg.token, addr):
            return [self.encoder.error(msg.tid, ErrorCode.UNAUTHORIZED, ERROR_TEXTS["listen_token"])]
        self._validation.validate(addr)
        assert msg.sender is not None
        sid = msg.sid if msg.sid is not None else msg.tid
        try:
            new = self.remote_listeners.listen(msg.info_hash, msg.sender, sid, addr, msg.query, now)
        except TooManyListeners:
            return [self.encoder.error(msg.tid, ErrorCode.INCOMPLETE, ERROR_TEXTS["listen_full"])]
        if new:
            values = self.storage.get(msg.info_hash, msg.query)
            if values:
                self._send_update(addr, msg.sender, sid, {"ve": 1, "h": msg.info_hash}, values)
        return [self.encoder.reply(msg.tid, {"sa": sa, "token": self._tokens.issue(addr)})]

    def _handle_update(self, msg: Message, addr: Address, sa: bytes, now: float) -> list[bytes]:
        assert msg.sender is not None
        sock = (msg.sender, msg.sid if msg.sid is not None else -1)
        kl = self.listens.by_socket.get(sock)
        if kl is not None:
            target = kl.targets.get(sock)
            if target is not None and msg.token:
                target.token = msg.token
            for value in msg.values:
                self.listens.deliver(kl.key, value, now + type_expiration(value.type))
            for vid in msg.refreshed:
                cached = kl.values.get(vid)
                if cached is not None:
                    self.listens.refresh(kl.key, vid, now + type_expiration(cached[0].type))
            for vid in msg.expired:
                self.listens.expire(kl.key, vid)
            self._listens_changed()
        return [self.encoder.reply(msg.tid, {"sa": sa})]

    # -- storage and push to listeners ----------------------------------------------------------------------

    @staticmethod
    def _created_from_wire(created: int | None, now: float) -> float | None:
        if created is None:
            return None
        return now - max(0.0, time.time() - created)

    def _is_close_enough(self, key: InfoHash, v6: bool, now: float) -> bool:
        """OpenDHT stores only if fewer than 14 known good nodes are closer to ``key`` than itself."""
        table = self.tables[v6]
        if len(table) < STORE_CLOSENESS:
            return True  # fewer nodes known at all
        closest = table.closest(key, STORE_CLOSENESS, now=now)
        if len(closest) < STORE_CLOSENESS:
            return True
        return closest[-1].id.distance(key) >= self._id.distance(key)

    def _store(
        self,
        key: InfoHash,
        value: Value,
        now: float,
        *,
        created: float | None = None,
        source: str | None = None,
        local: bool = False,
        permanent: bool = False,
    ) -> None:
        result = self.storage.put(
            key, value, now, created=created, source=source, local=local, permanent=permanent
        )
        stored = self.storage.stored(key, value.id)
        if stored is not None and stored.expiration < self._expiry_at:
            self._expiry_wake.set()  # the expiry loop is waiting for a later (or no) expiration
        for ekey, vid in result.evicted:
            self._on_expired(ekey, [vid])
        if result.outcome in (PutOutcome.STORED, PutOutcome.EDITED):
            if key in self.listens.by_key:
                self.listens.deliver(key, value, _expiry(stored, value, now))
                self._listens_changed()
            for rl in self.remote_listeners.for_new_value(key, value):
                self._send_update(rl.addr, rl.node_id, rl.sid, {"ve": 1, "h": key}, [value])
        elif result.outcome is PutOutcome.REFRESHED:
            self._push_ids(key, "re", [value.id])

    def _expiration(self, key: InfoHash, value: Value, now: float) -> float:
        """When a value we store expires (never, for our permanent puts)."""
        return _expiry(self.storage.stored(key, value.id), value, now)

    def _push_ids(self, key: InfoHash, field_name: str, vids: list[int]) -> None:
        for rl in self.remote_listeners.for_key(key):
            self._send_update(rl.addr, rl.node_id, rl.sid, {field_name: vids}, None)

    def _on_expired(self, key: InfoHash, vids: list[int]) -> None:
        for vid in vids:
            self.listens.expire(key, vid)
        self._push_ids(key, "exp", vids)

    def _send_update(
        self, addr: Address, node_id: InfoHash, sid: int, args: dict[str, Any], values: list[Value] | None
    ) -> None:
        token = self._tokens.issue(addr)
        # Key order as real nodes pack them: ve, h, sid, values, token; for re/exp: sid, token, ids.
        full = (
            {**args, "sid": sid, "token": token}
            if values is not None
            else {"sid": sid, "token": token, **args}
        )

        def done(reply: Message | None) -> None:
            if reply is None or reply.kind is Kind.ERROR:
                self.remote_listeners.remove_node(node_id)

        self.start_request(addr, "update", full, done, node_id=node_id, values=values)

    async def _expiry_loop(self) -> None:
        """Expire stored values at their exact time, and tell listeners."""
        while True:
            nxt = self.storage.next_expiration()
            self._expiry_at = nxt if nxt is not None else math.inf
            self._expiry_wake = trio.Event()
            with trio.move_on_at(self._expiry_at):
                await self._expiry_wake.wait()
            for key, vids in self.storage.expire(trio.current_time()):
                self._on_expired(key, vids)

    # -- maintenance ----------------------------------------------------------------------------------------

    async def _confirm_loop(self) -> None:
        """Ping nodes we heard of, so the routing table fills with good nodes (the queue's pings are sent
        here, after the datagram that queued them was answered, and as earlier pings end)."""
        while True:
            await self._confirm_wake.wait()
            self._confirm_wake = trio.Event()
            self._confirms.send(self._clock, self._ping_to_confirm)

    async def _maintenance_loop(self) -> None:
        await trio.sleep(random.uniform(3, 5))
        while True:
            now = trio.current_time()
            self._tokens.maybe_rotate(now)
            self._reassembler.expire(now)
            self.remote_listeners.expire(now, LISTENER_EXPIRE)
            worked = False
            for v6, table in self.tables.items():
                if v6 not in self._socks:
                    continue
                for node in table.remove_expired():
                    self._confirm(node)
                for target, node in table.stale_buckets(now):
                    if node is not None:
                        worked = True
                        self._spawn_find(node, target)
                if now - table.grown_at < 60:
                    nodes = table.closest(self._id, 1, now=now)
                    if nodes:
                        worked = True
                        self._spawn_find(nodes[0], InfoHash(self._id[:-1] + bytes([random.randrange(256)])))
            await trio.sleep(random.uniform(5, 25) if worked else random.uniform(60, 180))

    def _spawn_find(self, node: Node, target: InfoHash) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._maintenance_find, node, target)

    async def _maintenance_find(self, node: Node, target: InfoHash) -> None:
        with trio.move_on_after(FAIL_AFTER + 1):
            with contextlib.suppress(RequestFailed):
                await self.request(node.addr, "find", {"target": target, "w": [2, 10]}, node_id=node.id)

    async def _bootstrap_loop(self) -> None:
        """Ping the bootstrap nodes until connected (retry after 10 s, doubling), then search our own id."""
        delay = 10.0
        while True:
            addrs = await self._resolve(self._bootstrap)
            async with trio.open_nursery() as nursery:
                for addr in addrs:
                    nursery.start_soon(self._bootstrap_ping, addr)
            if self.is_connected():
                break
            await trio.sleep(delay)
            delay = min(delay * 2, 24 * 3600)
        for v6 in self._socks:
            await self._search(self._id, v6, "find", {"target": self._id})

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
                if is_ipv6(addr[0]) in self._socks and addr not in out:
                    out.append(addr)
        return out

    # -- searches -------------------------------------------------------------------------------------------

    def _search_start(self, target: InfoHash, v6: bool) -> SearchState:
        state = SearchState(target)
        now = trio.current_time()
        for node in self.tables[v6].closest(target, 2 * K, now=now, good_only=False):
            if not node.expired:
                state.add(node)
        return state

    def _start_search(
        self,
        target: InfoHash,
        v6: bool,
        method: str,
        args: dict[str, Any],
        on_done: Callable[[SearchState], None],
        on_reply: Callable[[SearchNode, Message], None] | None = None,
    ) -> Callable[[], None]:
        """Iterative lookup: ask the closest nodes (4 in flight) until the 8 closest answered with a token,
        then ``on_done(state)`` (at once if there is nobody to ask). No task: each reply, failure or slow
        request takes the next step. Returns a function that stops it (``on_done`` is then never called)."""
        state = self._search_start(target, v6)
        out: set[int] = set()  # transaction ids of the requests in flight
        table = self.tables[v6]
        finished = False

        def stop() -> None:
            nonlocal finished
            finished = True
            for tid in out:
                self.abandon_request(tid)
            out.clear()

        def step() -> None:
            if finished:
                return
            if not state.done:
                for sn in state.next_nodes():
                    ask(sn)
            if state.done or not state.waiting:
                stop()
                on_done(state)

        def ask(sn: SearchNode) -> None:
            tid = 0

            def slow() -> None:
                state.on_slow(sn.node.id)
                step()

            def done(reply: Message | None) -> None:
                out.discard(tid)
                try:
                    if reply is None or reply.kind is Kind.ERROR:
                        state.on_failure(sn.node.id)
                        return
                    state.on_reply(sn.node.id, reply.token)
                    for nid, addr in self._usable_records(reply.nodes6 if v6 else reply.nodes4, sn.node.addr):
                        state.add(table.get(nid) or Node(nid, addr))
                    if on_reply is not None:
                        on_reply(sn, reply)
                finally:
                    step()

            tid = self.start_request(sn.node.addr, method, args, done, node_id=sn.node.id, on_slow=slow)
            out.add(tid)

        step()
        return stop

    async def _search(
        self,
        target: InfoHash,
        v6: bool,
        method: str,
        args: dict[str, Any],
        on_reply: Callable[[SearchNode, Message], None] | None = None,
    ) -> SearchState:
        """:meth:`_start_search`, awaited."""
        return await _wait_for(lambda done: self._start_search(target, v6, method, args, done, on_reply))

    async def _each_family(self, fn: Callable[[bool], Awaitable[Any]]) -> None:
        """``await fn(v6)`` for each address family with known nodes, concurrently if both."""
        now = trio.current_time()
        families = [
            v6 for v6 in self._socks if self.tables[v6].closest(self._id, 1, now=now, good_only=False)
        ]
        if len(families) == 1:
            await fn(families[0])
            return
        async with trio.open_nursery() as nursery:
            for v6 in families:
                nursery.start_soon(fn, v6)

    # -- public operations ----------------------------------------------------------------------------------

    async def get(
        self, key: InfoHash, query: Query | None = None, *, on_values: GetCallback | None = None
    ) -> list[Value]:
        """All values found under ``key`` (local storage and the closest nodes), merged by id."""
        found: dict[int, Value] = {}

        def add(values: Iterable[Value]) -> None:
            new = []
            for v in values:
                if (query is None or query.matches(v)) and v.id not in found:
                    found[v.id] = v
                    new.append(v)
            if new and on_values is not None:
                on_values(new)

        add(self.storage.get(key, query))
        where = query.where if query is not None else ()
        rnd = self._get_rounds.get((key, where))
        if rnd is None:
            rnd = self._get_rounds[(key, where)] = _GetRound()
            assert self._nursery is not None
            self._nursery.start_soon(self._run_get_round, key, where, rnd)
        add(rnd.found.values())
        rnd.callbacks.append(add)
        try:
            await rnd.done.wait()
        finally:
            rnd.callbacks.remove(add)
            if not rnd.callbacks and not rnd.done.is_set():  # nobody waits for it any more
                rnd.scope.cancel()
                if self._get_rounds.get((key, where)) is rnd:
                    del self._get_rounds[(key, where)]
        return list(found.values())

    async def _run_get_round(self, key: InfoHash, where: tuple[tuple[int, Any], ...], rnd: _GetRound) -> None:
        args: dict[str, Any] = {"h": key}
        if where:
            args["q"] = Query((), where).to_wire()
        try:
            with rnd.scope:
                await self._each_family(lambda v6: self._search(key, v6, "get", args, rnd.on_reply))
        except Exception:  # the callers get what was found; the node goes on
            log.exception("get on %s failed", key.hex())
        finally:
            if self._get_rounds.get((key, where)) is rnd:
                del self._get_rounds[(key, where)]
            rnd.done.set()

    async def put(self, key: InfoHash, value: Value, *, permanent: bool = False) -> bool:
        """Store locally, then announce to the 8 closest nodes; True if stored anywhere."""
        if not value.id:
            value.id = random_value_id()
        now = trio.current_time()
        self._store(key, value, now, local=True, permanent=permanent)
        if key in self.listens.by_key:
            # What local listeners started (a push) goes out before the announce: the first step lets the
            # tasks they spawned start (Trio runs a step's tasks in no fixed order), the second lets those
            # run to their first wait (the push's send) before this task goes on.
            await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()
        ok = await self._announce(key, value)
        if permanent:
            assert self._nursery is not None
            scope = trio.CancelScope()
            old = self._permanent.pop((key, value.id), None)
            if old is not None:
                old.cancel()
            self._permanent[(key, value.id)] = scope
            self._nursery.start_soon(self._reannounce, key, value, scope)
        return ok or self.storage.get_value(key, value.id) is not None

    async def _announce(self, key: InfoHash, value: Value) -> bool:
        acked = 0

        async def announce_family(v6: bool) -> None:
            nonlocal acked
            state = await self._search(key, v6, "find", {"target": key})
            created = int(time.time())
            replies = await self.request_all(
                [
                    (sn.node.addr, "put", {"h": key, "c": created, "token": sn.token}, sn.node.id, [value])
                    for sn in state.synced(K)
                ]
            )
            acked += sum(1 for reply in replies if reply is not None and reply.value_id == value.id)

        await self._each_family(announce_family)
        return acked > 0

    async def _reannounce(self, key: InfoHash, value: Value, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                await trio.sleep(max(1.0, type_expiration(value.type) - 10))
                await self._announce(key, value)

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

        Costs no task: every listener of a key shares one remote listen, kept by the node's listen workers.
        Stop it with ``listener.cancel()``.
        """
        now = trio.current_time()
        new_key = key not in self.listens.by_key
        listener = self.listens.add(key, query, callback)
        kl = self.listens.by_key[key]
        for v in self.storage.get(key):
            self.listens.deliver(key, v, self._expiration(key, v, now))
        if not new_key:
            self._listens_changed()  # a value delivered may expire sooner than the driver planned to wake
        elif self._listen_setup_queue is not None:
            # A new listen looks for its nodes first: to the setups at once (no heap entry, no wake-up).
            self._listen_setup_queue.send_nowait(kl)
        else:  # before the driver runs
            self.listens.schedule(kl, now)
            self._listens_changed()
        return listener

    @asynccontextmanager
    async def listen(
        self, key: InfoHash, query: Query | None = None
    ) -> AsyncIterator[AsyncIterator[ValueEvent]]:
        """Values under ``key`` as they appear (current ones first) and expire, until the block exits."""
        send, recv = trio.open_memory_channel[ValueEvent](math.inf)
        listener = self.add_listener(key, send.send_nowait, query)
        try:
            async with recv:
                yield recv
        finally:
            listener.cancel()
            send.close()

    def _listens_changed(self) -> None:
        """Wake the listen driver if a listen refresh or a cached value's expiry is now due before it planned
        to wake (not for each value delivered or refresh done: most change nothing it waits for)."""
        if self.listens.next_wake() < self._listen_wake_at:
            self._listen_wake.set()

    async def _listen_driver(self) -> None:
        """Expire cached listen values and refresh remote listens when due.

        A refresh that only re-sends ``listen`` to the nodes holding it (every 20 s, the steady state) is sent
        from here and finished in its replies' callbacks, with no task; at most ``LISTEN_REFRESHES_IN_FLIGHT``
        await their replies. One that must look for the storing nodes first (a lost node, the 10 min re-sync)
        is queued for :meth:`_listen_setups`; a new listen is queued there at once by :meth:`add_listener`
        (it needs no heap entry nor a wake-up of this task: under a burst of new subscriptions, that was a
        wake-up per scheduling pass).
        """
        send, recv = trio.open_memory_channel[KeyListen](math.inf)
        slots = trio.Semaphore(LISTEN_REFRESHES_IN_FLIGHT)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._listen_setups, recv)
            self._listen_setup_queue = send
            try:
                await self._drive_listens(send, slots)
            finally:
                self._listen_setup_queue = None

    async def _drive_listens(self, setups: trio.MemorySendChannel[KeyListen], slots: trio.Semaphore) -> None:
        """The listen driver's loop: sleep until the next due time (or a wake-up), then act on what is due."""
        while True:
            self._listen_wake = trio.Event()
            self._listen_wake_at = self.listens.next_wake()
            with trio.move_on_at(self._listen_wake_at):
                await self._listen_wake.wait()
            self._listen_wake_at = -math.inf  # busy: nobody need wake it
            now = trio.current_time()
            self.listens.expire_due(now)
            for i, kl in enumerate(self.listens.pop_due(now), 1):
                if not self.listens.is_live(kl):
                    continue
                if self._search_families(kl, trio.current_time()):
                    setups.send_nowait(kl)
                    continue
                if i % 64 == 0:
                    await trio.lowlevel.checkpoint()  # a burst of refreshes lets other tasks run
                try:
                    slots.acquire_nowait()
                except trio.WouldBlock:
                    await slots.acquire()
                self._refresh_listen(kl, [], self._listen_finisher(kl, slots))

    async def _listen_setups(self, due: trio.MemoryReceiveChannel[KeyListen]) -> None:
        """Start the refreshes that look for storing nodes first: one per scheduling pass, at most
        ``LISTEN_SETUPS_IN_FLIGHT`` at once. Each runs on callbacks, so a slow network lets many be in
        flight; a fast one (loopback) still gets one new start per pass, so that a burst of new listens
        shares the process with requests being served instead of taking it."""
        slots = trio.Semaphore(LISTEN_SETUPS_IN_FLIGHT)
        async for kl in due:
            if not self.listens.is_live(kl):
                continue
            await slots.acquire()  # always a scheduling point: one start per pass
            self._refresh_listen(
                kl, self._search_families(kl, trio.current_time()), self._listen_finisher(kl, slots)
            )

    def _listen_finisher(self, kl: KeyListen, slots: trio.Semaphore) -> Callable[[bool], None]:
        """What ends one refresh of ``kl`` (once): its slot freed, its next refresh scheduled."""
        finished = False

        def finish(held: bool) -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            slots.release()
            self._listen_refreshed(kl, held)

        return finish

    def _listen_refreshed(self, kl: KeyListen, found: bool) -> None:
        """Schedule a listen's next refresh: in 20 s; with no node to hold it, retry after 5 s, backing off to
        1 min."""
        if self.listens.is_live(kl) and not kl.scheduled:
            kl.retry = 0.0 if found else min(2 * kl.retry or LISTEN_RETRY, LISTEN_RETRY_MAX)
            self.listens.schedule(kl, trio.current_time() + (self.listen_refresh if found else kl.retry))
            self._listens_changed()

    def _search_families(self, kl: KeyListen, now: float) -> list[bool]:
        """The address families (``v6``) whose storing nodes a listen must look for before its refresh.

        They are looked for again (a ``find`` search) when none holds the listen, every 10 min, and when fewer
        than 4 hold it while the routing table has grown since the last look; not at every 20 s refresh of a
        network with fewer than 4 nodes, which would double a refresh's traffic.
        """
        families = []
        for v6 in self._socks:
            table = self.tables[v6]
            if not table.closest(kl.key, 1, now=now, good_only=False):
                continue  # no node known: nothing to search
            have = sum(1 for t in kl.targets.values() if t.v6 == v6)
            last = kl.searched.get(v6)
            if (
                last is None
                or not have
                or now - last[0] > LISTEN_RESYNC
                or (have < LISTEN_NODES and len(table) > last[1])
            ):
                families.append(v6)
        return families

    def _refresh_listen(self, kl: KeyListen, families: list[bool], on_done: Callable[[bool], None]) -> None:
        """Look for the listen's storing nodes in ``families`` (a ``find`` search each, at once), then
        (re)send ``listen`` to each node that holds it (:meth:`_send_listens`); ``on_done(held)`` at the end,
        also after a failure (logged). No task."""
        left = len(families)

        def searched(v6: bool, known: int, state: SearchState) -> None:
            nonlocal left
            try:
                kl.searched[v6] = (trio.current_time(), known)
                old = {t.node.id: t for t in kl.targets.values() if t.v6 == v6}
                targets = [
                    old.get(sn.node.id) or ListenTarget(sn.node, self._next_tid(), sn.token or b"", v6)
                    for sn in state.synced(LISTEN_NODES)
                ]
                for t in targets:
                    t.token = state.get(t.node.id).token or t.token  # a fresh token from this search
                self.listens.set_targets(kl, v6, targets)
                left -= 1
                if not left:
                    self._send_listens(kl, on_done)
            except Exception:
                log.exception("listen refresh for %s failed", kl.key.hex())
                on_done(False)

        try:
            if not families:
                self._send_listens(kl, on_done)
            for v6 in families:
                known = len(self.tables[v6])
                self._start_search(
                    kl.key, v6, "find", {"target": kl.key}, functools.partial(searched, v6, known)
                )
        except Exception:
            log.exception("listen refresh for %s failed", kl.key.hex())
            on_done(False)

    def _send_listens(self, kl: KeyListen, on_done: Callable[[bool], None]) -> None:
        """Send ``listen`` to each node that holds (or should hold) the listen; ``on_done(held)`` once all
        answered or failed, with whether any holds it. A node that did not answer is dropped, and the next
        refresh looks for others."""
        targets = list(kl.targets.items())
        queries = [listener.query for listener in kl.listeners]
        where = None
        if queries and all(q is not None and q.where for q in queries) and len(set(queries)) == 1:
            where = Query((), queries[0].where).to_wire()  # one shared filter: let the node apply it
        requests = []
        for _, target in targets:
            args: dict[str, Any] = {"ve": 1, "h": kl.key, "token": target.token, "sid": target.sid}
            if where is not None:
                args["q"] = where
            requests.append((target.node.addr, "listen", args, target.node.id, None))

        def replied(replies: list[Message | None]) -> None:
            held = 0
            for (sock, target), reply in zip(targets, replies, strict=True):
                if reply is None:
                    self.listens.drop_target(kl, sock)
                    kl.searched.clear()  # find other nodes next time
                    continue
                if reply.token:
                    target.token = reply.token
                held += 1
            on_done(held > 0)

        self.start_requests(requests, replied)


# Request handlers by method (``decode`` admits only these methods).
_HANDLERS: dict[str, Callable[[DhtNode, Message, Address, bytes, float], list[bytes]]] = {
    method: getattr(DhtNode, "_handle_" + method) for method in METHODS
}


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
    rate_limiter: RateLimiter | None = None,
    limits: Limits = DEFAULT,
) -> AsyncIterator[DhtNode]:
    """Run a DHT node for the duration of the block.

    ``async with open_node(port=4222, bootstrap=[("bootstrap.jami.net", 4222)]) as node:``. It binds UDP on
    ``host`` (and ``host6`` for IPv6, when given and available) and pings the bootstrap nodes in the
    background.
    """
    node = DhtNode(
        node_id=node_id,
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
