"""The proxy's plain-HTTP listener: a small HTTP/1.1 server for the hot requests, hypercorn for the rest.

Why: hypercorn's Trio worker costs about 0.5 ms of CPU per request before any route runs,
which caps the whole proxy near 2 k requests/s per core, while ``dhtnode`` serves about 11 k GET/s and 50 k
node-info/s. So the plain listening sockets are served here:

* GET/POST ``/key/{hash}`` and ``/{hash}``, ``GET /`` and ``GET /node/info``, the listen streams
  (``GET /key/{hash}/listen``, ``LISTEN /{hash}``: :class:`_ListenWriter`), and (when the app has push
  hooks) SUBSCRIBE/UNSUBSCRIBE ``/key/{hash}`` and ``/{hash}``: the routes clients and load hit
  (:mod:`~trio_dht.proxy.hot_routes`). They are read with :mod:`~trio_dht.proxy.http1` and answered by the
  same :mod:`~trio_dht.proxy.handlers` functions as every other HTTP layer of the proxy; only the moving of
  bytes is here. Socket I/O goes straight to the non-blocking socket. Between requests a connection's task
  does not wait on its socket: one task (:class:`_Poller`, an edge-triggered epoll on Linux) reads every
  connection that has bytes and answers node info at once, waking a connection's task only for what awaits
  (a GET, a POST, ...): a node-info request then costs no Trio reschedule and no ``epoll_ctl``. Elsewhere
  (and while the server closes) the task waits with ``trio.lowlevel.wait_readable`` itself.
* Any other request, and any request :func:`~trio_dht.proxy.http1.read_head` finds unusual, hands the
  connection over, with the bytes already read, to a hypercorn connection (``TCPServer``) serving the full
  ASGI app (:class:`~trio_dht.proxy.app.ProxyApp`: Quart routes, blueprints, limits, error pages). It stays
  there until it closes.

Per-IP rate limiting and the body-size limit apply here as in :class:`~trio_dht.proxy.app.ProxyApp`. TLS
connections (and, with ``fast_path`` off, every connection) go to hypercorn at once; this module still owns
the accept loops, the ASGI lifespan and the drain, so there is one server per proxy. Unusual-but-valid
requests cost a hand-over, never a wrong answer.

What a connection may cost (:mod:`~trio_dht.proxy.conn_limits`, from ``Limits``): each connection has one
deadline for what it waits for from the client (its next request, the end of a head counted from its first
byte, the end of a body counted from the end of its head, the client taking a response), and one sweeping
task closes those past theirs, a 408 first where a request was not all sent (no timeout per request). A GET
whose client does not read is cut past ``http_send_buffer`` bytes held, a listen stream likewise. Connections
are counted per client address where they are accepted (or taken over from a worker); an ``accept`` out of
file descriptors or memory pauses accepting (:class:`~trio_dht.proxy.conn_limits.AcceptPause`). Every limit
reached is counted in ``/node/stats`` ``"http"``. Idle connections close at once on shutdown.

Requires hypercorn 0.18's ``WorkerContext`` and ``Lifespan`` (pinned in pyproject.toml).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import math
import select
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import outcome
import trio
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import repr_socket_addr, wrap_app

from trio_dht.infohash import InfoHash
from trio_dht.proxy import handlers, relay
from trio_dht.proxy.app import TOO_LARGE, TOO_MANY_REQUESTS, ProxyApp
from trio_dht.proxy.conn_limits import (
    AcceptPause,
    Budgets,
    Expiry,
    PerAddress,
    close_late_connections,
    expire,
)
from trio_dht.proxy.handlers import BASE_HEADERS, Reply, error
from trio_dht.proxy.hot_routes import Route, hot_route
from trio_dht.proxy.http1 import (
    LAST_CHUNK,
    RECV_SIZE,
    UNUSUAL,
    Head,
    Writer,
    chunk,
    read_head,
)
from trio_dht.proxy.hypercorn_conn import HypercornLink
from trio_dht.proxy.ratelimit import RateLimiter
from trio_dht.proxy.streams import ListenFeed
from trio_dht.proxy.worker_link import WorkerLink

if TYPE_CHECKING:
    from trio_dht.push.service import PushReply

log = logging.getLogger(__name__)

INTERNAL_ERROR = error(500, "Internal server error")
REQUEST_TIMEOUT = error(408, "Request Timeout")
_INF = math.inf
_IDLE, _HEAD, _BODY, _SEND = Expiry.IDLE, Expiry.HEAD, Expiry.BODY, Expiry.SEND
_DEFAULT_BUDGETS = Budgets()
ANSWERS_PER_TURN = 32
"""At most this many pipelined requests of one connection are answered before other tasks get a turn."""

_HANG_UP = getattr(select, "EPOLLRDHUP", 0) | getattr(select, "EPOLLHUP", 0) | getattr(select, "EPOLLERR", 0)
"""Poller events saying the client's side ended: past the bytes read, a read returns the end (or an error)."""
_BLOCKING = (BlockingIOError, InterruptedError)
_GONE = (ConnectionError, OSError)


class ClientGone(Exception):
    """The peer closed or reset the connection."""


class _Connection:
    """One accepted socket: buffered non-blocking reads and writes through Trio's I/O waits."""

    def __init__(self, sock: socket.socket, client: str, budgets: Budgets = _DEFAULT_BUDGETS) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.client = client
        self.budgets = budgets
        self.limiter: RateLimiter | None = None
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
        """Bytes may be waiting on the socket that no readiness event will announce (see :class:`_Poller`)."""
        self.parked: trio.lowlevel.Task | None = None
        """The connection's task, while it waits for the poller to bring the next request."""
        self.node_info: tuple[handlers.NodeInfoDocument, bytes] | None = None
        """The last node-info response sent here, and the document it was made from."""
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
            except _BLOCKING:
                self.waited = True
                await trio.lowlevel.wait_readable(self.fd)
                continue
            except _GONE as exc:
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
        except _BLOCKING:
            self.readable = False
            return
        except _GONE as exc:
            raise ClientGone from exc
        if not data:
            raise ClientGone
        self.readable = len(data) == RECV_SIZE
        self.buffer += data

    def send_now(self, data: bytes) -> bytes:
        """Send what the socket takes without waiting; the rest of ``data``."""
        try:
            sent = self.sock.send(data)
        except _BLOCKING:
            return data
        except _GONE as exc:
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
            except _BLOCKING:
                if not blocked:
                    blocked = True
                    self.expiry = _SEND
                    self.deadline = trio.current_time() + self.budgets.send
                await trio.lowlevel.wait_writable(self.fd)
                continue
            except _GONE as exc:
                raise ClientGone from exc
            view = view[sent:]
            self.responding = True
        if blocked:
            self.deadline = _INF


class _Request(NamedTuple):
    """A request for the connection's task: its head, front-end handler and key (its body may be unread)."""

    head: Head
    handler: Callable[..., Awaitable[None]]
    key: InfoHash | None


class _Step(enum.Enum):
    YIELD = "let the other tasks run"
    FLUSH = "send the pending bytes"
    CLOSE = "close the connection"
    HAND_OVER = "hand the connection to hypercorn"


_Next = _Request | _Step | None
"""What a connection's task does next; None: wait for more bytes of a request."""


class _Poller:
    """One edge-triggered epoll over the fast-path connections, watched by one task (:meth:`run`).

    A connection waiting for its next request parks its task here instead of waiting on its own socket:
    Trio's one-shot registration costs an ``epoll_ctl`` per wait, and every wake-up a reschedule. When new
    bytes arrive, :meth:`run` reads them and calls ``serve_buffered``, which answers at once the requests that
    need no waiting (node info); the task is woken only for what it must do (a request that awaits, a
    hand-over, a blocked send, the end). Edge-triggered means an event per arrival of bytes, not "bytes are
    there": bytes that arrive while the task is busy set :attr:`_Connection.readable`, and the task reads them
    before it parks again.
    """

    def __init__(self, serve_buffered: Callable[[_Connection], _Next]) -> None:
        self._epoll = select.epoll()
        self._serve_buffered = serve_buffered
        self._connections: dict[int, _Connection] = {}

    def add(self, conn: _Connection) -> None:
        self._epoll.register(conn.fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
        self._connections[conn.fd] = conn

    def remove(self, conn: _Connection) -> None:
        if self._connections.pop(conn.fd, None) is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(conn.fd)

    def close(self) -> None:
        self._epoll.close()

    async def park(self, conn: _Connection) -> _Next:
        """Wait until :meth:`run` has something for the connection's task (the bytes are in its buffer)."""
        conn.parked = trio.lowlevel.current_task()
        conn.waited = True

        def abort(_: object) -> trio.lowlevel.Abort:
            conn.parked = None
            return trio.lowlevel.Abort.SUCCEEDED

        next_step: _Next = await trio.lowlevel.wait_task_rescheduled(abort)
        return next_step

    async def run(self) -> None:
        epoll_fd = self._epoll.fileno()
        poll = self._epoll.poll
        connections = self._connections
        serve_buffered = self._serve_buffered
        while True:
            await trio.lowlevel.wait_readable(epoll_fd)
            now = trio.current_time()
            for fd, flags in poll(0):
                conn = connections.get(fd)
                if conn is None:
                    continue
                task = conn.parked
                if task is None:  # its task is busy: it reads before it parks again
                    conn.readable = True
                    continue
                result: outcome.Outcome[_Next]
                try:
                    conn.recv_now()
                    if flags & _HANG_UP:  # the end came with the bytes just read: the task reads it next
                        conn.readable = True
                    next_step = serve_buffered(conn)
                except Exception as exc:  # ClientGone, or a bug: the task ends the connection
                    result = outcome.Error(exc)
                else:
                    if next_step is None and not conn.readable:  # stays parked
                        if conn.deadline == _INF or conn.buffer:
                            conn.wait_for_request(now)
                        continue
                    result = outcome.Value(next_step)
                conn.parked = None
                trio.lowlevel.reschedule(task, result)


class FrontEnd:
    """Serves the plain listening sockets of one proxy app (see the module docstring)."""

    def __init__(
        self, app: ProxyApp, hypercorn_config: Config, *, fast_path: bool = True, http_workers: int = 0
    ) -> None:
        self.app = app
        self.state = app.state
        self.fast_path = fast_path
        self.writer = Writer(BASE_HEADERS)
        self._internal_error = self.writer.reply(INTERNAL_ERROR.status, INTERNAL_ERROR.body, close=True)
        self._push = app.state.push is not None
        self._max_body = app.state.config.max_body
        self._asgi = wrap_app(app, hypercorn_config.wsgi_max_body_size, "asgi")
        self._hypercorn_config = hypercorn_config
        self._context = WorkerContext(None)
        self._connections: set[_Connection] = set()
        self._poller: _Poller | None = None
        self._closing = False
        self._shutdown = trio.Event()
        self._http_workers = http_workers
        self._workers: list[WorkerLink] = []
        limits = app.state.config.limits
        self.budgets = Budgets.from_limits(limits)
        self.counters = app.state.http_counters
        """The HTTP limits reached in this process (a worker's are added in :meth:`_limit_stats`)."""
        self._per_address = PerAddress(limits.http_connections_per_ip)
        self._accept_pause = AcceptPause()
        self.timeout_response = self.writer.reply(REQUEST_TIMEOUT.status, REQUEST_TIMEOUT.body, close=True)
        """What a client whose request is late gets before its connection closes."""
        self._hypercorn = HypercornLink(
            self._asgi,
            hypercorn_config,
            self._context,
            self.budgets.send,
            self.counters,
            self.timeout_response,
        )
        app.state.stats_sources.append(self._limit_stats)

    async def serve(
        self,
        plain: list[socket.socket],
        tls: list[socket.socket] = (),  # type: ignore[assignment]
        ssl_context: ssl.SSLContext | None = None,
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the bound, listening sockets (``tls`` ones with ``ssl_context``, all by hypercorn) until
        :meth:`shutdown` (or cancellation); then idle connections close at once and requests in flight
        finish (the caller bounds how long). The ASGI lifespan runs around it, as hypercorn runs it.
        """
        urls = [f"https://{repr_socket_addr(s.family, s.getsockname())}" for s in tls]
        urls += [f"http://{repr_socket_addr(s.family, s.getsockname())}" for s in plain]
        lifespan = Lifespan(self._asgi, self._hypercorn_config, {})
        if self.fast_path and plain and hasattr(select, "epoll"):
            self._poller = _Poller(self._serve_buffered)
        try:
            async with trio.open_nursery() as lifespan_nursery:
                await lifespan_nursery.start(lifespan.handle_lifespan)
                await lifespan.wait_for_startup()
                async with trio.open_nursery() as connections:
                    try:
                        async with trio.open_nursery() as acceptors:
                            if self._poller is not None and self._push and self._http_workers > 0:
                                self._workers = [WorkerLink(self, plain) for _ in range(self._http_workers)]
                                self.state.stats_sources.append(self._worker_stats)
                                for link in self._workers:  # drained (not cancelled) on shutdown
                                    connections.start_soon(link.run, connections)
                                for link in self._workers:
                                    await link.serving.wait()
                            else:
                                for sock in plain:
                                    acceptors.start_soon(self.accept_loop, sock, connections)
                            for sock in tls:
                                acceptors.start_soon(self.accept_loop, sock, connections, ssl_context)
                            acceptors.start_soon(
                                close_late_connections,
                                self.budgets.sweep_interval,
                                lambda: self._connections,
                                self._expire,
                            )
                            if self._poller is not None:
                                acceptors.start_soon(self._poller.run)
                            task_status.started(urls)
                            await self._shutdown.wait()
                            acceptors.cancel_scope.cancel()
                    finally:
                        with trio.CancelScope(shield=True):
                            await self._drain()
                await lifespan.wait_for_shutdown()
                lifespan_nursery.cancel_scope.cancel()
        finally:
            if self._poller is not None:
                self._poller.close()

    def _worker_stats(self) -> dict[str, Any]:
        links = self._workers
        return {
            "httpWorkers": {
                "serving": sum(link.ready for link in links),
                "restarts": sum(link.restarts for link in links),
                "droppedHandOvers": sum(link.dropped_hand_overs for link in links),
            }
        }

    def _limit_stats(self) -> dict[str, Any]:
        counters = self.counters.total(self._per_address, self._accept_pause)
        counters.listens_refused += self.state.listens.refused
        counters.send_buffer_overflows += self.state.listens.overflows
        for link in self._workers:
            counters.add(link.counts())
        return {"http": {**counters.as_json(), "connectionAddresses": len(self._per_address)}}

    def shutdown(self) -> None:
        """Stop accepting and close idle connections; :meth:`serve` returns once the others are done."""
        self._shutdown.set()

    async def _drain(self) -> None:
        self._closing = True  # from now on a connection's task waits for its own bytes (the poller is gone)
        for link in self._workers:
            link.drain()
        for conn in self._connections:
            if conn.deadline != _INF and conn.expiry in (_IDLE, _HEAD):  # waits for a request
                conn.scope.cancel()
        await self._context.terminated.set()  # hypercorn's idle connections close

    def _expire(self, conn: _Connection) -> None:
        """Close a connection past its deadline: a request not all sent gets a 408 first (counted)."""
        expiry, conn.deadline = conn.expiry, _INF
        responded = conn.pending or conn.responding
        expire(self.counters, expiry, conn.sock, b"" if responded else self.timeout_response)
        conn.scope.cancel()

    async def accept_loop(
        self, listener: socket.socket, nursery: trio.Nursery, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        """Accept connections on ``listener`` and serve each in a task of ``nursery``."""
        listener.setblocking(False)
        pause = self._accept_pause
        while True:
            try:
                sock, addr = listener.accept()
            except _BLOCKING:
                await trio.lowlevel.wait_readable(listener)
                continue
            except OSError as exc:  # skipped, or accepting pauses (no descriptor or memory left)
                delay = pause.after(exc, trio.current_time())
                if delay:
                    await trio.sleep(delay)
                continue
            pause.accepted()
            client = str(addr[0]) if isinstance(addr, tuple) else ""
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # gone already
                sock.close()
                continue
            if not self._per_address.acquire(client):  # counted; taken last, released when the task ends
                sock.close()
                continue
            nursery.start_soon(self._serve_connection, sock, client, ssl_context)

    async def _serve_connection(
        self, sock: socket.socket, client: str, ssl_context: ssl.SSLContext | None, read: bytes = b""
    ) -> None:
        """Serve an accepted connection (counted for its client's address until it ends); ``read``: its bytes
        a worker read already."""
        conn = _Connection(sock, client, self.budgets)
        conn.buffer += read
        try:
            if ssl_context is not None:
                await self._hand_over(conn, ssl_context)
            elif not self.fast_path:
                await self._hand_over(conn)
            else:
                conn.limiter = self._limiter_for(client)
                self._connections.add(conn)
                if self._poller is not None:
                    self._poller.add(conn)
                hand_over = False
                try:
                    with conn.scope:
                        hand_over = await self._serve_requests(conn)
                finally:
                    self._connections.discard(conn)
                    if self._poller is not None:
                        self._poller.remove(conn)
                if hand_over:
                    await self._hand_over(conn)
        except ClientGone:
            pass
        except Exception:
            log.exception("proxy connection from %s failed", client)
        finally:
            sock.close()  # also after hypercorn, which leaves it open when a TLS handshake fails
            self._per_address.release(client)

    def _limiter_for(self, client: str) -> RateLimiter | None:
        """The rate limiter that applies to a client: None for a trusted one (see RateLimit.loopback)."""
        limiter = self.state.limiter
        if limiter is not None:
            client_key = limiter.client_key(client)
            if client_key is None or not client_key[1] or limiter.limit.loopback:
                return limiter
        return None

    def _refusal(self, limiter: RateLimiter | None, client: str, content_length: int) -> bytes | None:
        """The response that refuses a hot request before it is read (over the rate or the body limit); the
        connection closes after it."""
        if limiter is not None and not limiter.allow(client, trio.current_time()):
            refusal: Reply = TOO_MANY_REQUESTS
        elif content_length > self._max_body:
            refusal = TOO_LARGE
        else:
            return None
        return self.writer.reply(refusal.status, refusal.body, refusal.headers, close=True)

    async def _serve_requests(self, conn: _Connection) -> bool:
        """Answer hot requests until the connection is to be closed (False) or handed to hypercorn (True)."""
        next_step: _Next = None
        while True:
            if next_step is None:
                next_step = self._serve_buffered(conn)
            if next_step is None:  # wait for (the rest of) a request head, until its deadline
                if self._closing and not conn.buffer:
                    return False
                if conn.deadline == _INF or conn.buffer:
                    conn.wait_for_request(trio.current_time())
                next_step = await self._wait_for_request(conn)
                continue
            if next_step is _Step.YIELD:  # a client that always has more must not starve the others
                await trio.lowlevel.checkpoint()
                next_step = None
                continue
            if next_step is _Step.FLUSH:
                await conn.send(conn.pending)
                conn.pending = b""
                next_step = None
                continue
            if next_step is _Step.CLOSE:
                return False
            if next_step is _Step.HAND_OVER:
                return True
            assert isinstance(next_step, _Request)
            head, handler, key = next_step
            next_step = None
            end = head.size + head.content_length
            if len(conn.buffer) < end:  # the body's deadline counts from the end of its head
                conn.expiry, conn.deadline = _BODY, trio.current_time() + conn.budgets.body
                while len(conn.buffer) < end:
                    await conn.fill()
                conn.deadline = _INF
            body = bytes(conn.buffer[head.size : end]) if head.content_length else b""
            del conn.buffer[:end]
            conn.responding = False
            try:
                await handler(self, conn, head, key, body)
            except ClientGone:
                raise
            except Exception:
                if conn.responding:
                    raise  # a stream cut short: closing the connection tells the client
                log.exception("proxy front end failed on %s %r", head.method, head.target)
                await conn.send(self._internal_error)
                return False
            if head.close or self._closing:
                return False
            if not conn.waited:  # a client that always has the next request ready must not starve the others
                await trio.lowlevel.checkpoint()
            conn.waited = False

    async def _wait_for_request(self, conn: _Connection) -> _Next:
        """More bytes of a request in ``conn.buffer``, or what the poller already did with them."""
        if self._poller is None or self._closing:  # the poller is gone once the server closes
            await conn.fill(wait_first=not conn.buffer)  # an empty buffer: the client is not done
            return None
        if conn.readable:  # bytes came while the task was busy, or more than one read's worth
            await trio.lowlevel.checkpoint()  # a client that always has more must not starve the others
            conn.recv_now()
            return None
        return await self._poller.park(conn)

    def _serve_buffered(self, conn: _Connection) -> _Next:
        """Answer the buffered requests that need no waiting (node info; refusals), as far as the socket takes
        the responses; then what the connection's task must do next (None: wait for more bytes).

        Called by the connection's task, and by the poller while the task is parked.
        """
        buffer = conn.buffer
        for _ in range(ANSWERS_PER_TURN):
            if conn.pending:
                return _Step.FLUSH
            if conn.ending:
                return _Step.CLOSE
            head = read_head(buffer) if buffer else None
            if head is None:
                return None
            if head is UNUSUAL:
                return _Step.HAND_OVER
            assert isinstance(head, Head)
            route = hot_route(head, push=self._push)
            if route is None:
                return _Step.HAND_OVER
            conn.deadline = _INF
            handler, key = _HANDLERS[route[0]], route[1]
            refusal = self._refusal(conn.limiter, conn.client, head.content_length)
            if refusal is not None:  # the body (if any) is not read, so the connection ends
                conn.ending = True
                conn.pending = conn.send_now(refusal)
                continue
            end = head.size + head.content_length
            answer = _ANSWERED_AT_ONCE.get(handler)
            if answer is None or len(buffer) < end:
                return _Request(head, handler, key)
            body = bytes(buffer[head.size : end]) if head.content_length else b""
            del buffer[:end]
            try:
                response = answer(self, conn, head, key, body)
            except Exception:
                log.exception("proxy front end failed on %s %r", head.method, head.target)
                response = self._internal_error
                conn.ending = True
            if not isinstance(response, bytes):  # a reply that needs the key's values: a DHT get, in the task
                bare = head._replace(size=0, content_length=0)  # the body is read already
                return _Request(bare, functools.partial(FrontEnd.finish_subscribe, reply=response), key)
            conn.ending = conn.ending or head.close or self._closing
            conn.pending = conn.send_now(response)
        return _Step.YIELD

    async def _hand_over(self, conn: _Connection, ssl_context: ssl.SSLContext | None = None) -> None:
        """Serve the rest of the connection with hypercorn, starting with the bytes already read."""
        read = bytes(conn.buffer)
        conn.buffer.clear()
        await self._hypercorn.serve(conn.sock, read, ssl_context)

    # -- the hot routes -------------------------------------------------------------------------------------

    async def send_reply(self, conn: _Connection, head: Head, reply: Reply) -> None:
        await conn.send(self.writer.reply(reply.status, reply.body, reply.headers, close=head.close))

    def node_info_response(
        self, conn: _Connection, head: Head, key: InfoHash | None = None, body: bytes = b""
    ) -> bytes:
        """The response to a node-info request; the connection keeps it while the document stays the same
        (the client's address is the only other part).
        """
        document = handlers.node_info_document(self.state)
        cached = conn.node_info
        if cached is not None and cached[0] is document and not head.close:
            return cached[1]
        reply = handlers.node_info_reply(document, conn.client)
        response = self.writer.reply(reply.status, reply.body, reply.headers, close=head.close)
        if document is not None and not head.close:
            conn.node_info = (document, response)
        return response

    async def node_info(self, conn: _Connection, head: Head, key: InfoHash | None, body: bytes) -> None:
        """Node info is answered by :meth:`_serve_buffered` as soon as its request is read; here only when the
        request has a body not all read yet.
        """
        await conn.send(self.node_info_response(conn, head))

    async def get(self, conn: _Connection, head: Head, key: InfoHash | None, body: bytes) -> None:
        """Values go out as the DHT finds them, written from its callback as far as the socket takes them
        (no task, no channel); the head goes with the first chunk (or the end): one send where OpenDHT
        makes two.
        """
        assert key is not None
        out = self.writer.stream_head(close=head.close)  # what is not sent yet
        gone = done = False

        def on_lines(lines: bytes) -> None:
            nonlocal out, gone
            if gone or done:  # a late callback must not write past the end of the response
                return
            try:
                out = conn.send_now(out + chunk(lines))
            except ClientGone:
                gone = True
                conn.scope.cancel()  # nobody reads: stop the get, close the connection
                return
            if len(out) > conn.budgets.send_buffer:  # the client does not read: cut the response
                self.counters.send_buffer_overflows += 1
                gone = True
                conn.scope.cancel()

        try:
            await handlers.get_lines(self.state, key, on_lines)
        finally:
            done = True
        if gone:  # the get ended before the cancellation reached it
            raise ClientGone
        await conn.send(out + LAST_CHUNK)

    async def listen(self, conn: _Connection, head: Head, key: InfoHash | None, body: bytes) -> None:
        """A never-ending stream (see :class:`_ListenWriter`); the connection closes when it ends."""
        assert key is not None
        if self._poller is not None:
            self._poller.remove(conn)  # the task watches the socket itself from now on
        conn.ending = True  # the response ends only on shutdown (or badly): no next request
        writer = _ListenWriter(conn, self.writer.stream_head(close=head.close))
        feed = handlers.listen_feed(self.state, key, writer.on_ready, conn.client)
        if isinstance(feed, Reply):  # too many streams from this address
            await conn.send(self.writer.reply(feed.status, feed.body, feed.headers, close=True))
            return
        writer.feed = feed
        if self._closing:  # shutting down: the open streams were closed already
            feed.close()
        try:
            await writer.run()
        finally:
            feed.cancel()

    async def put(self, conn: _Connection, head: Head, key: InfoHash | None, body: bytes) -> None:
        assert key is not None
        await self.send_reply(conn, head, await handlers.put(self.state, key, body, conn.client))

    async def subscribe(self, conn: _Connection, head: Head, key: InfoHash | None, body: bytes) -> None:
        assert key is not None
        await self.send_push_reply(conn, head, await handlers.subscribe(self.state, key, body, conn.client))

    async def unsubscribe(self, conn: _Connection, head: Head, key: InfoHash | None, body: bytes) -> None:
        assert key is not None
        await self.send_push_reply(conn, head, handlers.unsubscribe(self.state, key, body))

    def subscribe_response(
        self, conn: _Connection, head: Head, key: InfoHash | None, body: bytes
    ) -> bytes | PushReply:
        """The response to a SUBSCRIBE whose body is buffered, answered by whoever read it (the poller,
        usually); or its reply, when that still needs the key's values (:meth:`finish_subscribe`)."""
        assert key is not None
        return self._subscribe_answer(key, body, head.close, conn.client)

    def unsubscribe_response(self, conn: _Connection, head: Head, key: InfoHash | None, body: bytes) -> bytes:
        """The response to an UNSUBSCRIBE whose body is buffered."""
        assert key is not None
        return self._unsubscribe_answer(key, body, head.close, conn.client)

    async def finish_subscribe(
        self, conn: _Connection, head: Head, key: InfoHash | None, body: bytes, *, reply: PushReply
    ) -> None:
        """Send a SUBSCRIBE's reply with the values now under its key."""
        assert key is not None
        await conn.send(await self._values_answer(key, reply, head.close))

    def _subscribe_answer(self, key: InfoHash, body: bytes, close: bool, client: str) -> bytes | PushReply:
        """A SUBSCRIBE's response; or its reply, when that still needs the key's values
        (:meth:`_values_answer`)."""
        reply = handlers.subscribe_now(self.state, key, body, client)
        return reply if reply.fetch_values else self.push_response(close, reply)

    def _unsubscribe_answer(self, key: InfoHash, body: bytes, close: bool, client: str) -> bytes:
        return self.push_response(close, handlers.unsubscribe(self.state, key, body))

    async def _values_answer(self, key: InfoHash, reply: PushReply, close: bool) -> bytes:
        """A SUBSCRIBE's response with the values now under its key."""
        return self.push_response(close, await handlers.push_reply_values(self.state, key, reply))

    async def send_push_reply(self, conn: _Connection, head: Head, reply: PushReply) -> None:
        await conn.send(self.push_response(head.close, reply))

    def push_response(self, close: bool, reply: PushReply) -> bytes:
        """A complete reply, or a chunked one (the whole of it known already), as bytes for one send."""
        if not reply.chunked:
            return self.writer.reply(reply.status, reply.body, close=close)
        chunks = b"".join(chunk(data) for data in handlers.push_reply_chunks(reply))
        return self.writer.stream_head(reply.status, close=close) + chunks + LAST_CHUNK

    # -- what HTTP worker processes relay (see trio_dht.proxy.worker_link) -----------------------------------

    def relayed_response(self, request: relay.Relayed) -> tuple[bytes | PushReply, bool]:
        """The response to a request a worker relayed, and whether its connection closes after it; or a
        SUBSCRIBE's reply that still needs the key's values (:meth:`relayed_values_response`)."""
        refusal = self._refusal(self._limiter_for(request.client), request.client, len(request.body))
        if refusal is not None:
            return refusal, True
        close = request.close or self._closing
        answer = self._subscribe_answer if request.method == relay.SUBSCRIBE else self._unsubscribe_answer
        try:
            return answer(InfoHash(request.key), request.body, close, request.client), close
        except Exception:
            log.exception("proxy front end failed on a relayed %s", relay.METHOD_NAMES[request.method])
            return self._internal_error, True

    async def relayed_values_response(self, key: bytes, reply: PushReply, close: bool) -> tuple[bytes, bool]:
        """The response to a relayed SUBSCRIBE with the values now under its key."""
        try:
            return await self._values_answer(InfoHash(key), reply, close), close
        except Exception:
            log.exception("proxy front end failed on a relayed SUBSCRIBE")
            return self._internal_error, True

    def take_over(self, sock: socket.socket, read: bytes, connections: trio.Nursery) -> None:
        """Serve a connection a worker handed over, starting with the bytes it read (counted for its client's
        address from now on: the worker no longer counts it)."""
        try:
            sock.setblocking(False)
            client = str(sock.getpeername()[0])
        except OSError:  # gone already
            sock.close()
            return
        if not self._per_address.acquire(client):
            sock.close()
            return
        connections.start_soon(self._serve_connection, sock, client, None, read)


_HANDLERS: dict[Route, Callable[..., Awaitable[None]]] = {
    Route.NODE_INFO: FrontEnd.node_info,
    Route.GET: FrontEnd.get,
    Route.PUT: FrontEnd.put,
    Route.LISTEN: FrontEnd.listen,
    Route.SUBSCRIBE: FrontEnd.subscribe,
    Route.UNSUBSCRIBE: FrontEnd.unsubscribe,
}
"""The front end's handler of each hot route."""
_ANSWERED_AT_ONCE: dict[Callable[..., Awaitable[None]], Callable[..., bytes | PushReply]] = {
    FrontEnd.node_info: FrontEnd.node_info_response,
    FrontEnd.subscribe: FrontEnd.subscribe_response,
    FrontEnd.unsubscribe: FrontEnd.unsubscribe_response,
}
"""Hot routes whose buffered requests are answered without waiting by whoever read them (usually the poller,
which then wakes no task): handler -> ``(front end, conn, head, key, body) -> response bytes``."""


class _ListenWriter:
    """Writes a :class:`~trio_dht.proxy.streams.ListenFeed` to a front-end connection.

    New lines are sent from the DHT's callback (:meth:`on_ready`) as far as the socket takes them: one value
    sent to many streams costs each a ``send`` and no task wake-up. The connection's task (:meth:`run`) sends
    the head and what the socket did not take, and otherwise waits for the client's bytes: its close or
    half-close ends the stream (the listen is cancelled); bytes it sends are dropped (nothing can be answered
    after a never-ending response). A stream whose client does not read ends when its feed overflows (the
    connection is cut); a closed feed (shutdown) ends with the last chunk.
    """

    def __init__(self, conn: _Connection, head: bytes) -> None:
        self.conn = conn
        self.feed: ListenFeed | None = None
        self._out = head
        """Bytes to send before any other (the head first): only the task sends them."""
        self._waiting: trio.CancelScope | None = None
        """While the task waits for the client (nothing to send): cancelled to wake it."""
        self._gone = False

    def on_ready(self) -> None:
        feed = self.feed
        if feed is None:  # lines of the values already there: the task sends them with the head
            return
        if feed.overflowed:
            self.conn.scope.cancel()  # the task may be waiting to send to a client that does not read
            return
        waiting = self._waiting
        if waiting is None or self._out or self._gone:  # the task is busy or woken: it takes the lines next
            return
        if not feed.ended:
            try:
                self._out = self.conn.send_now(chunk(feed.take()))
            except ClientGone:
                self._gone = True
            if not self._out and not self._gone:
                return
        waiting.cancel()

    async def run(self) -> None:
        conn = self.conn
        feed = self.feed
        assert feed is not None
        while True:
            if self._gone or feed.overflowed:
                raise ClientGone
            lines = feed.take()
            if lines:
                self._out += chunk(lines)
            if self._out:
                await conn.send(self._out)
                self._out = b""
                continue
            if feed.ended:
                await conn.send(LAST_CHUNK)
                return
            with trio.CancelScope() as self._waiting:
                await trio.lowlevel.wait_readable(conn.fd)
            self._waiting = None
            if not self._out and not feed.ready and not self._gone:  # the client sent bytes, or its end
                conn.recv_now()  # ClientGone at the end
                conn.buffer.clear()
