"""Iterative searches over the network, and gets that share them (the Trio side of ``node.search``).

A search asks the closest nodes it knows of a target (4 requests in flight), learns closer ones from their
replies, and ends when the 8 closest answered with a write token (:class:`~trio_dht.node.search.SearchState`
decides whom to ask and when it is done). It runs on the callbacks of the requests it sends through the
protocol: no task per search.

Gets of a key that arrive while one is asking the network join it, as OpenDHT's node shares a search's
pending requests: concurrent gets of a key cost one round of requests (:class:`_GetRound`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from trio_dht.api import GetCallback
from trio_dht.infohash import InfoHash
from trio_dht.node.protocol import NodeProtocol
from trio_dht.node.routing import K, Node
from trio_dht.node.search import SearchNode, SearchState
from trio_dht.value import Query, Value
from trio_dht.wire.message import Kind, Message

log = logging.getLogger("trio_dht.node")

Where = tuple[tuple[int, Any], ...]


async def wait_for(start: Callable[[Callable[[Any], None]], Callable[[], None]]) -> Any:
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


def replaces(value: Value, found: Value | None) -> bool:
    """Whether a get keeps ``value`` for its id, having ``found`` (or nothing) for it: the first one, unless a
    signed one comes after one that is not, or a later edit (higher seq) of the same owner. Signed values have
    been checked (and ours decrypted) by then, so an unsigned or opaque copy, or a stale version, sent first
    by one node cannot hide the owner's latest value that another sends."""
    if found is None:
        return True
    if not value.is_signed:
        return False
    return not found.is_signed or (value.owner == found.owner and value.seq > found.seq)


@dataclass(slots=True, eq=False)
class _GetRound:
    """One remote get of a key (and ``where`` filter), shared by every caller that asks while it runs.

    A get never sends a request that a pending one of the same key answers. Callers that join late first
    receive what the round has found so far.
    """

    screen: Callable[[Iterable[Value]], list[Value]]
    """Drops the badly signed values of a reply and decrypts ours, before they take their id's place."""
    found: dict[int, Value] = field(default_factory=dict)
    callbacks: list[Callable[[list[Value]], None]] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def on_reply(self, sn: SearchNode, reply: Message) -> None:
        new = [v for v in self.screen(reply.values) if replaces(v, self.found.get(v.id))]
        if new:
            for v in new:
                self.found[v.id] = v
            for callback in list(self.callbacks):
                try:
                    callback(new)
                except Exception:  # one caller's failure is not the others'
                    log.exception("a get callback failed")


class Searches:
    """The node's searches and shared get rounds. ``nursery`` (set by the shell) runs the get rounds."""

    def __init__(self, protocol: NodeProtocol) -> None:
        self.protocol = protocol
        self.rounds: dict[tuple[InfoHash, Where], _GetRound] = {}
        self.nursery: trio.Nursery | None = None

    def start(
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
        protocol = self.protocol
        table = protocol.tables[v6]
        state = SearchState(target)
        for node in table.closest(target, 2 * K, now=trio.current_time(), good_only=False):
            if not node.expired:
                state.add(node)
        out: set[int] = set()  # transaction ids of the requests in flight
        finished = False

        def stop() -> None:
            nonlocal finished
            finished = True
            for tid in out:
                protocol.abandon_request(tid)
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
                    records = reply.nodes6 if v6 else reply.nodes4
                    for nid, addr in protocol.usable_records(records, sn.node.addr):
                        state.add(table.get(nid) or Node(nid, addr))
                    if on_reply is not None:
                        on_reply(sn, reply)
                finally:
                    step()

            tid = protocol.start_request(
                sn.node.addr, method, args, done, trio.current_time(), node_id=sn.node.id, on_slow=slow
            )
            out.add(tid)

        step()
        return stop

    async def search(
        self,
        target: InfoHash,
        v6: bool,
        method: str,
        args: dict[str, Any],
        on_reply: Callable[[SearchNode, Message], None] | None = None,
    ) -> SearchState:
        """:meth:`start`, awaited."""
        return await wait_for(lambda done: self.start(target, v6, method, args, done, on_reply))

    async def each_family(self, fn: Callable[[bool], Awaitable[Any]]) -> None:
        """``await fn(v6)`` for each address family with known nodes, concurrently if both."""
        protocol = self.protocol
        now = trio.current_time()
        families = [
            v6
            for v6 in sorted(protocol.families)
            if protocol.tables[v6].closest(protocol.id, 1, now=now, good_only=False)
        ]
        if len(families) == 1:
            await fn(families[0])
            return
        async with trio.open_nursery() as nursery:
            for v6 in families:
                nursery.start_soon(fn, v6)

    async def get(
        self, key: InfoHash, query: Query | None = None, *, on_values: GetCallback | None = None
    ) -> list[Value]:
        """All values found under ``key`` (local storage and the closest nodes), merged by id."""
        found: dict[int, Value] = {}

        def add(values: Iterable[Value]) -> None:
            new = []
            for v in values:
                if (query is None or query.matches(v)) and replaces(v, found.get(v.id)):
                    found[v.id] = v
                    new.append(v)
            if new and on_values is not None:
                on_values(new)

        add(self.protocol.screen.screen(self.protocol.storage.get(key, query)))
        where = query.where if query is not None else ()
        rnd = self.rounds.get((key, where))
        if rnd is None:
            rnd = self.rounds[(key, where)] = _GetRound(self.protocol.screen.screen)
            assert self.nursery is not None
            # Every concurrent get of the key shares the round, so no one caller can own its task.
            self.nursery.start_soon(self._run_round, key, where, rnd)
        add(rnd.found.values())
        rnd.callbacks.append(add)
        try:
            await rnd.done.wait()
        finally:
            rnd.callbacks.remove(add)
            if not rnd.callbacks and not rnd.done.is_set():  # nobody waits for it any more
                rnd.scope.cancel()
                if self.rounds.get((key, where)) is rnd:
                    del self.rounds[(key, where)]
        return list(found.values())

    async def _run_round(self, key: InfoHash, where: Where, rnd: _GetRound) -> None:
        args: dict[str, Any] = {"h": key}
        if where:
            args["q"] = Query((), where).to_wire()
        try:
            with rnd.scope:
                await self.each_family(lambda v6: self.search(key, v6, "get", args, rnd.on_reply))
        except Exception:  # the callers get what was found; the node goes on
            log.exception("get on %s failed", key.hex())
        finally:
            if self.rounds.get((key, where)) is rnd:
                del self.rounds[(key, where)]
            rnd.done.set()
