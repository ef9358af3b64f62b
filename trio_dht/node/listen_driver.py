"""The listen driver: keeps the node's own listens open on the nodes that store their keys (Trio side).

Every local listener of a key shares one remote listen (:class:`~trio_dht.node.local_listens.KeyListen`), kept
alive from one heap of due times: a listen costs no task. A refresh that only re-sends ``listen`` to the
nodes holding it (every 20 s, the steady state) is sent by the driver's task and finished in its replies'
callbacks, at most :data:`LISTEN_REFRESHES_IN_FLIGHT` at once. One that must look for the storing nodes
first (a new key, a lost node, the 10 min re-sync) runs on callbacks too, at most
:data:`LISTEN_SETUPS_IN_FLIGHT` at once, started one per scheduling pass by a second task: on a slow network
many are in flight, and on a fast one a burst of new listens shares the process with the requests being
served.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from trio_dht.api import ValueEvent
from trio_dht.infohash import InfoHash
from trio_dht.node.local_listens import KeyListen, Listener, ListenTarget
from trio_dht.node.protocol import NodeProtocol, Request
from trio_dht.node.search import SearchState
from trio_dht.node.search_driver import Searches
from trio_dht.value import Query
from trio_dht.wire.message import Message

log = logging.getLogger("trio_dht.node")

LISTEN_NODES = 4
"""A listen is kept on the 4 closest nodes that answered its search with a token."""
LISTEN_REFRESH = 20.0
LISTEN_RETRY = 5.0
LISTEN_RETRY_MAX = 60.0
LISTEN_REFRESHES_IN_FLIGHT = 1024
"""Refreshes sent without a search that may await their replies at once: at a 100 ms round trip, 10 k
refreshes a second, enough for 200 k listened keys."""
LISTEN_SETUPS_IN_FLIGHT = 256
"""Listens that may be looking for their storing nodes at once."""
LISTEN_RESYNC = 10 * 60.0


class ListenDriver:
    """The node's local listens (``protocol.listens``) and the tasks that keep their remote side."""

    def __init__(self, protocol: NodeProtocol, searches: Searches) -> None:
        self.protocol = protocol
        self.listens = protocol.listens
        self.searches = searches
        self._wake = trio.Event()
        self._wake_at = -math.inf
        """When the driver plans to wake (set before it waits)."""
        self._setup_queue: trio.MemorySendChannel[KeyListen] | None = None
        """Listens to start with a search (:meth:`_setups`), while the driver runs."""

    def add_listener(
        self, key: InfoHash, callback: Callable[[ValueEvent], None], query: Query | None = None
    ) -> Listener:
        """Call ``callback`` for each value under ``key`` as it appears (stored ones first) and expires.

        Costs no task: every listener of a key shares one remote listen. Stop it with ``listener.cancel()``.
        """
        now = trio.current_time()
        new_key = key not in self.listens.by_key
        listener = self.listens.add(key, query, callback)
        kl = self.listens.by_key[key]
        for v in self.protocol.storage.get(key):
            self.listens.deliver(key, v, self.protocol.expiration(key, v, now))
        if not new_key:
            self.changed()  # a value delivered may expire sooner than the driver planned to wake
        elif self._setup_queue is not None:
            # A new listen looks for its nodes first: to the setups at once (no heap entry, no wake-up).
            self._setup_queue.send_nowait(kl)
        else:  # before the driver runs
            self.listens.schedule(kl, now)
            self.changed()
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

    def changed(self) -> None:
        """Wake the driver if a listen refresh or a cached value's expiry is now due before it planned to
        wake (not for each value delivered or refresh done: most change nothing it waits for)."""
        if self.listens.next_wake() < self._wake_at:
            self._wake.set()

    async def run(self) -> None:
        """Expire cached listen values and refresh remote listens when due, until cancelled.

        A refresh that must look for the storing nodes first is queued for :meth:`_setups`; a new listen is
        queued there at once by :meth:`add_listener` (it needs no heap entry nor a wake-up of this task).
        """
        send, recv = trio.open_memory_channel[KeyListen](math.inf)
        slots = trio.Semaphore(LISTEN_REFRESHES_IN_FLIGHT)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._setups, recv)
            self._setup_queue = send
            try:
                await self._drive(send, slots)
            finally:
                self._setup_queue = None

    async def _drive(self, setups: trio.MemorySendChannel[KeyListen], slots: trio.Semaphore) -> None:
        """Sleep until the next due time (or a wake-up), then act on what is due."""
        while True:
            self._wake = trio.Event()
            self._wake_at = self.listens.next_wake()
            with trio.move_on_at(self._wake_at):
                await self._wake.wait()
            self._wake_at = -math.inf  # busy: nobody need wake it
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
                self._refresh(kl, [], self._finisher(kl, slots))

    async def _setups(self, due: trio.MemoryReceiveChannel[KeyListen]) -> None:
        """Start the refreshes that look for storing nodes first: one per scheduling pass, at most
        ``LISTEN_SETUPS_IN_FLIGHT`` at once."""
        slots = trio.Semaphore(LISTEN_SETUPS_IN_FLIGHT)
        async for kl in due:
            if not self.listens.is_live(kl):
                continue
            await slots.acquire()  # always a scheduling point: one start per pass
            self._refresh(kl, self._search_families(kl, trio.current_time()), self._finisher(kl, slots))

    def _finisher(self, kl: KeyListen, slots: trio.Semaphore) -> Callable[[bool], None]:
        """What ends one refresh of ``kl`` (once): its slot freed, its next refresh scheduled."""
        finished = False

        def finish(held: bool) -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            slots.release()
            self._refreshed(kl, held)

        return finish

    def _refreshed(self, kl: KeyListen, found: bool) -> None:
        """Schedule a listen's next refresh: in 20 s; with no node to hold it, retry after 5 s, backing off to
        1 min."""
        if self.listens.is_live(kl) and not kl.scheduled:
            kl.retry = 0.0 if found else min(2 * kl.retry or LISTEN_RETRY, LISTEN_RETRY_MAX)
            self.listens.schedule(kl, trio.current_time() + (LISTEN_REFRESH if found else kl.retry))
            self.changed()

    def _search_families(self, kl: KeyListen, now: float) -> list[bool]:
        """The address families (``v6``) whose storing nodes a listen must look for before its refresh.

        They are looked for again (a ``find`` search) when none holds the listen, every 10 min, and when fewer
        than 4 hold it while the routing table has grown since the last look; not at every 20 s refresh of a
        network with fewer than 4 nodes, which would double a refresh's traffic.
        """
        families = []
        for v6 in sorted(self.protocol.families):
            table = self.protocol.tables[v6]
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

    def _refresh(self, kl: KeyListen, families: list[bool], on_done: Callable[[bool], None]) -> None:
        """Look for the listen's storing nodes in ``families`` (a ``find`` search each, at once), then
        (re)send ``listen`` to each node that holds it (:meth:`_send_listens`); ``on_done(held)`` at the end,
        also after a failure (logged). No task."""
        left = len(families)

        def searched(v6: bool, known: int, state: SearchState) -> None:
            nonlocal left
            try:
                kl.searched[v6] = (trio.current_time(), known)
                old = {t.node.id: t for t in kl.targets.values() if t.v6 == v6}
                new_tid = self.protocol.transactions.new_tid
                targets = [
                    old.get(sn.node.id) or ListenTarget(sn.node, new_tid(), sn.token or b"", v6)
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
                known = len(self.protocol.tables[v6])
                self.searches.start(
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
        requests: list[Request] = []
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

        self.protocol.start_requests(requests, replied, trio.current_time())
