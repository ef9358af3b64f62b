"""The proxy's listeners: a small HTTP/1.1 server for the routes of the table, hypercorn for the rest.

Why: hypercorn's Trio worker spends more CPU on a request before any route runs than this server spends on
the whole of it. So the plain listening sockets are served here: every request
:func:`~trio_dht.proxy.http1.read_head` reads whose route :func:`trio_dht.rest.paths.match` finds is answered
by that route's handler (:data:`~trio_dht.proxy.routes.ROUTES`, the same for every HTTP layer); only the
moving of bytes is here. Its parts:

* :class:`~trio_dht.proxy.connection.Connection`: a socket's non-blocking I/O and its deadline.
* :class:`~trio_dht.proxy.poller.Poller` (Linux): between requests a connection's task does not wait on its
  socket; one task reads every connection that has bytes and answers what needs no waiting (node info,
  SUBSCRIBE, ...) at once, waking a connection's task only for what awaits (a GET, a POST, ...): such a
  request then costs no Trio reschedule and no ``epoll_ctl``. Elsewhere (and while the server closes) the task
  waits with ``trio.lowlevel.wait_readable`` itself.
* :mod:`~trio_dht.proxy.stream_writers`: GET and listen streams, written from the DHT's callbacks.
* :class:`~trio_dht.proxy.worker_link.WorkerLink`: HTTP worker processes that accept the plain connections
  and relay SUBSCRIBE/UNSUBSCRIBE here (:class:`FrontEnd` is their
  :class:`~trio_dht.proxy.worker_link.Relay`).
* :class:`~trio_dht.proxy.hypercorn_link.HypercornLink`: any other request, and any request ``read_head``
  finds unusual, hands the connection over, with the bytes already read, to a hypercorn connection serving
  the ASGI app (:class:`~trio_dht.proxy.asgi.ProxyApp`: the same routes on a raw-ASGI path, Quart for the
  rest). It stays there until it closes. TLS connections go to hypercorn at once.

Per-IP rate limiting and the body-size limit apply here as in :class:`~trio_dht.proxy.asgi.ProxyApp`. This
module owns the accept loops, the ASGI lifespan and the drain, so there is one server per proxy.
Unusual-but-valid requests cost a hand-over, never a wrong answer.

What a connection may cost (:mod:`~trio_dht.proxy.conn_limits`, from ``Limits``): each connection has one
deadline for what it waits for from the client (its next request, the end of a head counted from its first
byte, the end of a body counted from the end of its head, the client taking a response), and one sweeping
task closes those past theirs, a 408 first where a request was not all sent (no timeout per request). A GET
whose client does not read is cut past ``http_send_buffer`` bytes held, a listen stream likewise. Connections
are counted per client address where they are accepted (or taken over from a worker); an ``accept`` out of
file descriptors or memory pauses accepting (:class:`~trio_dht.proxy.conn_limits.AcceptPause`). Every limit
reached is counted in ``/node/stats`` ``"http"``. Idle connections close at once on shutdown.

Every request answered here is counted by route and status, with its latency, in the state's
:class:`~trio_dht.proxy.request_counts.RequestCounts` (``/metrics``), those a worker relays included: the
worker reads and writes them, this process answers them.
"""

from __future__ import annotations

import functools
import logging
import math
import select
import socket
import ssl
from time import perf_counter
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Config

from trio_dht.infohash import InfoHash
from trio_dht.proxy import relay
from trio_dht.proxy.conn_limits import (
    AcceptPause,
    Budgets,
    Expiry,
    PerAddress,
    close_late_connections,
    expire,
)
from trio_dht.proxy.connection import BLOCKING, ClientGone, Connection
from trio_dht.proxy.http1 import LAST_CHUNK, UNUSUAL, Head, Writer, chunk, read_head
from trio_dht.proxy.hypercorn_link import HypercornLink, url
from trio_dht.proxy.poller import Next, Pending, Poller, Step
from trio_dht.proxy.ratelimit import HttpRateLimiter
from trio_dht.proxy.replies import (
    BASE_HEADERS,
    INTERNAL_ERROR,
    REQUEST_TIMEOUT,
    TOO_LARGE,
    TOO_MANY_REQUESTS,
    Reply,
)
from trio_dht.proxy.routes import ROUTES, Answer, Later, Request
from trio_dht.proxy.stream_writers import ListenWriter, write_get
from trio_dht.proxy.streams import GetStream
from trio_dht.proxy.worker_link import WorkerLink
from trio_dht.rest.paths import Route, match

if TYPE_CHECKING:
    from trio_dht.proxy.asgi import ProxyApp

log = logging.getLogger(__name__)

_INF = math.inf
_IDLE, _HEAD, _BODY = Expiry.IDLE, Expiry.HEAD, Expiry.BODY
ANSWERS_PER_TURN = 32
"""At most this many pipelined requests of one connection are answered before other tasks get a turn."""
_RELAYED_ROUTES = {relay.SUBSCRIBE: Route.SUBSCRIBE, relay.UNSUBSCRIBE: Route.UNSUBSCRIBE}


class FrontEnd:
    """Serves the plain listening sockets of one proxy app (see the module docstring)."""

    def __init__(self, app: ProxyApp, hypercorn_config: Config, *, http_workers: int = 0) -> None:
        self.app = app
        self.state = app.state
        self.writer = Writer(BASE_HEADERS)
        self._internal_error = self._response(INTERNAL_ERROR, close=True)
        self._push = app.state.push is not None
        self._served = app.state.served
        self._max_body = app.state.config.max_body
        self._connections: set[Connection] = set()
        self._poller: Poller | None = None
        self._closing = False
        self._shutdown = trio.Event()
        self._http_workers = http_workers
        self._workers: list[WorkerLink] = []
        limits = app.state.config.limits
        self.budgets = Budgets.from_limits(limits)
        self.connections_per_address = limits.http_connections_per_ip
        self.counters = app.state.http_counters
        self.requests = app.state.request_counts
        """Requests answered, by route and status, with their latency (``/metrics``)."""
        """The HTTP limits reached in this process (a worker's are added in :meth:`_limit_stats`)."""
        self._per_address = PerAddress(limits.http_connections_per_ip)
        self._accept_pause = AcceptPause()
        self.timeout_response = self._response(REQUEST_TIMEOUT, close=True)
        """What a client whose request is late gets before its connection closes."""
        self._hypercorn = HypercornLink.create(
            app, hypercorn_config, self.budgets.send, self.counters, self.timeout_response
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

        Its tasks: the accept loops (or the HTTP worker links, which accept in a worker process), the sweep of
        late connections and the poller in one nursery, cancelled on shutdown; every connection (and a
        relayed SUBSCRIBE waiting for its values) in another, drained.
        """
        urls = [url(s, "https") for s in tls] + [url(s, "http") for s in plain]
        if plain and hasattr(select, "epoll"):
            self._poller = Poller(self._serve_buffered)
        try:
            async with self._hypercorn.lifespan(), trio.open_nursery() as connections:
                try:
                    async with trio.open_nursery() as acceptors:
                        if self._poller is not None and self._push and self._http_workers > 0:
                            self._workers = [WorkerLink(self, plain) for _ in range(self._http_workers)]
                            self.state.stats_sources.append(self._worker_stats)
                            self.state.parts.append(self._stopped_workers)
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

    def _stopped_workers(self) -> list[str]:
        """The HTTP workers not serving (restarting, or unable to start: the front end accepts instead)."""
        return [f"HTTP worker {i + 1}" for i, link in enumerate(self._workers) if not link.ready]

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
        await self._hypercorn.close_idle()

    def _expire(self, conn: Connection) -> None:
        """Close a connection past its deadline: a request not all sent gets a 408 first (counted)."""
        expiry, conn.deadline = conn.expiry, _INF
        responded = conn.pending or conn.responding
        expire(self.counters, expiry, conn.sock, b"" if responded else self.timeout_response)
        conn.scope.cancel()

    # -- connections ----------------------------------------------------------------------------------------

    async def accept_loop(
        self, listener: socket.socket, nursery: trio.Nursery, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        """Accept connections on ``listener`` and serve each in a task of ``nursery``."""
        listener.setblocking(False)
        pause = self._accept_pause
        while True:
            try:
                sock, addr = listener.accept()
            except BLOCKING:
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

    async def _serve_connection(
        self, sock: socket.socket, client: str, ssl_context: ssl.SSLContext | None, read: bytes = b""
    ) -> None:
        """Serve an accepted connection (counted for its client's address until it ends); ``read``: its bytes
        a worker read already."""
        conn = Connection(sock, client, self.budgets)
        conn.buffer += read
        try:
            if ssl_context is not None:
                await self._hand_over(conn, ssl_context)
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

    async def _hand_over(self, conn: Connection, ssl_context: ssl.SSLContext | None = None) -> None:
        """Serve the rest of the connection with hypercorn, starting with the bytes already read."""
        read = bytes(conn.buffer)
        conn.buffer.clear()
        await self._hypercorn.serve(conn.sock, read, ssl_context)

    def _limiter_for(self, client: str) -> HttpRateLimiter | None:
        """The rate limiter that applies to a client: None for a trusted one (see RateLimit.loopback)."""
        limiter = self.state.limiter
        if limiter is not None:
            client_key = limiter.client_key(client)
            if client_key is None or not client_key[1] or limiter.limit.loopback:
                return limiter
        return None

    def _refusal(self, limiter: HttpRateLimiter | None, client: str, content_length: int) -> Reply | None:
        """The reply that refuses a request before it is read (over the rate or the body limit); the
        connection closes after it."""
        if limiter is not None and not limiter.allow(client, trio.current_time()):
            return TOO_MANY_REQUESTS
        if content_length > self._max_body:
            return TOO_LARGE
        return None

    # -- serving: from bytes to a route's handler, and its answer back --------------------------------------

    async def _serve_requests(self, conn: Connection) -> bool:
        """Answer requests until the connection is to be closed (False) or handed to hypercorn (True)."""
        next_step: Next = None
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
            if next_step is Step.YIELD:  # a client that always has more must not starve the others
                await trio.lowlevel.checkpoint()
                next_step = None
                continue
            if next_step is Step.FLUSH:
                await conn.send(conn.pending)
                conn.pending = b""
                next_step = None
                continue
            if next_step is Step.CLOSE:
                return False
            if next_step is Step.HAND_OVER:
                return True
            assert isinstance(next_step, Pending)
            head, spec, key, answer, route, start = next_step
            next_step = None
            conn.responding = False
            try:
                if answer is None:
                    end = head.size + head.content_length
                    if len(conn.buffer) < end:  # the body's deadline counts from the end of its head
                        conn.expiry, conn.deadline = _BODY, trio.current_time() + conn.budgets.body
                        while len(conn.buffer) < end:
                            await conn.fill()
                        conn.deadline = _INF
                    body = bytes(conn.buffer[head.size : end]) if head.content_length else b""
                    del conn.buffer[:end]
                    answer = spec.handler(self.state, Request(key, body, conn.client))
                await self._respond(conn, head, answer, route, start)
            except ClientGone:
                raise
            except Exception:
                if conn.responding:
                    raise  # a stream cut short: closing the connection tells the client
                log.exception("proxy front end failed on %s %r", head.method, head.target)
                await conn.send(self._internal_error)
                self.requests.observe(route, 500, perf_counter() - start)
                return False
            if head.close or conn.ending or self._closing:
                return False
            if not conn.waited:  # a client that always has the next request ready must not starve the others
                await trio.lowlevel.checkpoint()
            conn.waited = False

    async def _wait_for_request(self, conn: Connection) -> Next:
        """More bytes of a request in ``conn.buffer``, or what the poller already did with them."""
        if self._poller is None or self._closing:  # the poller is gone once the server closes
            await conn.fill(wait_first=not conn.buffer)  # an empty buffer: the client is not done
            return None
        if conn.readable:  # bytes came while the task was busy, or more than one read's worth
            await trio.lowlevel.checkpoint()  # a client that always has more must not starve the others
            conn.recv_now()
            return None
        return await self._poller.park(conn)

    def _serve_buffered(self, conn: Connection) -> Next:
        """Answer the buffered requests that need no waiting (a route whose handler replies at once;
        refusals), as far as the socket takes the responses; then what the connection's task must do next
        (None: wait for more bytes).

        Called by the connection's task, and by the poller while the task is parked.
        """
        buffer = conn.buffer
        state = self.state
        for _ in range(ANSWERS_PER_TURN):
            if conn.pending:
                return Step.FLUSH
            if conn.ending:
                return Step.CLOSE
            head = read_head(buffer) if buffer else None
            if head is None:
                return None
            if head is UNUSUAL:
                return Step.HAND_OVER
            assert isinstance(head, Head)
            matched = match(head.method, head.target, self._served)
            if matched is None:
                return Step.HAND_OVER
            conn.deadline = _INF
            route, key = matched
            spec = ROUTES[route]
            refusal = self._refusal(conn.limiter, conn.client, head.content_length)
            if refusal is not None:  # the body (if any) is not read, so the connection ends
                conn.ending = True
                conn.pending = conn.send_now(self._response(refusal, close=True))
                self.requests.answered_at_once(route, refusal.status)
                continue
            end = head.size + head.content_length
            if len(buffer) < end:
                return Pending(head, spec, key, None, route, perf_counter())
            body = bytes(buffer[head.size : end]) if head.content_length else b""
            del buffer[:end]
            try:
                answer = spec.handler(state, Request(key, body, conn.client))
                if not isinstance(answer, Reply):  # it needs waiting for: in the task
                    return Pending(head, spec, key, answer, route, perf_counter())
                close = head.close or answer.close
                response = self._reply_response(conn, answer, close)
                status = answer.status
            except Exception:
                log.exception("proxy front end failed on %s %r", head.method, head.target)
                response = self._internal_error
                close = True
                status = 500
            self.requests.answered_at_once(route, status)
            conn.ending = close or self._closing
            conn.pending = conn.send_now(response)
        return Step.YIELD

    async def _respond(
        self, conn: Connection, head: Head, answer: Answer, route: Route | None, start: float
    ) -> None:
        """Send a route's answer (counted once sent: a listen stream once its head is)."""
        if isinstance(answer, Later):
            answer = await answer.reply()
        if isinstance(answer, Reply):
            conn.ending = answer.close
            await conn.send(self._reply_response(conn, answer, head.close or answer.close))
            self.requests.observe(route, answer.status, perf_counter() - start)
        elif isinstance(answer, GetStream):
            await write_get(conn, self.writer.stream_head(close=head.close), answer, self.counters)
            self.requests.observe(route, 200, perf_counter() - start)
        else:
            self.requests.observe(route, 200, perf_counter() - start)
            await self._listen(conn, head, answer)

    async def _listen(self, conn: Connection, head: Head, stream: Any) -> None:
        """A never-ending stream (see :class:`ListenWriter`); the connection closes when it ends."""
        if self._poller is not None:
            self._poller.remove(conn)  # the task watches the socket itself from now on
        conn.ending = True  # the response ends only on shutdown (or badly): no next request
        writer = ListenWriter(conn, self.writer.stream_head(close=head.close))
        feed = writer.feed = stream.open_feed(writer.on_ready)
        if self._closing:  # shutting down: the open streams were closed already
            feed.close()
        try:
            await writer.run()
        finally:
            feed.cancel()

    def _reply_response(self, conn: Connection, reply: Reply, close: bool) -> bytes:
        """A reply's response; the connection keeps it while its route answers the same reply object."""
        cached = conn.last_reply
        if cached is not None and cached[0] is reply and not close:
            return cached[1]
        response = self._response(reply, close=close)
        if not close:
            conn.last_reply = (reply, response)
        return response

    def _response(self, reply: Reply, *, close: bool) -> bytes:
        """A reply as the bytes of one send (a chunked one, whose whole body is known, too)."""
        if reply.chunks is None:
            return self.writer.reply(reply.status, reply.body, reply.headers, close=close)
        chunks = b"".join(chunk(data) for data in reply.chunks)
        return self.writer.stream_head(reply.status, close=close) + chunks + LAST_CHUNK

    # -- what HTTP worker processes relay (the worker link's Relay) -----------------------------------------

    def relayed_response(self, request: relay.Relayed) -> tuple[bytes | Later, bool]:
        """The response to a request a worker relayed, and whether its connection closes after it; or a
        reply that still needs waiting for (:meth:`relayed_later_response`). Counted as the front end's own
        requests are (the latency from here: the worker's reading and writing are not in it)."""
        route = _RELAYED_ROUTES[request.method]
        refusal = self._refusal(self._limiter_for(request.client), request.client, len(request.body))
        if refusal is not None:
            self.requests.answered_at_once(route, refusal.status)
            return self._response(refusal, close=True), True
        close = request.close or self._closing
        try:
            answer = ROUTES[route].handler(
                self.state, Request(InfoHash(request.key), request.body, request.client)
            )
        except Exception:
            log.exception("proxy front end failed on a relayed %s", relay.METHOD_NAMES[request.method])
            self.requests.answered_at_once(route, 500)
            return self._internal_error, True
        if isinstance(answer, Later):
            return Later(functools.partial(self._counted_later, answer, route, perf_counter())), close
        assert isinstance(answer, Reply)
        self.requests.answered_at_once(route, answer.status)
        close = close or answer.close
        return self._response(answer, close=close), close

    async def _counted_later(self, later: Later, route: Route, start: float) -> Reply:
        try:
            reply = await later.reply()
        except Exception:
            self.requests.observe(route, 500, perf_counter() - start)
            raise
        self.requests.observe(route, reply.status, perf_counter() - start)
        return reply

    async def relayed_later_response(self, later: Later, close: bool) -> tuple[bytes, bool]:
        """The response to a relayed request once its reply is ready."""
        try:
            return self._response(await later.reply(), close=close), close
        except Exception:
            log.exception("proxy front end failed on a relayed request")
            return self._internal_error, True
