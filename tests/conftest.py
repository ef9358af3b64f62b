"""Shared fixtures: free ports, loopback networks of our nodes, hand-built raw peers, socket-less nodes.

Kept generic on purpose: real OpenDHT peers (tests/peers/) join a :class:`LoopbackNetwork` through the
``add_peers`` hook of ``open_network``, which appends them to :attr:`LoopbackNetwork.members` (anything
with the ``Dht`` put/get interface); ``check_puts_found`` then runs over every member.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from trio_dht.api import Dht
from trio_dht.infohash import InfoHash
from trio_dht.node import DhtNode, open_node
from trio_dht.value import Value
from trio_dht.wire.compact import Address
from trio_dht.wire.message import Encoder, Kind, MalformedMessage, Message, decode

LOOPBACK = "127.0.0.1"


@pytest.fixture
def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that was free a moment ago (prefer port 0 where the caller can)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


# -- a network of our nodes ----------------------------------------------------------------------------------


@dataclass
class LoopbackNetwork:
    """Our nodes on 127.0.0.1, and every member tests put to and get from (our nodes, then added peers)."""

    nodes: list[DhtNode]
    bootstrap: list[Address]
    """Where newcomers bootstrap: the first ``bootstrap_count`` nodes."""
    members: list[Dht] = field(default_factory=list)


AddPeers = Callable[[list[Address]], AbstractAsyncContextManager[list[Dht]]]
"""Starts other peers (e.g. real OpenDHT nodes) bootstrapped from these addresses; yields them as ``Dht``."""


async def _wait_until(predicate, *, timeout: float = 10.0, step: float = 0.02) -> None:
    """Poll ``predicate()`` until true; fails the test (TooSlowError) after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(step)


@asynccontextmanager
async def _open_network(
    count: int,
    *,
    bootstrap_count: int = 1,
    min_good: int = 1,
    timeout: float = 20.0,
    add_peers: AddPeers | None = None,
) -> AsyncIterator[LoopbackNetwork]:
    """``count`` of our nodes on loopback; the first ``bootstrap_count`` are everyone's bootstrap nodes.

    Returns once every node knows at least ``min_good`` good nodes. ``add_peers`` (tests/peers/ passes real
    OpenDHT nodes this way) is entered after that; the peers it yields are appended to ``members``.
    """
    async with AsyncExitStack() as stack:
        nodes: list[DhtNode] = []
        bootstrap: list[Address] = []
        for i in range(count):
            node = await stack.enter_async_context(
                open_node(port=0, host=LOOPBACK, host6=None, bootstrap=list(bootstrap))
            )
            nodes.append(node)
            if i < bootstrap_count:
                bootstrap.append((LOOPBACK, node.bound_port))
        await _wait_until(
            lambda: all(n.info().ipv4.good >= min(min_good, count - 1) for n in nodes), timeout=timeout
        )
        net = LoopbackNetwork(nodes, bootstrap, list(nodes))
        if add_peers is not None:
            net.members += await stack.enter_async_context(add_peers(list(bootstrap)))
        yield net


async def _check_puts_found(members: list[Dht], keys: int, rng: random.Random, *, concurrency: int = 10):
    """Put ``keys`` random keys from random members, then get each from another random member.

    Every put must succeed and every get must return exactly the value put. Returns the (key, value) pairs.
    """
    plan = []
    for i in range(keys):
        putter, getter = rng.sample(members, 2)
        plan.append((putter, getter, InfoHash.random(), Value(b"value %d" % i)))
    limiter = trio.CapacityLimiter(concurrency)
    failed_puts: list[int] = []
    missing: list[int] = []

    async def put(i: int) -> None:
        putter, _, key, value = plan[i]
        async with limiter:
            if not await putter.put(key, value):
                failed_puts.append(i)

    async def get(i: int) -> None:
        _, getter, key, value = plan[i]
        async with limiter:
            found = await getter.get(key)
        if [(v.id, v.data) for v in found] != [(value.id, value.data)]:
            missing.append(i)

    async with trio.open_nursery() as nursery:
        for i in range(keys):
            nursery.start_soon(put, i)
    assert failed_puts == []
    async with trio.open_nursery() as nursery:
        for i in range(keys):
            nursery.start_soon(get, i)
    assert sorted(missing) == []
    return [(key, value) for _, _, key, value in plan]


# -- a hand-built peer on a raw UDP socket -------------------------------------------------------------------


class RawPeer:
    """One UDP socket with a node id: sends hand-made datagrams and reads decoded ones.

    It answers the pings it receives (as any live peer does) and never shows them to the test.
    """

    def __init__(self, sock: trio.socket.SocketType, node_id: InfoHash) -> None:
        self.sock = sock
        self.id = node_id
        self.encoder = Encoder(node_id, agent="o2")
        self.addr: Address = sock.getsockname()[:2]
        self.last_raw = b""
        """The last datagram :meth:`recv` read, as received."""
        self._tid = 1000

    def next_tid(self) -> int:
        self._tid += 1
        return self._tid

    async def send(self, data: bytes | dict[str, Any], to: Address) -> None:
        if isinstance(data, dict):
            data = msgpack.packb(data, use_bin_type=True)
        await self.sock.sendto(data, to)

    async def _next(self) -> tuple[bytes, Address]:
        """The next datagram that is not a ping: pings are answered (as a live peer does) and skipped."""
        while True:
            data, addr = await self.sock.recvfrom(65536)
            addr = addr[:2]
            try:
                msg = decode(data)
            except MalformedMessage:
                return data, addr
            if msg.kind is Kind.REQUEST and msg.method == "ping":
                await self.sock.sendto(self.encoder.reply(msg.tid, {"sa": b"\x7f\x00\x00\x01"}), addr)
                continue
            return data, addr

    async def recv(self, timeout: float = 5.0) -> tuple[Message, Address]:
        """The next datagram that decodes (others are skipped)."""
        with trio.fail_after(timeout):
            while True:
                data, addr = await self._next()
                self.last_raw = data
                try:
                    return decode(data), addr
                except MalformedMessage:
                    continue

    async def recv_raw(self, timeout: float = 5.0) -> bytes:
        with trio.fail_after(timeout):
            data, _ = await self._next()
            return data

    async def expect_none(self, wait: float = 0.3) -> None:
        """Assert that nothing but pings arrives within ``wait`` seconds."""
        with trio.move_on_after(wait):
            data, _ = await self._next()
            raise AssertionError(f"unexpected datagram: {msgpack.unpackb(data, strict_map_key=False)!r}")

    async def ask(self, to: Address, method: str, args: dict[str, Any], timeout: float = 5.0) -> Message:
        """Send one request and return the reply (or error) with its ``t``; other datagrams are skipped."""
        tid = self.next_tid()
        await self.send(self.encoder.request(tid, method, args), to)
        with trio.fail_after(timeout):
            while True:
                msg, _ = await self.recv(timeout)
                if msg.tid == tid and msg.kind.value in ("r", "e"):
                    return msg


@asynccontextmanager
async def _open_raw_peer(node_id: InfoHash | None = None) -> AsyncIterator[RawPeer]:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind((LOOPBACK, 0))
        yield RawPeer(sock, node_id or InfoHash.random())


@pytest.fixture
async def raw_peer() -> AsyncIterator[RawPeer]:
    async with _open_raw_peer() as peer:
        yield peer


# -- a node without sockets, driven through handle_datagram --------------------------------------------------


@dataclass
class DrivenNode:
    """A :class:`DhtNode` with no sockets: feed it with :meth:`feed`, read what it sent in :attr:`sent`."""

    node: DhtNode
    sent: list[tuple[Message, Address]] = field(default_factory=list)

    async def feed(self, data: bytes, addr: Address) -> None:
        await self.node.handle_datagram(data, addr)
        await trio.testing.wait_all_tasks_blocked()

    def take(self, method: str | None = None) -> list[tuple[Message, Address]]:
        """Remove and return the sent messages (only the requests of ``method`` if given)."""
        if method is None:
            out, self.sent = self.sent, []
            return out
        out = [(m, a) for m, a in self.sent if m.method == method]
        self.sent = [(m, a) for m, a in self.sent if m.method != method]
        return out


@asynccontextmanager
async def _open_driven_node(**kwargs: Any) -> AsyncIterator[DrivenNode]:
    """A running node (timers, expiry, pushes) whose datagrams go to a list instead of a socket."""
    node = DhtNode(**kwargs)
    driven = DrivenNode(node)

    def capture(data: bytes, addr: Address) -> None:
        try:
            driven.sent.append((decode(data), addr))
        except MalformedMessage as exc:  # our own datagrams must always decode
            raise AssertionError(f"node sent an undecodable datagram: {exc}") from None

    node.protocol.send = capture
    async with trio.open_nursery() as nursery:
        await nursery.start(node._run, [])
        try:
            yield driven
        finally:
            nursery.cancel_scope.cancel()


# -- the helpers as fixtures (test modules cannot import this file) ------------------------------------------


@pytest.fixture
def wait_until():
    """``await wait_until(predicate, timeout=...)``: poll until true, fail after the timeout."""
    return _wait_until


@pytest.fixture
def open_network():
    """``async with open_network(count, bootstrap_count=1, add_peers=None) as net``: a LoopbackNetwork."""
    return _open_network


@pytest.fixture
def check_puts_found():
    """``await check_puts_found(net.members, keys, random.Random(seed))``: the network acceptance check."""
    return _check_puts_found


@pytest.fixture
def open_raw_peer():
    """``async with open_raw_peer() as peer``: a :class:`RawPeer` on 127.0.0.1."""
    return _open_raw_peer


@pytest.fixture
def open_driven_node():
    """``async with open_driven_node(**DhtNode kwargs) as driven``: a :class:`DrivenNode` (no sockets).

    Stateless, so it is safe with Hypothesis (suppress ``HealthCheck.function_scoped_fixture``).
    """
    return _open_driven_node


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[None]:
    if os.geteuid() != 0:
        path.chmod(0o400)
        try:
            yield
        finally:
            path.chmod(0o600)
        return
    try:
        subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot make a file read-only for root: {exc}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.fixture
def read_only():
    """``with read_only(path):`` makes ``path`` read-only for this user: mode 0400, or ``chattr +i`` for root
    (whom modes do not stop)."""
    return _read_only


# -- identities (RSA 2048: quick to make; one of each per session) -------------------------------------------


@pytest.fixture(scope="session")
def identity():
    """An identity (``trio_dht.crypto.Identity``) for the tests that sign, encrypt or run a secure node."""
    from trio_dht.crypto import Identity

    return Identity.generate("trio_dht tests", bits=2048)


@pytest.fixture(scope="session")
def other():
    """A second identity: another owner, or a recipient."""
    from trio_dht.crypto import Identity

    return Identity.generate("someone else", bits=2048)
