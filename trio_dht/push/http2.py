"""HTTP/2 requests to one origin (FCM's or APNs' host): a whole batch of pushes as streams of one write.

FCM HTTP v1 and APNs take one request per push, so what a push costs is what one HTTP/2 request costs. This
module is that request, and nothing else: POSTs with small bodies, small replies read whole (at most
``max_body`` bytes), to one origin, over one connection at a time.

- :class:`Http2Requests` is the sans-IO core: ``h2``'s connection state machine plus what a push client needs
  around it (stream bookkeeping, bounded replies, bodies held back by flow control, GOAWAY). Tests drive it
  with an ``h2`` server connection in memory.
- :class:`Http2Origin` is the Trio shell: it connects (TCP, then TLS with ALPN ``h2``, or h2c with prior
  knowledge for an ``http://`` origin), writes each batch's frames with one ``send_all``, and reads in one
  task per connection, which hands each finished stream its :class:`~trio_dht.push.gateway.Reply`.

Retries on GOAWAY: a stream the server says it never processed (a number above GOAWAY's last stream id, or
``REFUSED_STREAM``) is :class:`Unprocessed`, and :meth:`Http2Origin.request_many` sends it again on a new
connection, at most :data:`ATTEMPTS` times; a stream the server may have processed is never resent here (the
caller decides: a push sent twice wakes a device twice). A lost connection fails its open streams.

Bounds: at most the server's ``SETTINGS_MAX_CONCURRENT_STREAMS`` (and :data:`MAX_STREAMS`) streams open on a
connection, the rest of a batch waiting for one to finish; each reply's body up to ``max_body`` bytes (past it
the stream is reset and the reply is :class:`~trio_dht.push.gateway.ReplyTooLarge`); reply headers up to
:data:`MAX_HEADER_LIST_SIZE`; a connection idle for ``idle`` seconds is closed; server push is refused. The
caller bounds each batch as a whole with a deadline: a cancelled batch resets the streams it left open.

``h2``'s header validation and normalisation are off for what we send: our headers are made here, lower-case
and valid, and checking them again costs more than the rest of the request. Without normalisation,
``authorization`` is indexed in HPACK's table like any header (a connection carries one origin's requests,
all ours), so its bearer is sent whole once per connection. Validation of reply headers is off too: their
names are lower-cased here, and only ``:status``, ``content-length`` and ``retry-after`` are read, each
checked where it is read (a reply's header list is still bounded by :data:`MAX_HEADER_LIST_SIZE`).
"""

from __future__ import annotations

import logging
import math
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from trio_dht.push.gateway import Reply, ReplyTooLarge

log = logging.getLogger(__name__)

MAX_STREAMS = 1000
"""Most streams we keep open on one connection, whatever the server allows (APNs allows 1,000)."""
MAX_HEADER_LIST_SIZE = 16 * 1024
"""The largest reply header list we take (``SETTINGS_MAX_HEADER_LIST_SIZE``); FCM's and APNs' are < 1 KB."""
RECEIVE_WINDOW = 16 * 1024 * 1024
"""Our connection-level receive window: replies of many streams in flight at once never wait for it."""
ATTEMPTS = 3
"""A request the server did not process (GOAWAY, ``REFUSED_STREAM``) is sent at most this many times."""
READ_SIZE = 65536
WRITE_TIMEOUT = 30.0
"""A write to the server that makes no progress this long ends the connection."""
_SWEEP_SLACK = 64
"""Closed streams ``h2`` may hold beyond the open ones before it is made to forget them."""
LAST_STREAM_ID = 2**31 - 1 - 2 * MAX_STREAMS
"""Past this stream id a connection takes no new request (a new connection starts again at 1)."""

_SETTINGS = h2.settings.SettingCodes


class StreamError(Exception):
    """A request without a reply: its stream was reset, or its connection lost or closed."""


class Unprocessed(StreamError):
    """The server did not process the request (GOAWAY's last stream id is below it, or ``REFUSED_STREAM``):
    it is safe to send again, on a new connection."""


@dataclass(slots=True)
class _Stream:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    pending: memoryview | None = None
    """The part of the request body flow control held back."""


Finished = tuple[int, "Reply | ReplyTooLarge | StreamError"]
"""A stream id and how its request ended."""


class _DrainingConnection(h2.connection.H2Connection):
    """``h2``'s client connection, except that a graceful GOAWAY (``NO_ERROR``) does not end it, and that a
    new stream does not cost a walk over every stream.

    ``h2`` closes its connection state machine on any GOAWAY and then refuses every later frame as a protocol
    error, so the replies of the streams the server still finishes (those up to GOAWAY's last stream id) would
    be lost and their pushes sent twice. RFC 9113 (6.8) has the server finish them: after a ``NO_ERROR``
    GOAWAY the state goes back to open (our core opens no new stream once it has seen one).

    ``h2`` counts the open streams before each new one by walking all it holds (forgetting the closed ones on
    the way): with 1,000 requests in flight that walk was a third of a request's cost (in process, 164 µs a
    request with it, 107 µs without; 115 and 107 µs with 64 in flight). The core's own count of
    requests under way (``count_open``) is the same number whenever a stream may start (it forgets a request
    only once its stream is closed, or once the connection takes no new one), so ``h2`` is given that, and
    its walk runs only when it holds twice as many streams as are open (plus :data:`_SWEEP_SLACK`): closed
    streams are still forgotten, at an amortised constant cost.
    """

    def __init__(self, config: h2.config.H2Configuration, count_open: Callable[[], int]) -> None:
        super().__init__(config)
        self._count_open = count_open

    @property
    def open_outbound_streams(self) -> int:
        open_now = self._count_open()
        if len(self.streams) >= 2 * open_now + _SWEEP_SLACK:
            return self._open_streams(1)  # h2's walk: the exact count, closed streams forgotten
        return open_now

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        frames, events = super()._receive_goaway_frame(frame)
        if frame.error_code == 0:
            self.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        return frames, events


class Http2Requests:
    """The sans-IO core of one client HTTP/2 connection to one origin (see the module docstring).

    Call :meth:`request` for each request (while :attr:`can_open`), feed what the server sends to
    :meth:`receive`, write :meth:`data_to_send` after either, and call :meth:`connection_lost` when the
    connection ends. :meth:`receive` returns the streams that finished.
    """

    def __init__(self, authority: str, *, scheme: str = "https", max_body: int = 64 * 1024) -> None:
        self._prefix = [
            (b":method", b"POST"),
            (b":scheme", scheme.encode()),
            (b":authority", authority.encode()),
        ]
        self.max_body = max_body
        self._streams: dict[int, _Stream] = {}
        self._h2 = _DrainingConnection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                validate_inbound_headers=False,
            ),
            self._streams.__len__,
        )
        self._started = 0
        """The highest stream id started."""
        self._written = 0
        """The highest stream id whose HEADERS left in :meth:`data_to_send` (h2 drops what it still holds on
        GOAWAY: a stream above this was never sent)."""
        self._max_streams = 1  # until the server's SETTINGS arrive: HTTP/2's default is unlimited, APNs' is 1
        self.goaway = False
        """The server sent GOAWAY, the connection failed, or its stream ids ran short: no new request may
        start here."""
        self._h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                _SETTINGS.ENABLE_PUSH: 0,
                _SETTINGS.MAX_CONCURRENT_STREAMS: 0,
                _SETTINGS.INITIAL_WINDOW_SIZE: max(65535, max_body + 1),
                _SETTINGS.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            },
        )
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(RECEIVE_WINDOW - 65535)
        # h2 gives its HPACK decoder our MAX_HEADER_LIST_SIZE only when the setting changes, never the first
        self._h2.decoder.max_header_list_size = MAX_HEADER_LIST_SIZE

    @property
    def open_streams(self) -> int:
        """Requests sent and not finished."""
        return len(self._streams)

    @property
    def can_open(self) -> bool:
        """Whether :meth:`request` may start a stream now."""
        return not self.goaway and len(self._streams) < self._max_streams

    def request(self, path: bytes, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> int:
        """Start a POST of ``body`` to ``path`` with ``headers`` (lower-case names, no pseudo-headers, no
        ``content-length``); its stream id. Only while :attr:`can_open`."""
        assert self.can_open
        stream_id = self._h2.get_next_available_stream_id()
        self._h2.send_headers(
            stream_id,
            [*self._prefix, (b":path", path), *headers, (b"content-length", b"%d" % len(body))],
            end_stream=not body,
        )
        stream = self._streams[stream_id] = _Stream()
        self._started = stream_id
        if stream_id >= LAST_STREAM_ID:
            self.goaway = True  # stream ids run short: this connection drains, the next starts again at 1
        if body:
            stream.pending = memoryview(body)
            self._send_body(stream_id, stream)
        return stream_id

    def reset(self, stream_id: int) -> None:
        """Give up on a request (``RST_STREAM`` ``CANCEL``): its reply, if any comes, is ignored."""
        if self._streams.pop(stream_id, None) is not None:
            with suppress(h2.exceptions.H2Error):  # already closed at the HTTP/2 level
                self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)

    def data_to_send(self) -> bytes:
        """The bytes to write to the server now."""
        self._written = self._started
        return self._h2.data_to_send()

    def connection_lost(self, why: str = "connection lost") -> list[Finished]:
        """Every open request fails (the server may or may not have processed them)."""
        self.goaway = True
        failed: list[Finished] = [(sid, StreamError(why)) for sid in self._streams]
        self._streams.clear()
        return failed

    def receive(self, data: bytes) -> list[Finished]:
        """Feed bytes from the server; the streams that finished. Never raises: a protocol error ends the
        connection (every open stream fails, :attr:`goaway` is set; :meth:`data_to_send` holds our GOAWAY)."""
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            with suppress(h2.exceptions.H2Error):
                self._h2.close_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return self.connection_lost(f"HTTP/2 protocol error from the server: {exc}")
        finished: list[Finished] = []
        window_opened = False
        for event in events:
            kind = type(event)
            if kind is h2.events.DataReceived:
                self._on_data(event, finished)
            elif kind is h2.events.ResponseReceived:
                self._on_response(event, finished)
            elif kind is h2.events.StreamEnded:
                self._on_end(event.stream_id, finished)
            elif kind is h2.events.StreamReset:
                if self._streams.pop(event.stream_id, None) is not None:
                    refused = event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                    error = Unprocessed if refused else StreamError
                    why = f"stream reset by the server ({event.error_code!r})"
                    finished.append((event.stream_id, error(why)))
            elif kind is h2.events.WindowUpdated:
                window_opened = True
            elif kind is h2.events.RemoteSettingsChanged:
                self._on_settings()
                window_opened = True
            elif kind is h2.events.ConnectionTerminated:
                finished.extend(self._on_goaway(event))
            # InformationalResponseReceived (1xx), TrailersReceived, PingReceived, SettingsAcknowledged,
            # PriorityUpdated: nothing to do (h2 answers pings and settings itself); PushedStreamReceived
            # cannot happen with ENABLE_PUSH 0 (h2 refuses such a frame as a protocol error).
        if window_opened and not self.goaway:  # after every frame of this read is applied to h2's state
            for stream_id, stream in list(self._streams.items()):
                if stream.pending is not None:
                    self._send_body(stream_id, stream, finished)
        return finished

    # -- events ----------------------------------------------------------------------------------------------

    def _on_response(self, event: h2.events.ResponseReceived, finished: list[Finished]) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        headers = stream.headers
        for name, value in event.headers:
            if name == b":status":
                stream.status = int(value) if value.isdigit() else 0
            else:
                key = name.decode("latin-1").lower()
                text = value.decode("latin-1")
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
        length = headers.get("content-length", "")
        if length.isdecimal() and int(length) > self.max_body:
            self._too_large(event.stream_id, stream, finished)

    def _on_end(self, stream_id: int, finished: list[Finished]) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        if stream.pending is not None:  # answered before its whole body was sent: close our side too
            with suppress(h2.exceptions.H2Error):
                self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        finished.append((stream_id, Reply(stream.status, stream.headers, bytes(stream.body))))

    def _on_data(self, event: h2.events.DataReceived, finished: list[Finished]) -> None:
        self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        stream.body += event.data
        if len(stream.body) > self.max_body:
            self._too_large(event.stream_id, stream, finished)

    def _too_large(self, stream_id: int, stream: _Stream, finished: list[Finished]) -> None:
        self.reset(stream_id)
        finished.append((stream_id, ReplyTooLarge(stream.status, stream.headers, self.max_body)))

    def _on_settings(self) -> None:
        allowed = self._h2.remote_settings.max_concurrent_streams
        self._max_streams = min(MAX_STREAMS, allowed if allowed is not None else MAX_STREAMS)

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> list[Finished]:
        """Streams above the last one the server processes are unprocessed; the others may still finish."""
        self.goaway = True
        last = event.last_stream_id if event.last_stream_id is not None else 0
        last = min(last, self._written)  # h2 dropped the frames it still held: those streams were never sent
        why = f"GOAWAY from the server ({event.error_code!r})"
        unprocessed = [sid for sid in self._streams if sid > last]
        finished: list[Finished] = [(sid, Unprocessed(why)) for sid in unprocessed]
        for sid in unprocessed:
            del self._streams[sid]
        if event.error_code != h2.errors.ErrorCodes.NO_ERROR:  # an error ends the connection at once
            finished.extend(self.connection_lost(why))
        return finished

    def _send_body(self, stream_id: int, stream: _Stream, finished: list[Finished] | None = None) -> None:
        """Send as much of the held-back body as flow control allows; a stream h2 no longer lets us send on
        fails (``finished``)."""
        pending = stream.pending
        assert pending is not None
        try:
            while pending:
                size = min(self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size)
                if size <= 0:
                    break
                chunk, pending = pending[:size], pending[size:]
                self._h2.send_data(stream_id, chunk.tobytes(), end_stream=not pending)
        except h2.exceptions.H2Error as exc:
            del self._streams[stream_id]
            if finished is not None:
                finished.append((stream_id, StreamError(f"cannot send the rest of the body: {exc!r}")))
            return
        stream.pending = pending if pending else None


# -- the Trio shell ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """One POST: its path, headers (lower-case names, no pseudo-headers), and body."""

    path: bytes
    headers: Sequence[tuple[bytes, bytes]]
    body: bytes


class TimedOut(StreamError):
    """No whole reply by the batch's deadline: the stream was reset (the server may have processed it)."""


class Unreachable(StreamError):
    """No connection could be made for the request: it was not sent."""


class _Batch:
    """One :meth:`Http2Origin.request_many` call's streams in flight; woken as each finishes."""

    __slots__ = ("progress", "results")

    def __init__(self, size: int) -> None:
        self.results: list[Reply | ReplyTooLarge | StreamError | None] = [None] * size
        self.progress = trio.Event()


class _Connection:
    """One HTTP/2 connection: its stream, its core, which batch awaits each stream, and its two tasks (one
    reads, one writes: a batch's deadline never cuts a write short, which would break the connection for
    every other batch on it)."""

    def __init__(self, stream: trio.abc.Stream, core: Http2Requests, idle: float) -> None:
        self.stream = stream
        self.core = core
        self.idle = idle
        self.waiting: dict[int, tuple[_Batch, int]] = {}
        self.closed = False
        self.slot_freed = trio.Event()
        self.write_wanted = trio.Event()
        self.scope = trio.CancelScope()
        """Cancels both tasks: the connection ends."""
        self.idle_scope = trio.CancelScope()
        """Cancels the reading task once the connection has been idle too long (no deadline while in use)."""

    def write(self) -> None:
        """Have the writing task send what the core holds."""
        self.write_wanted.set()

    def deliver(self, finished: list[Finished]) -> None:
        for stream_id, result in finished:
            waiter = self.waiting.pop(stream_id, None)
            if waiter is not None:
                batch, index = waiter
                batch.results[index] = result
                batch.progress.set()
        if finished or self.core.can_open or self.closed:  # a stream slot, or the server's SETTINGS
            self.slot_freed.set()
            self.slot_freed = trio.Event()
        if self.core.open_streams:
            self.idle_scope.deadline = math.inf
        elif self.core.goaway:
            self.scope.cancel()  # drained after GOAWAY: nothing more can come
        elif self.idle_scope.deadline == math.inf:
            self.idle_scope.deadline = trio.current_time() + self.idle

    def end(self, why: str) -> None:
        """The connection is over: every open request fails with ``why``, both tasks stop."""
        if not self.closed:
            self.closed = True
            self.deliver(self.core.connection_lost(why))
        self.scope.cancel()


class Http2Origin:
    """POSTs to one origin over HTTP/2, one connection at a time (a new one after GOAWAY or a failure).

    Use :func:`open_http2_origin`, which owns each connection's tasks. An ``ssl_context`` given is used as is
    but for its ALPN protocols, set to ``h2``.
    """

    def __init__(
        self,
        url: str,
        nursery: trio.Nursery,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_body: int = 64 * 1024,
        idle: float = 600.0,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"not an http(s) origin: {url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        default_port = 443 if parts.scheme == "https" else 80
        self.port = parts.port or default_port
        self.authority = parts.netloc.rsplit("@", 1)[-1] if self.port != default_port else self.host
        self._ssl_context = None
        if parts.scheme == "https":
            self._ssl_context = ssl_context or ssl.create_default_context()
            self._ssl_context.set_alpn_protocols(["h2"])
        self._nursery = nursery
        self._max_body = max_body
        self._idle = idle
        self._write_timeout = write_timeout
        self._connection: _Connection | None = None
        self._connect_lock = trio.Lock()
        self.connections_made = 0
        """Connections opened so far."""

    async def request_many(
        self, requests: Sequence[Request], *, deadline: float = math.inf
    ) -> list[Reply | ReplyTooLarge | StreamError]:
        """Send every request; each one's reply (its body read whole, up to ``max_body``) or why it has none.

        Never raises for the server's or the network's doing: a request that could not be sent is
        :class:`Unreachable`, one without a whole reply by ``deadline`` (Trio time) :class:`TimedOut` (its
        stream reset), one its connection lost :class:`StreamError`. The replies that came are returned
        whatever befell the others.
        """
        batch = _Batch(len(requests))
        todo = list(range(len(requests)))
        attempts = [0] * len(requests)
        used: set[_Connection] = set()
        try:
            with trio.move_on_at(deadline):
                while todo:
                    try:
                        connection = await self._usable_connection()
                    except (OSError, trio.BrokenResourceError) as exc:
                        failed = Unreachable(f"cannot connect to {self.authority}: {describe(exc)}")
                        for i in todo:
                            batch.results[i] = failed
                        break
                    used.add(connection)
                    started = await self._start(connection, batch, requests, todo, attempts)
                    for i in started:
                        if isinstance(batch.results[i], Unprocessed) and attempts[i] < ATTEMPTS:
                            batch.results[i] = None
                            todo.append(i)
        finally:  # the deadline passed, or the caller was cancelled
            for connection in used:
                _forget(connection, batch)
        timed_out = TimedOut(f"no whole reply from {self.authority} by the deadline")
        return [timed_out if r is None else r for r in batch.results]

    async def _start(
        self,
        connection: _Connection,
        batch: _Batch,
        requests: Sequence[Request],
        todo: list[int],
        attempts: list[int],
    ) -> list[int]:
        """Start what of ``todo`` the connection takes (taking it off ``todo``), as streams free up; the
        indexes started, once each has its result."""
        started: list[int] = []
        core = connection.core
        while todo and not connection.closed:
            freed = connection.slot_freed  # taken before anything can see a stream finish
            while todo and core.can_open:
                i = todo.pop(0)
                attempts[i] += 1
                request = requests[i]
                stream_id = core.request(request.path, request.headers, request.body)
                connection.waiting[stream_id] = (batch, i)
                started.append(i)
            connection.idle_scope.deadline = math.inf
            connection.write()
            if not todo or core.goaway:
                break
            await freed.wait()
        while any(batch.results[i] is None for i in started):
            await batch.progress.wait()
            batch.progress = trio.Event()
        return started

    async def _usable_connection(self) -> _Connection:
        async with self._connect_lock:
            connection = self._connection
            if connection is None or connection.closed or connection.core.goaway:
                connection = self._connection = await self._open()
            return connection

    async def _open(self) -> _Connection:
        tcp = await trio.open_tcp_stream(self.host, self.port)
        stream: trio.abc.Stream = tcp
        try:
            if self._ssl_context is not None:
                tls = trio.SSLStream(tcp, self._ssl_context, server_hostname=self.host, https_compatible=True)
                stream = tls
                await tls.do_handshake()
                if tls.selected_alpn_protocol() != "h2":
                    raise ssl.SSLError(f"{self.authority} did not agree to HTTP/2 (ALPN h2)")
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        core = Http2Requests(self.authority, scheme=self.scheme, max_body=self._max_body)
        connection = _Connection(stream, core, self._idle)
        self.connections_made += 1
        self._nursery.start_soon(self._run, connection)
        connection.write()  # the preface and our SETTINGS
        return connection

    async def _run(self, connection: _Connection) -> None:
        """The connection's two tasks, until it ends; then its stream is closed."""
        try:
            with connection.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write, connection)
                    await self._read(connection)
                    nursery.cancel_scope.cancel()
        finally:
            connection.end("closed")
            if self._connection is connection:
                self._connection = None
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(connection.stream)

    async def _read(self, connection: _Connection) -> None:
        """Hand each finished stream to its batch; the connection closes once idle for ``idle`` seconds."""
        why = "the server closed the connection"
        try:
            with connection.idle_scope:
                connection.idle_scope.deadline = trio.current_time() + self._idle
                while data := await connection.stream.receive_some(READ_SIZE):
                    connection.deliver(connection.core.receive(data))
                    connection.write()
            if connection.idle_scope.cancelled_caught:
                why = f"idle for {self._idle:g} s"
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            why = f"read failed: {describe(exc)}"
        connection.end(why)

    async def _write(self, connection: _Connection) -> None:
        """Write what the core holds whenever asked; a write stalled for ``write_timeout`` ends the
        connection."""
        while True:
            await connection.write_wanted.wait()
            connection.write_wanted = trio.Event()
            data = connection.core.data_to_send()
            if not data:
                continue
            try:
                with trio.move_on_after(self._write_timeout) as stalled:
                    await connection.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                connection.end(f"write failed: {describe(exc)}")
                return
            if stalled.cancelled_caught:
                connection.end(f"a write made no progress in {self._write_timeout:g} s")
                return

    async def aclose(self) -> None:
        """Close the connection (its open requests fail)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.end("closed")


def _forget(connection: _Connection, batch: _Batch) -> None:
    """Reset the streams ``batch`` left open on ``connection``; their replies are not awaited any more."""
    left = [stream_id for stream_id, (owner, _) in connection.waiting.items() if owner is batch]
    for stream_id in left:
        del connection.waiting[stream_id]
        connection.core.reset(stream_id)
    if left:
        connection.write()
        connection.deliver([])  # the idle clock, or the end of a connection drained after GOAWAY


def describe(exc: BaseException) -> str:
    """An exception and the first cause with a message (connection errors often have none; the TLS error
    under them says what failed)."""
    text = repr(exc)
    cause: BaseException | None = exc
    while cause is not None and not str(cause):
        cause = cause.__cause__ or cause.__context__
    return text if cause is None or cause is exc else f"{text}: {cause!r}"


@asynccontextmanager
async def open_http2_origin(url: str, **options: Any) -> AsyncIterator[Http2Origin]:
    """An :class:`Http2Origin` for ``url`` (``https://host[:port]`` or ``http://`` for h2c) for the block;
    ``options`` as :class:`Http2Origin`'s."""
    async with trio.open_nursery() as nursery:
        origin = Http2Origin(url, nursery, **options)
        try:
            yield origin
        finally:
            await origin.aclose()
            nursery.cancel_scope.cancel()
