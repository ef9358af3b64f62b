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
    """``h2``'s client connection, except that a graceful GOAWAY (``NO_ERROR``) does not end it.

    ``h2`` closes its connection state machine on any GOAWAY and then refuses every later frame as a protocol
    error, so the replies of the streams the server still finishes (those up to GOAWAY's last stream id) would
    be lost and their pushes sent twice. RFC 9113 (6.8) has the server finish them: after a ``NO_ERROR``
    GOAWAY the state goes back to open (our core opens no new stream once it has seen one).
    """

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
        self._h2 = _DrainingConnection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                validate_inbound_headers=False,
            )
        )
        self._streams: dict[int, _Stream] = {}
        self._max_streams = 1  # until the server's SETTINGS arrive: HTTP/2's default is unlimited, APNs' is 1
        self.goaway = False
        """The server sent GOAWAY (or the connection failed): no new request may start here."""
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
        return self._h2.data_to_send()

    def connection_lost(self, why: str = "connection lost") -> list[Finished]:
        """Every open request fails (the server may or may not have processed them)."""
        self.goaway = True
        failed: list[Finished] = [(sid, StreamError(why)) for sid in self._streams]
        self._streams.clear()
        return failed

    def receive(self, data: bytes) -> list[Finished]:
        """Feed bytes from the server; the streams that finished. A protocol error ends the connection (every
        open stream fails, :attr:`goaway` is set; :meth:`data_to_send` then holds our GOAWAY)."""
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            with suppress(h2.exceptions.H2Error):
                self._h2.close_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return self.connection_lost(f"HTTP/2 protocol error from the server: {exc}")
        finished: list[Finished] = []
        for event in events:
            kind = type(event)
            if kind is h2.events.DataReceived:
                self._on_data(event, finished)
            elif kind is h2.events.ResponseReceived:
                self._on_response(event, finished)
            elif kind is h2.events.StreamEnded:
                stream = self._streams.pop(event.stream_id, None)
                if stream is not None:
                    finished.append(
                        (event.stream_id, Reply(stream.status, stream.headers, bytes(stream.body)))
                    )
            elif kind is h2.events.StreamReset:
                if self._streams.pop(event.stream_id, None) is not None:
                    refused = event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                    error = Unprocessed if refused else StreamError
                    finished.append(
                        (event.stream_id, error(f"stream reset by the server ({event.error_code!r})"))
                    )
            elif kind is h2.events.WindowUpdated or kind is h2.events.RemoteSettingsChanged:
                if kind is h2.events.RemoteSettingsChanged:
                    self._on_settings()
                for stream_id, stream in list(self._streams.items()):
                    if stream.pending is not None:
                        self._send_body(stream_id, stream)
            elif kind is h2.events.ConnectionTerminated:
                finished.extend(self._on_goaway(event))
            # InformationalResponseReceived (1xx), TrailersReceived, PingReceived, SettingsAcknowledged,
            # PriorityUpdated: nothing to do (h2 answers pings and settings itself); PushedStreamReceived
            # cannot happen with ENABLE_PUSH 0 (h2 refuses such a frame as a protocol error).
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
        why = f"GOAWAY from the server ({event.error_code!r})"
        unprocessed = [sid for sid in self._streams if sid > last]
        finished: list[Finished] = [(sid, Unprocessed(why)) for sid in unprocessed]
        for sid in unprocessed:
            del self._streams[sid]
        if event.error_code != h2.errors.ErrorCodes.NO_ERROR:  # an error ends the connection at once
            finished.extend(self.connection_lost(why))
        return finished

    def _send_body(self, stream_id: int, stream: _Stream) -> None:
        """Send as much of the held-back body as flow control allows."""
        pending = stream.pending
        assert pending is not None
        size = min(self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size)
        while size > 0 and pending:
            chunk, pending = pending[:size], pending[size:]
            self._h2.send_data(stream_id, chunk.tobytes(), end_stream=not pending)
            if pending:
                size = min(self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size)
        stream.pending = pending if pending else None


# -- the Trio shell ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """One POST: its path, headers (lower-case names, no pseudo-headers), and body."""

    path: bytes
    headers: Sequence[tuple[bytes, bytes]]
    body: bytes


class _Batch:
    """One :meth:`Http2Origin.request_many` call's streams in flight; woken as each finishes."""

    __slots__ = ("progress", "results")

    def __init__(self, size: int) -> None:
        self.results: list[Reply | ReplyTooLarge | StreamError | None] = [None] * size
        self.progress = trio.Event()


class _Connection:
    """One HTTP/2 connection: its stream, its core, and which batch awaits each stream."""

    def __init__(self, stream: trio.abc.Stream, core: Http2Requests) -> None:
        self.stream = stream
        self.core = core
        self.waiting: dict[int, tuple[_Batch, int]] = {}
        self.send_lock = trio.StrictFIFOLock()
        self.closed = False
        self.slot_freed = trio.Event()
        self.idle = trio.CancelScope()
        """Cancels the reading task once the connection has been idle too long (no deadline while in use)."""

    async def flush(self) -> None:
        """Write what the core has to send (one writer at a time); a failed write closes the connection."""
        async with self.send_lock:
            data = self.core.data_to_send()
            if data and not self.closed:
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self.closed = True
                    self.deliver(self.core.connection_lost(f"write failed: {exc!r}"))
                    await trio.aclose_forcefully(self.stream)  # ends the reading task

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


class Http2Origin:
    """POSTs to one origin over HTTP/2, one connection at a time (a new one after GOAWAY or a failure).

    Use :func:`open_http2_origin`, which owns the tasks that read each connection.
    """

    def __init__(
        self,
        url: str,
        nursery: trio.Nursery,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_body: int = 64 * 1024,
        idle: float = 600.0,
        connect: Callable[[str, int], Any] | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"not an http(s) origin: {url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        default_port = 443 if parts.scheme == "https" else 80
        self.authority = parts.netloc.rsplit("@", 1)[-1] if self.port != default_port else self.host
        self._ssl_context = ssl_context if parts.scheme == "https" else None
        if self._ssl_context is None and parts.scheme == "https":
            self._ssl_context = ssl.create_default_context()
        if self._ssl_context is not None:
            self._ssl_context.set_alpn_protocols(["h2"])
        self._nursery = nursery
        self._max_body = max_body
        self._idle = idle
        self._connect_tcp = connect or trio.open_tcp_stream
        self._connection: _Connection | None = None
        self._connect_lock = trio.Lock()
        self.connections_made = 0
        """Connections opened so far."""

    async def request_many(self, requests: Sequence[Request]) -> list[Reply | ReplyTooLarge | StreamError]:
        """Send every request; each one's reply (its body read whole, up to ``max_body``) or its failure.

        Raises ``OSError`` (``ssl.SSLError`` among them) or ``trio.BrokenResourceError`` only when no
        connection can be made at all. A deadline the caller sets cancels it (the batch's open streams are
        reset).
        """
        batch = _Batch(len(requests))
        todo = list(range(len(requests)))
        attempts = [0] * len(requests)
        while todo:
            connection = await self._usable_connection()
            started: list[int] = []
            try:
                while todo:
                    freed = connection.slot_freed  # taken before the flush, which may see streams finish
                    while todo and connection.core.can_open:
                        i = todo.pop(0)
                        attempts[i] += 1
                        r = requests[i]
                        sid = connection.core.request(r.path, r.headers, r.body)
                        connection.waiting[sid] = (batch, i)
                        started.append(i)
                    connection.idle.deadline = float("inf")
                    await connection.flush()
                    if todo and not connection.core.goaway and not connection.closed:
                        await freed.wait()
                    else:
                        break
                while any(batch.results[i] is None for i in started):
                    await batch.progress.wait()
                    batch.progress = trio.Event()
            finally:
                self._forget(connection, batch)
            for i in started:
                if isinstance(batch.results[i], Unprocessed) and attempts[i] < ATTEMPTS:
                    batch.results[i] = None
                    todo.append(i)
        return [r if r is not None else StreamError("not sent") for r in batch.results]

    def _forget(self, connection: _Connection, batch: _Batch) -> None:
        """Reset the streams a cancelled batch left open; their replies are not awaited any more."""
        left = [sid for sid, (owner, _) in connection.waiting.items() if owner is batch]
        for sid in left:
            del connection.waiting[sid]
            connection.core.reset(sid)
        if left:
            self._nursery.start_soon(connection.flush)

    async def _usable_connection(self) -> _Connection:
        async with self._connect_lock:
            connection = self._connection
            if connection is None or connection.closed or connection.core.goaway:
                connection = self._connection = await self._open()
            return connection

    async def _open(self) -> _Connection:
        tcp = await self._connect_tcp(self.host, self.port)
        stream: trio.abc.Stream = tcp
        try:
            if self._ssl_context is not None:
                tls = trio.SSLStream(tcp, self._ssl_context, server_hostname=self.host, https_compatible=True)
                await tls.do_handshake()
                if tls.selected_alpn_protocol() != "h2":
                    raise ssl.SSLError(f"{self.authority} did not agree to HTTP/2 (ALPN h2)")
                stream = tls
            connection = _Connection(
                stream, Http2Requests(self.authority, scheme=self.scheme, max_body=self._max_body)
            )
            await connection.flush()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        self.connections_made += 1
        self._nursery.start_soon(self._read, connection)
        return connection

    async def _read(self, connection: _Connection) -> None:
        """Read one connection until it ends: hand each finished stream to its batch, answer what h2 must.
        The connection closes once idle (no open stream) for ``idle`` seconds, or drained after GOAWAY."""
        core = connection.core
        why = "the server closed the connection"
        try:
            with connection.idle:
                connection.idle.deadline = trio.current_time() + self._idle
                while True:
                    data = await connection.stream.receive_some(READ_SIZE)
                    if not data:
                        return
                    connection.deliver(core.receive(data))
                    await connection.flush()
                    if connection.closed or (core.goaway and not core.open_streams):
                        why = "closed after GOAWAY" if core.goaway else why
                        return
                    if not core.open_streams:
                        connection.idle.deadline = trio.current_time() + self._idle
            why = f"idle for {self._idle:g} s"
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            why = f"read failed: {exc!r}"
        finally:
            connection.closed = True
            connection.deliver(core.connection_lost(why))
            if self._connection is connection:
                self._connection = None
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await trio.aclose_forcefully(connection.stream)

    async def aclose(self) -> None:
        """Close the connection (its open requests fail)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.closed = True
            connection.deliver(connection.core.connection_lost("closed"))
            await trio.aclose_forcefully(connection.stream)


@asynccontextmanager
async def open_http2_origin(url: str, **options: Any) -> AsyncIterator[Http2Origin]:
    """An :class:`Http2Origin` for ``url`` (``https://host[:port]`` or ``http://`` for h2c) for the block;
    ``options`` as :class:`Http2Origin`'s."""
    async with trio.open_nursery() as nursery:
        origin = Http2Origin(url, nursery, **options)
        try:
            yield origin
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await origin.aclose()
