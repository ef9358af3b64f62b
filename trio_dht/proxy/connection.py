"""One plain-HTTP connection of the front end: buffered non-blocking socket I/O through Trio's I/O waits, and
the deadline of what it waits for from the client (:mod:`~trio_dht.proxy.conn_limits`).

Also the I/O facts every part of the proxy's HTTP code shares: :data:`BLOCKING` (a non-blocking call that
would block), :data:`GONE` (the peer reset or closed) and :class:`ClientGone`.
"""

from __future__ import annotations

import math
import socket
from typing import TYPE_CHECKING

import trio

from trio_dht.proxy.conn_limits import Budgets, Expiry
from trio_dht.proxy.http1 import RECV_SIZE

if TYPE_CHECKING:
    from trio_dht.proxy.ratelimit import HttpRateLimiter
    from trio_dht.proxy.replies import Reply

BLOCKING = (BlockingIOError, InterruptedError)
"""What a non-blocking socket call raises when it would block."""
GONE = (ConnectionError, OSError)
"""What a socket call raises once the peer is gone."""
DEFAULT_BUDGETS = Budgets()
_INF = math.inf
_IDLE, _HEAD, _SEND = Expiry.IDLE, Expiry.HEAD, Expiry.SEND


class ClientGone(Exception):
    """The peer closed or reset the connection (or went away before the request's body came)."""


class Connection:
    """One accepted socket: buffered non-blocking reads and writes through Trio's I/O waits."""

    def __init__(self, sock: socket.socket, client: str, budgets: Budgets = DEFAULT_BUDGETS) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.client = client
        self.budgets = budgets
        self.limiter: HttpRateLimiter | None = None
        """The rate limiter that applies to this client (None for a trusted one)."""
        self.buffer = bytearray()
        self.pending = b""
        """Response bytes the socket did not take yet; nothing else is written before them."""
        self.ending = False
        """Close the connection once :attr:`pending` is sent."""
        self.responding = False
        """Some of the current response has been sent."""
        self.waited = False
        """The connection's task yielded waiting for the client since this was last cleared."""
        self.readable = False
        """Bytes may be waiting on the socket that no readiness event will announce (see
        :class:`~trio_dht.proxy.poller.Poller`)."""
        self.parked: trio.lowlevel.Task | None = None
        """The connection's task, while it waits for the poller to bring the next request."""
        self.last_reply: tuple[Reply, bytes] | None = None
        """The last reply sent here, and its response: a route that answers the same :class:`Reply` object
        again (node info, while its document stays the same) is answered with the same bytes."""
        self.deadline = _INF
        """When the wait on the client (:attr:`expiry`) ends the connection; infinite while it waits for
        nothing (a request is served). One sweeping task compares it with the time."""
        self.expiry = _IDLE
        self.scope = trio.CancelScope()
        """Cancelled to close the connection: past its deadline, shutdown while it waits for a request, or the
        client gone in the middle of a GET (which stops the get).
        """

    def wait_for_request(self, now: float) -> None:
        """Start the deadline of waiting for a request: its first byte (the keep-alive time) or, with some
        of it buffered, the end of its head. A head's deadline counts from its first byte: more bytes do not
        move it."""
        if not self.buffer:
            if self.deadline == _INF:
                self.expiry = _IDLE
                self.deadline = now + self.budgets.keep_alive
        elif self.deadline == _INF or self.expiry is _IDLE:
            self.expiry = _HEAD
            self.deadline = now + self.budgets.head

    async def fill(self, *, wait_first: bool = False) -> None:
        """Read more bytes into :attr:`buffer`; :class:`ClientGone` at EOF. ``wait_first``: wait until the
        socket is readable before the first read (when nothing is expected yet, a read that would fail with
        EAGAIN is a wasted system call and exception).
        """
        if wait_first:
            self.waited = True
            await trio.lowlevel.wait_readable(self.fd)
        while True:
            try:
                data = self.sock.recv(RECV_SIZE)
            except BLOCKING:
                self.waited = True
                await trio.lowlevel.wait_readable(self.fd)
                continue
            except GONE as exc:
                raise ClientGone from exc
            if not data:
                raise ClientGone
            self.buffer += data
            return

    def recv_now(self) -> None:
        """Read what the socket has (one read) without waiting; :class:`ClientGone` at EOF. Clears
        :attr:`readable` unless the read filled :data:`RECV_SIZE` (there may be more).
        """
        try:
            data = self.sock.recv(RECV_SIZE)
        except BLOCKING:
            self.readable = False
            return
        except GONE as exc:
            raise ClientGone from exc
        if not data:
            raise ClientGone
        self.readable = len(data) == RECV_SIZE
        self.buffer += data

    def send_now(self, data: bytes) -> bytes:
        """Send what the socket takes without waiting; the rest of ``data``."""
        try:
            sent = self.sock.send(data)
        except BLOCKING:
            return data
        except GONE as exc:
            raise ClientGone from exc
        self.responding = True
        return data[sent:]

    async def send(self, data: bytes) -> None:
        """Send all of ``data``; a client that does not take it within ``budgets.send`` has its connection
        closed (the sweep)."""
        view = memoryview(data)
        blocked = False
        while view:
            try:
                sent = self.sock.send(view)
            except BLOCKING:
                if not blocked:
                    blocked = True
                    self.expiry = _SEND
                    self.deadline = trio.current_time() + self.budgets.send
                await trio.lowlevel.wait_writable(self.fd)
                continue
            except GONE as exc:
                raise ClientGone from exc
            view = view[sent:]
            self.responding = True
        if blocked:
            self.deadline = _INF
