"""The node's protocol: what it does with each datagram, sans-IO.

:class:`NodeProtocol` takes a datagram, its source address and the time (``datagram_received(data, addr,
now)``) and answers through its ``send`` hook, synchronously: it decodes, drops what a real node drops
(martian sources, other networks, our own id, rate-limited sources, fragments nobody asked for), reassembles
fragmented messages, answers requests (the ``_handle_<method>`` handlers), matches replies to the requests it
sent (:class:`~trio_dht.node.transactions.RequestTracker`) and learns nodes from both. It owns the node's
state: routing tables, storage and its store rules, remote listeners, local listens' value caches, write
tokens, address validation and the confirmation queue.

It reads no clock and owns no socket nor task. Every entry point takes ``now`` (seconds on the shell's
monotonic clock); a put's creation time ``c`` is wall-clock seconds, read through the ``wall_clock`` passed
in. What it needs from its shell are hooks, plain callables set after construction (no-ops by default, so
tests drive it without any):

- ``send(data, addr)``: send a datagram;
- ``wake_requests()``: a request was started that is due before ``requests_at``, when the shell planned to
  call :meth:`NodeProtocol.timer` next;
- ``wake_expiry()``: a value was stored that expires before ``expiry_at``, when the shell planned to call
  :meth:`NodeProtocol.expire` next;
- ``wake_confirms()``: nodes wait for a confirmation ping: call :meth:`NodeProtocol.send_confirmations`;
- ``listens_changed()``: a local listen's cache changed (a value may now expire sooner).
"""

from __future__ import annotations

import functools
import logging
import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from trio_dht import signature
from trio_dht.infohash import InfoHash
from trio_dht.limits import DEFAULT, Limits
from trio_dht.node.confirm import ConfirmQueue, Pushed
from trio_dht.node.local_listens import LocalListens
from trio_dht.node.ratelimit import UdpRateLimiter, source_key
from trio_dht.node.remote_listeners import ListenerBook, TooManyListeners
from trio_dht.node.routing import K, Node, RoutingTable
from trio_dht.node.storage import PutOutcome, PutResult, Storage, StoredValue
from trio_dht.node.tokens import TokenIssuer
from trio_dht.node.transactions import Action, PendingRequest, RequestTracker
from trio_dht.node.validation import AddressValidation, smaller_answers
from trio_dht.node.value_screen import ValueScreen
from trio_dht.value import Value, type_expiration
from trio_dht.wire.compact import (
    Address,
    NodeRecord,
    is_ipv6,
    is_loopback,
    is_martian,
    pack_ip,
    unpack_ip,
    want_families,
)
from trio_dht.wire.message import METHODS, Encoder, ErrorCode, Kind, MalformedMessage, Message, decode
from trio_dht.wire.reassembly import Reassembler

log = logging.getLogger("trio_dht.node")

STORE_CLOSENESS = 14
"""A put is stored only if fewer than this many known good nodes are closer to its key than this node."""
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

Request = tuple[Address, str, dict[str, Any], InfoHash | None, list[Value] | None]
"""A request for :meth:`NodeProtocol.start_requests`: (address, method, args, node id, values)."""


def _nothing(*_: Any) -> None:
    """A hook the shell has not set."""


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
    """Requests received, by method."""
    requests_sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Requests sent, by method (not their resends)."""


def expiry(stored: StoredValue | None, value: Value, now: float) -> float:
    """When a value expires for local listeners: its stored expiration (never, for a permanent put), or its
    type's lifetime from ``now`` when it is not stored here."""
    return stored.expiration if stored is not None else now + type_expiration(value.type)


class NodeProtocol:
    """A node's protocol state and rules; the shell feeds it datagrams and the time."""

    def __init__(
        self,
        node_id: InfoHash,
        *,
        now: float,
        wall_clock: Callable[[], float],
        network: int = 0,
        is_client: bool = False,
        storage: Storage | None = None,
        rate_limiter: UdpRateLimiter | None = None,
        limits: Limits = DEFAULT,
    ) -> None:
        self.id = node_id
        self.network = network
        self.wall_clock = wall_clock
        self.encoder = Encoder(node_id, network, is_client)
        self.verifier = signature.Verifier(limits)
        self.storage = storage if storage is not None else Storage(verify=self.verifier.verify)
        self.remote_listeners = ListenerBook(limits)
        self.screen = ValueScreen(self.verifier, limits=limits)
        """Screens the values handed to local gets and listens (the shell gives it the node's identity)."""
        self.listens = LocalListens(self.screen.one)
        self.rate_limiter = rate_limiter if rate_limiter is not None else UdpRateLimiter(limits=limits)
        self.counters = Counters()
        self.tables = {False: RoutingTable(node_id), True: RoutingTable(node_id)}
        self.families: set[bool] = set()
        """The address families (``v6``) the node can send on; others' nodes are not learnt."""
        self.transactions = RequestTracker()
        self.reassembler = Reassembler(limits, source_key)
        self.validation = AddressValidation(limits)
        self.tokens = TokenIssuer(now)
        self.confirms = ConfirmQueue(limits)
        self.public_address: Address | None = None
        """Our address as the last node that replied saw it (with our bound port)."""
        self.bound_port = 0
        self.send: Callable[[bytes, Address], None] = _nothing
        self.wake_requests: Callable[[], None] = _nothing
        self.wake_expiry: Callable[[], None] = _nothing
        self.wake_confirms: Callable[[], None] = _nothing
        self.listens_changed: Callable[[], None] = _nothing
        self.requests_at = math.inf
        """When the shell will call :meth:`timer` next: a request due sooner wakes it (``inf``: any)."""
        self.expiry_at = math.inf
        """When the shell will call :meth:`expire` next: a value expiring sooner wakes it (``inf``: any)."""

    # -- receiving ------------------------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Address, now: float) -> None:
        """Handle one datagram from ``addr``; never raises (a bad datagram is counted and logged)."""
        counters = self.counters
        counters.received += 1
        try:
            if is_martian(addr):
                counters.dropped_martian += 1
                return
            try:
                msg = decode(data)
            except MalformedMessage:
                counters.dropped_malformed += 1
                return
            if msg.network != self.network:
                counters.dropped_network += 1
                return
            kind = msg.kind
            rate_checked = False  # a fragmented request is counted once, when its header arrives
            if kind is _FRAGMENT:  # may start a message only as the answer to a request we sent there
                pending = self.transactions.pending.get(msg.tid)
                reply = pending is not None and pending.addr == addr
                done = self.reassembler.fragment((addr, msg.tid), msg, now, reply)
                if done is None:
                    return
                msg = done
                kind = msg.kind
                rate_checked = True
            elif msg.value_sizes and (kind is _REQUEST or kind is _REPLY):  # a fragmented message's header
                if kind is _REQUEST:
                    if not self.rate_limiter.allow(addr, now):
                        counters.dropped_rate += 1
                        return
                else:  # reassembled only as the answer to a request we sent to that address
                    pending = self.transactions.pending.get(msg.tid)
                    if pending is None or pending.addr != addr:
                        counters.dropped_unsolicited += 1
                        return
                done = self.reassembler.header((addr, msg.tid), msg, now, kind is _REPLY)
                if done is None:
                    return
                msg = done
                rate_checked = True
            sender = msg.sender
            if sender is None or sender == _NO_ID or sender == self.id:
                counters.dropped_self += 1
                return
            if kind is _REQUEST:
                if not rate_checked and not self.rate_limiter.allow(addr, now):
                    counters.dropped_rate += 1
                    return
                self._on_request(msg, addr, now, len(data))
            elif kind is _REPLY or kind is _ERROR:
                self._on_reply(msg, addr, now)
        except Exception:  # one bad datagram must never take the node down
            counters.dropped_malformed += 1
            log.exception("error handling a datagram from %s", addr)

    def _on_reply(self, msg: Message, addr: Address, now: float) -> None:
        pending = self.transactions.pending.get(msg.tid)
        if pending is None:
            return
        if pending.node_id is not None and pending.node_id != msg.sender:
            return
        if pending.node_id is None and pending.addr != addr:
            return
        assert msg.sender is not None
        if pending.addr == addr:
            self.validation.validate(addr)  # it got our request there
        table = self.tables[is_ipv6(addr[0])]
        if msg.kind is Kind.REPLY:
            if not msg.is_client:
                node, to_ping = table.heard(msg.sender, addr, now, replied=True)
                if to_ping is not None:
                    self.confirm(to_ping, now)
            if msg.requester_ip is not None:
                ip = unpack_ip(msg.requester_ip)
                if ip is not None and not is_loopback(ip):
                    self.public_address = (ip, self.bound_port)
            self._learn(msg, addr, now)
        else:
            node = table.get(msg.sender)
            if node is not None and msg.error_code == ErrorCode.UNAUTHORIZED:
                node.auth_error()
        self.transactions.pop(msg.tid)
        try:
            pending.on_done(msg)
        except Exception:  # the requester's bug, not the datagram's
            log.exception("handling the reply to %s from %s failed", pending.method, addr)

    def _learn(self, msg: Message, source: Address, now: float) -> None:
        """Offer the nodes listed in a reply to the routing tables (as unconfirmed)."""
        for v6, records in ((False, msg.nodes4), (True, msg.nodes6)):
            if not records or v6 not in self.families:
                continue
            table = self.tables[v6]
            known = table.by_id
            unknown = [record for record in records if record[0] not in known]  # most are known already
            for nid, addr in self.usable_records(unknown, source):
                if table.get(nid) is None:
                    node, _ = table.heard(nid, addr, now, replied=False)
                    node.last_heard = -math.inf
                    self.confirm(node, now)

    def usable_records(self, records: list[NodeRecord], source: Address) -> list[NodeRecord]:
        """The node records of a reply from ``source`` worth contacting: not us, not martian; a loopback
        address of the source's family stands for the source's own address."""
        out = []
        for nid, addr in records:
            if nid == self.id or not nid:
                continue
            if is_loopback(addr[0]) and is_ipv6(addr[0]) == is_ipv6(source[0]):
                addr = (source[0], addr[1])
            if is_martian(addr):
                continue
            out.append((nid, addr))
        return out

    # -- confirmation pings ---------------------------------------------------------------------------------

    def confirm(self, node: Node, now: float) -> bool:
        """Queue a ping so that a node we only heard of (or from) can become good, and its address validated
        (one at a time per node; bounded, see ``node.confirm``). False if the queue is full."""
        pushed = self.confirms.push(node, now)
        if pushed is Pushed.SEND:
            self.wake_confirms()
        return pushed is not Pushed.FULL

    def send_confirmations(self, now: float) -> None:
        """Ping the queued nodes that free slots allow; each ping's end frees its slot."""
        for node in self.confirms.ready(now):
            self.start_request(
                node.addr, "ping", {}, functools.partial(self._confirmed, node), now, node_id=node.id
            )

    def _confirmed(self, node: Node, _: Message | None) -> None:
        self.confirms.done(node)
        if len(self.confirms):
            self.wake_confirms()

    # -- requests to us -------------------------------------------------------------------------------------

    def _on_request(self, msg: Message, addr: Address, now: float, size: int) -> None:
        sender = msg.sender
        assert sender is not None
        method = msg.method
        self.counters.requests[method] += 1
        v6 = is_ipv6(addr[0])
        credit = self.validation.received(addr, size)  # infinite once validated
        validated = credit == math.inf
        pinging = False
        held = self.confirms.held  # tested here, as most requests come from a node already held
        if not msg.is_client:
            node, to_ping = self.tables[v6].heard(sender, addr, now, replied=False)
            if to_ping is not None:
                self.confirm(to_ping, now)
            if node.last_replied == -math.inf or not validated:  # not good, or not at this address: confirm
                pinging = sender in held or self.confirm(node, now)
        elif not validated:  # a client is not a routing table's node, but its address is validated the same
            pinging = sender in held or self.confirm(Node(sender, addr), now)
        sa = pack_ip(addr[0])
        datagrams = _HANDLERS[method](self, msg, addr, sa, now)
        if not validated:
            datagrams = self.validation.within_credit(
                addr, method, datagrams, credit, pinging, self._smaller_answers, msg, addr, sa, now
            )
        send = self.send
        for datagram in datagrams:
            send(datagram, addr)

    def _smaller_answers(self, msg: Message, addr: Address, sa: bytes, now: float) -> Iterable[bytes]:
        """Smaller answers to a get or find (``node.validation.smaller_answers``); none to the others."""
        target = msg.target or msg.info_hash
        if (msg.method != "get" and msg.method != "find") or target is None:
            return ()
        n4, n6 = self._closest_records(target, msg.want, is_ipv6(addr[0]), now)
        token = self.tokens.issue(addr)
        return smaller_answers(self.encoder, msg.tid, msg.method, sa, token, n4, n6, K // 2)

    def _closest_records(self, target: bytes, want: list[int] | None, requester_v6: bool, now: float):
        v4, v6 = want_families(want, requester_v6)
        return (
            self._family_records(False, target, now) if v4 else [],
            self._family_records(True, target, now) if v6 else [],
        )

    def _family_records(self, v6: bool, target: bytes, now: float) -> list[NodeRecord]:
        if v6 not in self.families:
            return []
        return [(n.id, n.addr) for n in self.tables[v6].closest(target, K, now=now)]

    def _handle_ping(self, msg: Message, addr: Address, sa: bytes, now: float) -> list[bytes]:
        return [self.encoder.reply(msg.tid, {"sa": sa})]

    def _handle_find(self, msg: Message, addr: Address, sa: bytes, now: float) -> list[bytes]:
        target = msg.target or msg.info_hash
        if target is None:
            return [self.encoder.error(msg.tid, ErrorCode.INCOMPLETE, "Find with no target")]
        n4, n6 = self._closest_records(target, msg.want, is_ipv6(addr[0]), now)
        return [self.encoder.reply(msg.tid, Encoder.nodes_body(sa, n4, n6, self.tokens.issue(addr)))]

    def _handle_get(self, msg: Message, addr: Address, sa: bytes, now: float) -> list[bytes]:
        if msg.info_hash is None:
            return [self.encoder.error(msg.tid, ErrorCode.INCOMPLETE, ERROR_TEXTS["get_hash"])]
        n4, n6 = self._closest_records(msg.info_hash, msg.want, is_ipv6(addr[0]), now)
        body = Encoder.nodes_body(sa, n4, n6, self.tokens.issue(addr))
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
        if not self.tokens.check(msg.token, addr):
            return [self.encoder.error(msg.tid, ErrorCode.UNAUTHORIZED, ERROR_TEXTS["put_token"])]
        self.validation.validate(addr)  # a token is only ever sent to the address it is bound to
        if 0 in [v.id for v in msg.values]:
            return [self.encoder.error(msg.tid, ErrorCode.INCOMPLETE, ERROR_TEXTS["put_id"])]
        created = self._created_from_wire(msg.created, now)
        store_here = self._is_close_enough(msg.info_hash, is_ipv6(addr[0]), now)
        out = []
        for value in msg.values:
            if store_here:
                self.store(msg.info_hash, value, now, created=created, source=addr[0])
            out.append(self.encoder.reply(msg.tid, {"vid": value.id, "sa": sa}))
        return out

    def _handle_refresh(self, msg: Message, addr: Address, sa: bytes, now: float) -> list[bytes]:
        if msg.info_hash is None:
            return [self.encoder.error(msg.tid, ErrorCode.INCOMPLETE, ERROR_TEXTS["put_hash"])]
        if not self.tokens.check(msg.token, addr):
            return [self.encoder.error(msg.tid, ErrorCode.UNAUTHORIZED, ERROR_TEXTS["put_token"])]
        self.validation.validate(addr)
        vid = msg.value_id or 0
        if self.storage.refresh(msg.info_hash, vid, now) is None:
            return [self.encoder.error(msg.tid, ErrorCode.NOT_FOUND, ERROR_TEXTS["refresh_unknown"])]
        self._push_ids(msg.info_hash, "re", [vid], now)
        return [self.encoder.reply(msg.tid, {"vid": vid, "sa": sa})]

    def _handle_listen(self, msg: Message, addr: Address, sa: bytes, now: float) -> list[bytes]:
        if msg.info_hash is None:
            return [self.encoder.error(msg.tid, ErrorCode.INCOMPLETE, ERROR_TEXTS["listen_hash"])]
        if not self.tokens.check(msg.token, addr):
            return [self.encoder.error(msg.tid, ErrorCode.UNAUTHORIZED, ERROR_TEXTS["listen_token"])]
        self.validation.validate(addr)
        assert msg.sender is not None
        sid = msg.sid if msg.sid is not None else msg.tid
        try:
            new = self.remote_listeners.listen(msg.info_hash, msg.sender, sid, addr, msg.query, now)
        except TooManyListeners:
            return [self.encoder.error(msg.tid, ErrorCode.INCOMPLETE, ERROR_TEXTS["listen_full"])]
        if new:
            values = self.storage.get(msg.info_hash, msg.query)
            if values:
                self._send_update(addr, msg.sender, sid, {"ve": 1, "h": msg.info_hash}, values, now)
        return [self.encoder.reply(msg.tid, {"sa": sa, "token": self.tokens.issue(addr)})]

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
            self.listens_changed()
        return [self.encoder.reply(msg.tid, {"sa": sa})]

    # -- storage and pushes to remote listeners -------------------------------------------------------------

    def _created_from_wire(self, created: int | None, now: float) -> float | None:
        """A put's creation time ``c`` (wall-clock seconds) on the ``now`` clock; never in the future."""
        if created is None:
            return None
        return now - max(0.0, self.wall_clock() - created)

    def _is_close_enough(self, key: InfoHash, v6: bool, now: float) -> bool:
        """Store only if fewer than 14 known good nodes are closer to ``key`` than this node (as OpenDHT)."""
        table = self.tables[v6]
        if len(table) < STORE_CLOSENESS:
            return True  # fewer nodes known at all
        closest = table.closest(key, STORE_CLOSENESS, now=now)
        if len(closest) < STORE_CLOSENESS:
            return True
        return closest[-1].id.distance(key) >= self.id.distance(key)

    def store(self, key: InfoHash, value: Value, now: float, **options: Any) -> PutResult:
        """Store a value (a remote put's, ours with ``local=True``, or one restored after a restart) and tell
        local and remote listeners; ``options`` as :meth:`Storage.put <trio_dht.node.storage.Storage.put>`,
        whose result it returns."""
        result = self.storage.put(key, value, now, **options)
        stored = self.storage.stored(key, value.id)
        if stored is not None and stored.expiration < self.expiry_at:
            self.wake_expiry()  # the shell waits for a later (or no) expiration
        for ekey, vid in result.evicted:
            self._on_expired(ekey, [vid], now)
        if result.outcome in (PutOutcome.STORED, PutOutcome.EDITED):
            if key in self.listens.by_key:
                self.listens.deliver(key, value, expiry(stored, value, now))
                self.listens_changed()
            for rl in self.remote_listeners.for_new_value(key, value):
                self._send_update(rl.addr, rl.node_id, rl.sid, {"ve": 1, "h": key}, [value], now)
        elif result.outcome is PutOutcome.REFRESHED:
            self._push_ids(key, "re", [value.id], now)
        return result

    def expiration(self, key: InfoHash, value: Value, now: float) -> float:
        """When a value we store expires (never, for our permanent puts)."""
        return expiry(self.storage.stored(key, value.id), value, now)

    def expire(self, now: float) -> None:
        """Remove the values expired by ``now``, and tell local and remote listeners."""
        for key, vids in self.storage.expire(now):
            self._on_expired(key, vids, now)

    def _on_expired(self, key: InfoHash, vids: list[int], now: float) -> None:
        for vid in vids:
            self.listens.expire(key, vid)
        self._push_ids(key, "exp", vids, now)

    def _push_ids(self, key: InfoHash, field_name: str, vids: list[int], now: float) -> None:
        for rl in self.remote_listeners.for_key(key):
            self._send_update(rl.addr, rl.node_id, rl.sid, {field_name: vids}, None, now)

    def _send_update(
        self,
        addr: Address,
        node_id: InfoHash,
        sid: int,
        args: dict[str, Any],
        values: list[Value] | None,
        now: float,
    ) -> None:
        token = self.tokens.issue(addr)
        # Key order as real nodes pack them: ve, h, sid, values, token; for re/exp: sid, token, ids.
        full = (
            {**args, "sid": sid, "token": token}
            if values is not None
            else {"sid": sid, "token": token, **args}
        )

        def done(reply: Message | None) -> None:
            if reply is None or reply.kind is Kind.ERROR:
                self.remote_listeners.remove_node(node_id)

        self.start_request(addr, "update", full, done, now, node_id=node_id, values=values)

    # -- requests we send -----------------------------------------------------------------------------------

    def start_request(
        self,
        addr: Address,
        method: str,
        args: dict[str, Any],
        on_done: Callable[[Message | None], None],
        now: float,
        *,
        node_id: InfoHash | None = None,
        values: list[Value] | None = None,
        on_slow: Callable[[], None] | None = None,
    ) -> int:
        """Send a request, resent on OpenDHT's schedule by :meth:`timer`; ``on_done`` gets the reply (or error
        reply), or None if none came. Returns its transaction id (for :meth:`abandon_request`)."""
        transactions = self.transactions
        tid = transactions.new_tid()
        datagrams = (
            self.encoder.request_with_values(tid, method, args, values)
            if values is not None
            else [self.encoder.request(tid, method, args)]
        )
        request = PendingRequest(tid, addr, node_id, method, datagrams, on_done, on_slow, now)
        self.counters.requests_sent[method] += 1
        if transactions.add(request) < self.requests_at:
            self.wake_requests()
        send = self.send
        for d in datagrams:
            send(d, addr)
        return tid

    def abandon_request(self, tid: int) -> None:
        """Forget a pending request: its reply is ignored and its callback never called."""
        self.transactions.pop(tid)

    def start_requests(
        self, requests: list[Request], on_done: Callable[[list[Message | None]], None], now: float
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
            tids.append(
                self.start_request(addr, method, args, finisher(i), now, node_id=node_id, values=values)
            )
        if not requests:
            on_done(replies)

        def abandon() -> None:
            for tid in tids:
                self.abandon_request(tid)

        return abandon

    def timer(self, now: float) -> None:
        """Retransmit, report slow requests and fail unanswered ones, as due by ``now``."""
        for request, action in self.transactions.due(now):
            try:
                if action is Action.RESEND:
                    for d in request.datagrams:
                        self.send(d, request.addr)
                elif action is Action.SLOW:
                    assert request.on_slow is not None
                    request.on_slow()
                else:
                    if request.node_id is not None:
                        self.tables[is_ipv6(request.addr[0])].request_failed(request.node_id)
                    request.on_done(None)
            except Exception:  # a callback's bug must not stop every other request's timer
                log.exception("%s to %s failed in its %s step", request.method, request.addr, action)

    # -- upkeep ---------------------------------------------------------------------------------------------

    def maintain(self, now: float) -> list[tuple[Node, InfoHash]]:
        """Rotate write tokens, drop stale reassemblies and silent remote listeners, queue expired nodes for a
        confirmation ping. Returns the ``find`` requests (node, target) to send: one per stale bucket, and one
        near our own id while the routing table grew in the last minute."""
        self.tokens.maybe_rotate(now)
        self.reassembler.expire(now)
        self.remote_listeners.expire(now)
        finds = []
        for v6, table in self.tables.items():
            if v6 not in self.families:
                continue
            for node in table.remove_expired():
                self.confirm(node, now)
            for target, node in table.stale_buckets(now):
                if node is not None:
                    finds.append((node, target))
            if now - table.grown_at < 60:
                nodes = table.closest(self.id, 1, now=now)
                if nodes:
                    finds.append((nodes[0], InfoHash(self.id[:-1] + bytes([random.randrange(256)]))))
        return finds


# Request handlers by method (``decode`` admits only these methods).
_HANDLERS: dict[str, Callable[[NodeProtocol, Message, Address, bytes, float], list[bytes]]] = {
    method: getattr(NodeProtocol, "_handle_" + method) for method in METHODS
}
