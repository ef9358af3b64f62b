"""An HTTP worker process: serves the proxy's plain listening sockets beside the front end's process.

Why: moving a request's bytes (the ``recv``, reading the head, the ``send`` of the response) is a large part
of what a SUBSCRIBE costs the front end; a worker does it on another core. It accepts the
connections, reads their requests with :mod:`~trio_dht.proxy.http1`, relays each SUBSCRIBE and UNSUBSCRIBE of
a key route to the front end (:mod:`~trio_dht.proxy.relay`) and writes the response it gets back. It hands any
other request's connection over, with the bytes already read; the front end serves it from then on, as if it
had accepted it. So a worker holds no state of the proxy, and every answer comes from the one process that
owns the DHT node and the subscriptions.

The front end starts a worker with :func:`worker_command` and supervises it (see
:class:`~trio_dht.proxy.worker_link.WorkerLink`). One Trio task serves everything here through one epoll: no
task per connection. A connection has at most one request relayed at a time; it is read on meanwhile, up to
a limit, so that pipelined requests keep their order. The worker ignores SIGINT (Ctrl-C reaches the whole
process group; the front end drains it), exits when the front end's end of the channel closes, and after a
:data:`~trio_dht.proxy.relay.DRAIN` once its last response is sent.

Its connections have the front end's budgets (:class:`Settings`, from ``Limits``): a deadline per connection
for what it waits for (the next request, a head's end from its first byte, a body's end, the client taking a
response), enforced by one sweeping task with a 408 where a request was not all sent; a relayed response held
for a client that does not read is cut past the send buffer; connections are counted per client address
until they close or their hand-over is sent (the front end counts them from then on); hand-overs the channel
has not taken are at most :data:`MAX_HANDING_OVER` (no accepts past it) and wait at most the head deadline;
an ``accept`` out of file descriptors or memory stops the listeners being watched for a while. The limits
reached go to the front end in :data:`~trio_dht.proxy.relay.STATS` frames.
"""

from __future__ import annotations

import collections
import logging
import math
import select
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import trio

from trio_dht.proxy import relay
from trio_dht.proxy.conn_limits import (
    AcceptPause,
    Budgets,
    Expiry,
    HttpCounters,
    PerAddress,
    close_late_connections,
    expire,
)
from trio_dht.proxy.connection import BLOCKING
from trio_dht.proxy.http1 import RECV_SIZE, UNUSUAL, Head, read_head
from trio_dht.rest.paths import Route, match

log = logging.getLogger(__name__)

_RELAYED = {Route.SUBSCRIBE: relay.SUBSCRIBE, Route.UNSUBSCRIBE: relay.UNSUBSCRIBE}
_READ = select.EPOLLIN | select.EPOLLRDHUP
MAX_BUFFERED = RECV_SIZE
"""A connection is not read further once this many bytes wait in its buffer (behind a request relayed and
not answered yet, or a response the socket has not taken)."""
ACCEPTS_PER_TURN = 64
MAX_HANDING_OVER = 128
"""Connections handed over and not yet taken by the front end's channel; at this many the listeners are not
watched (no more connections accepted) until the channel takes some. One waiting past the head deadline is
closed (``handOversDropped``)."""
_INF = math.inf
_IDLE, _HEAD, _BODY, _SEND = Expiry.IDLE, Expiry.HEAD, Expiry.BODY, Expiry.SEND


class Settings(NamedTuple):
    """A worker's budgets (from :class:`~trio_dht.limits.Limits`), and the 408 the front end builds."""

    budgets: Budgets = Budgets()
    connections_per_address: int = 256
    timeout_response: bytes = b""

    def argument(self) -> str:
        b = self.budgets
        values = (b.head, b.body, b.send, b.send_buffer, self.connections_per_address)
        return ",".join(map(repr, values)) + ":" + self.timeout_response.hex()

    @classmethod
    def parse(cls, argument: str) -> Settings:
        numbers, _, response = argument.partition(":")
        head, body, send, send_buffer, per_address = (float(x) for x in numbers.split(","))
        budgets = Budgets(head=head, body=body, send=send, send_buffer=int(send_buffer))
        return cls(budgets, int(per_address), bytes.fromhex(response))


def worker_command(channel_fd: int, listener_fds: list[int], settings: Settings = Settings()) -> list[str]:  # noqa: B008
    """The command line of a worker that serves these inherited file descriptors, for this interpreter and
    this copy of trio_dht (a directory, or the zipapp)."""
    import trio_dht

    home = str(Path(trio_dht.__file__).absolute().parent.parent)
    code = f"import sys; sys.path.insert(0, {home!r}); from trio_dht.proxy.http_worker import main; main()"
    return [sys.executable, "-c", code, str(channel_fd), settings.argument(), *map(str, listener_fds)]


def main(argv: list[str] | None = None) -> None:
    """A worker's entry point: ``CHANNEL_FD SETTINGS LISTENER_FD...`` (:meth:`Settings.argument`)."""
    args = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    channel = socket.socket(fileno=int(args[0]))
    listeners = [socket.socket(fileno=int(fd)) for fd in args[2:]]
    trio.run(HttpWorker(channel, listeners, Settings.parse(args[1])).run)


def relayed_request(head: Head) -> tuple[int, bytes] | None:
    """``(method, key)`` of a request the worker relays; None for a connection to hand over."""
    if head.content_length > relay.MAX_RELAYED_BODY:
        return None
    route = match(head.method, head.target)
    if route is None:
        return None
    method = _RELAYED.get(route[0])
    return None if method is None or route[1] is None else (method, bytes(route[1]))


class _Client:
    """One accepted connection."""

    __slots__ = (
        "address",
        "buffer",
        "closing",
        "deadline",
        "expiry",
        "fd",
        "in_flight",
        "out",
        "reading",
        "sock",
        "writing",
    )

    def __init__(self, sock: socket.socket, address: str, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.address = address
        self.buffer = bytearray()
        self.out = b""
        """Response bytes the socket did not take yet."""
        self.in_flight: int | None = None
        """The id of the request relayed and not answered yet."""
        self.closing = False
        """Close once :attr:`out` is sent."""
        self.reading = True
        self.writing = False
        self.deadline = deadline
        """When the wait on the client (:attr:`expiry`) closes the connection; infinite while a request is
        relayed."""
        self.expiry = _IDLE


class HttpWorker:
    """The worker's event loop (see the module docstring)."""

    def __init__(
        self,
        channel: socket.socket,
        listeners: list[socket.socket],
        settings: Settings = Settings(),  # noqa: B008 (immutable)
    ) -> None:
        self._channel = channel
        self._budgets = settings.budgets
        self._timeout_response = settings.timeout_response
        self._per_address = PerAddress(settings.connections_per_address)
        self._accept_pause = AcceptPause()
        self._accepts_paused = False
        self._listening = True
        """The listeners are watched."""
        self._handing_over = 0
        """Hand-overs in :attr:`_unsent`."""
        self.counters = HttpCounters()
        self._counts_sent: list[int] = self._counts()
        self._nursery: trio.Nursery | None = None
        self._listeners = {sock.fileno(): sock for sock in listeners}
        self._clients: dict[int, _Client] = {}
        self._waiting: dict[int, _Client] = {}
        self._records = relay.RecordWriter()
        self._unsent: collections.deque[tuple[bytes, _Client | None]] = collections.deque()
        """Records the channel did not take yet; a hand-over's with its connection."""
        self._next_id = 1
        self._draining = False
        self._channel_blocked = False
        """The channel did not take a record: wait until it is writable."""
        self._channel_gone = False
        self._receive_buffer = bytearray(relay.RECEIVE_SIZE)
        self._epoll = select.epoll()
        channel.setblocking(False)
        self._epoll.register(channel.fileno(), select.EPOLLIN)
        for sock in listeners:
            sock.setblocking(False)
            self._epoll.register(sock.fileno(), select.EPOLLIN)

    async def run(self) -> None:
        """Serve until drained, or until the front end's end of the channel closes."""
        self._records.add(relay.frame(relay.READY))
        self._flush_channel()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(
                    close_late_connections,
                    self._budgets.sweep_interval,
                    self._clients.values,
                    self._expire,
                    self._after_sweep,
                )
                await self._serve_events()
                nursery.cancel_scope.cancel()
        finally:
            for client in list(self._clients.values()):
                self._close(client)
            self._drop_hand_overs(lambda _: True)
            self._epoll.close()

    async def _serve_events(self) -> None:
        channel_fd = self._channel.fileno()
        while not (self._draining and not self._clients and not self._unsent):
            await trio.lowlevel.wait_readable(self._epoll.fileno())
            now = trio.current_time()
            for fd, events in self._epoll.poll(0):
                if fd == channel_fd:
                    if events & select.EPOLLOUT:
                        self._flush_channel()
                    if events & ~select.EPOLLOUT and not self._read_channel():
                        return
                elif fd in self._listeners:
                    self._accept(self._listeners[fd], now)
                else:
                    client = self._clients.get(fd)
                    if client is not None:
                        self._on_client(client, events, now)
            self._flush_channel()
            if self._channel_gone:
                return

    def _after_sweep(self) -> None:
        """After closing the connections past their deadline: close the hand-overs the channel has not taken
        past theirs (counted), and send the counts of the limits reached, if they changed."""
        if self._handing_over:
            now = trio.current_time()
            self.counters.hand_overs_dropped += self._drop_hand_overs(lambda client: client.deadline < now)
        counts = self._counts()
        if counts != self._counts_sent:
            self._counts_sent = counts
            self._records.add(relay.stats_frame(counts))
            self._flush_channel()

    def _expire(self, client: _Client) -> None:
        """Close a connection past its deadline: a request not all sent gets a 408 first (counted)."""
        expire(self.counters, client.expiry, client.sock, b"" if client.out else self._timeout_response)
        self._close(client)

    def _counts(self) -> list[int]:
        return self.counters.total(self._per_address, self._accept_pause).as_list()

    # -- the channel ----------------------------------------------------------------------------------------

    def _read_channel(self) -> bool:
        """Act on the records waiting; False once the front end's end is closed."""
        buffer = self._receive_buffer
        for _ in range(64):
            try:
                size = self._channel.recv_into(buffer)
            except BLOCKING:
                return True
            except OSError:
                return False
            if not size:
                return False
            for frame in relay.frames(memoryview(buffer)[:size]):
                if frame.kind in (relay.RESPONSE, relay.PART):
                    self._on_response(frame)
                elif frame.kind == relay.DRAIN:
                    self._drain()
                else:
                    raise relay.BadRecord(f"a frame of kind {frame.kind} sent to a worker")
        return True

    def _flush_channel(self) -> None:
        unsent = self._unsent
        unsent.extend((record, None) for record in self._records.take())
        while unsent:
            record, handed = unsent[0]
            try:
                if handed is None:
                    self._channel.send(record)
                else:
                    socket.send_fds(self._channel, [record], [handed.fd])
            except BLOCKING:
                self._watch_channel(writable=True)
                return
            except OSError:  # the front end is gone: so is every response
                self._channel_gone = True
                self._drop_hand_overs(lambda _: True)
                self._unsent.clear()
                return
            unsent.popleft()
            if handed is not None:  # the front end holds its own copy now, and counts it
                self._handed(handed)
        self._watch_channel(writable=False)

    def _handed(self, client: _Client) -> None:
        """A hand-over left :attr:`_unsent` (sent, or dropped): close the worker's copy, stop counting it."""
        client.sock.close()
        self._per_address.release(client.address)
        self._handing_over -= 1
        self._watch_listeners()

    def _drop_hand_overs(self, late: Callable[[_Client], bool]) -> int:
        """Close the hand-overs not sent that ``late`` picks; how many."""
        kept: collections.deque[tuple[bytes, _Client | None]] = collections.deque()
        dropped = 0
        for record, handed in self._unsent:
            if handed is not None and late(handed):
                self._handed(handed)
                dropped += 1
            else:
                kept.append((record, handed))
        self._unsent = kept
        return dropped

    def _watch_channel(self, *, writable: bool) -> None:
        if writable != self._channel_blocked:
            self._channel_blocked = writable
            self._epoll.modify(self._channel.fileno(), select.EPOLLIN | (select.EPOLLOUT if writable else 0))

    def _on_response(self, frame: relay.Frame) -> None:
        if frame.kind == relay.PART:
            client = self._waiting.get(frame.request_id)
            data, close = frame.payload, False
        else:
            client = self._waiting.pop(frame.request_id, None)
            close, data = relay.parse_response(frame.payload)
        if client is None or self._clients.get(client.fd) is not client:  # it went away meanwhile
            return
        client.out += data
        if len(client.out) > self._budgets.send_buffer:  # the client does not read
            self.counters.send_buffer_overflows += 1
            self._waiting.pop(frame.request_id, None)
            self._close(client)
            return
        if frame.kind == relay.RESPONSE:
            client.in_flight = None
            client.closing = client.closing or close
        self._write(client, trio.current_time())

    def _drain(self) -> None:
        self._draining = True
        for sock in self._listeners.values():
            self._epoll.unregister(sock.fileno())
            sock.close()
        self._listeners.clear()
        for client in list(self._clients.values()):
            if client.in_flight is None and not client.out:
                self._close(client)
            else:
                client.closing = True

    # -- connections -----------------------------------------------------------------------------------------

    def _accept(self, listener: socket.socket, now: float) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, address = listener.accept()
            except BLOCKING:
                return
            except OSError as exc:  # skipped, or accepting pauses (no descriptor or memory left)
                delay = self._accept_pause.after(exc, now)
                if delay:
                    self._pause_accepts(delay)
                    return
                continue
            self._accept_pause.accepted()
            host = str(address[0])
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._epoll.register(sock.fileno(), _READ)
            except OSError:  # gone already, or no memory for epoll
                sock.close()
                continue
            if not self._per_address.acquire(host):  # counted; taken last
                self._epoll.unregister(sock.fileno())
                sock.close()
                continue
            client = _Client(sock, host, now + self._budgets.keep_alive)
            self._clients[client.fd] = client

    def _pause_accepts(self, delay: float) -> None:
        """Stop watching the listeners for ``delay`` seconds (see ``AcceptPause``)."""
        if self._accepts_paused or self._nursery is None:
            return
        self._accepts_paused = True
        self._watch_listeners()
        self._nursery.start_soon(self._resume_accepts, delay)

    async def _resume_accepts(self, delay: float) -> None:
        await trio.sleep(delay)
        self._accepts_paused = False
        self._watch_listeners()

    def _watch_listeners(self) -> None:
        """Watch the listeners unless accepting pauses or :data:`MAX_HANDING_OVER` hand-overs wait."""
        listening = not self._accepts_paused and self._handing_over < MAX_HANDING_OVER
        if listening != self._listening:
            self._listening = listening
            for fd in self._listeners:  # none once drained
                self._epoll.modify(fd, select.EPOLLIN if listening else 0)

    def _on_client(self, client: _Client, events: int, now: float) -> None:
        if events & select.EPOLLOUT:
            self._write(client, now)
            if self._clients.get(client.fd) is not client:
                return
        if events & ~select.EPOLLOUT:
            try:
                data = client.sock.recv(RECV_SIZE)
            except BLOCKING:
                return
            except OSError:
                data = b""
            if not data:
                self._close(client)
                return
            client.buffer += data
            self._serve(client, now)

    def _serve(self, client: _Client, now: float) -> None:
        """Relay the next buffered request, or hand the connection over, unless one is relayed already; and
        start the deadline of what the connection then waits for."""
        buffer = client.buffer
        if client.in_flight is not None or client.out or client.closing or not buffer:
            if client.in_flight is None and not client.out and not buffer:
                self._wait(client, _IDLE, self._budgets.keep_alive, now)
            self._watch(client)
            return
        head = read_head(buffer)
        if head is None:
            self._wait(client, _HEAD, self._budgets.head, now)
            self._watch(client)
            return
        route = None if head is UNUSUAL else relayed_request(head)  # type: ignore[arg-type]
        if route is None:
            self._hand_over(client, now)
            return
        assert isinstance(head, Head)
        end = head.size + head.content_length
        if len(buffer) < end:
            self._wait(client, _BODY, self._budgets.body, now)
            self._watch(client)
            return
        body = bytes(buffer[head.size : end])
        del buffer[:end]
        request_id = self._next_id
        self._next_id = request_id % 0xFFFFFFFF + 1
        client.in_flight = request_id
        client.deadline = _INF  # the front end answers
        self._waiting[request_id] = client
        method, key = route
        self._records.add(relay.relay_frame(request_id, method, head.close, key, client.address, body))
        if self._records.frames >= relay.BATCH:
            self._flush_channel()
        self._watch(client)

    def _write(self, client: _Client, now: float) -> None:
        while client.out:
            try:
                sent = client.sock.send(client.out)
            except BLOCKING:
                self._wait(client, _SEND, self._budgets.send, now)
                self._watch(client)
                return
            except OSError:
                self._close(client)
                return
            client.out = client.out[sent:]
        if client.expiry is _SEND:
            client.deadline = _INF  # taken: what comes next starts its own wait
        if client.closing and client.in_flight is None:
            self._close(client)
        else:
            self._serve(client, now)

    def _wait(self, client: _Client, expiry: Expiry, timeout: float, now: float) -> None:
        """Start ``expiry``'s deadline, unless the connection waits for that already (a head's or a body's
        deadline counts from its start, not from the last byte)."""
        if client.deadline == _INF or client.expiry is not expiry:
            client.expiry = expiry
            client.deadline = now + timeout

    def _watch(self, client: _Client) -> None:
        """Wait for what the connection needs: its socket to take the rest of a response, more bytes (not
        past :data:`MAX_BUFFERED` behind a relayed request)."""
        writing = bool(client.out)
        reading = len(client.buffer) < MAX_BUFFERED  # more is buffered only behind a request not answered
        if (reading, writing) != (client.reading, client.writing):
            client.reading, client.writing = reading, writing
            self._epoll.modify(client.fd, (_READ if reading else 0) | (select.EPOLLOUT if writing else 0))

    def _hand_over(self, client: _Client, now: float) -> None:
        """Send the connection to the front end, counted here until the channel takes it; it waits for that
        at most the head deadline."""
        self._forget(client)
        client.deadline = now + self._budgets.head
        self._unsent.extend((record, None) for record in self._records.take())  # what was gathered goes first
        self._unsent.append((relay.frame(relay.HAND_OVER, 0, bytes(client.buffer)), client))
        self._handing_over += 1
        self._watch_listeners()

    def _close(self, client: _Client) -> None:
        if self._forget(client):
            self._per_address.release(client.address)
        client.sock.close()

    def _forget(self, client: _Client) -> bool:
        """Stop serving the connection (closed, or handed over); whether it was served."""
        if self._clients.pop(client.fd, None) is None:
            return False
        self._epoll.unregister(client.fd)
        return True
