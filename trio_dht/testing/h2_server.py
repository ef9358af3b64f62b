"""A lean HTTP/2 server for the FCM and APNs doubles: h2's state machine in a thin Trio shell, one ASGI call
per request; a connection that does not speak HTTP/2 is served by hypercorn.

:func:`serve_h2_on_loopback` listens on 127.0.0.1 (a free port). A connection is HTTP/2 when TLS's ALPN
chose ``h2`` or, on plain TCP, when its first bytes are the HTTP/2 preface (h2c with prior knowledge); any
other connection (HTTP/1.1, TLS without ALPN ``h2``) goes, with the bytes already read, to a hypercorn
connection serving the same app.

An HTTP/2 connection (:class:`ServerConnection`):

* reads, feeds the bytes to h2 (its header validation on: a malformed request is a protocol error, answered
  with GOAWAY) and handles the events of that read; one writer task writes what h2 has to send once the
  tasks the read woke have run (the replies of many streams in one write);
* starts the app for a request at its headers, one task per stream: the scope is ASGI's ``http`` scope
  (``http_version`` ``"2"``, the headers lower-case with ``host`` first, from ``:authority``, a path that is
  not ASCII is a 400); ``receive`` gives the whole body once it is complete, then ``http.disconnect`` once
  the stream is gone;
* sends a reply's body within the peer's flow-control windows (the app's ``send`` waits for a window
  update); a reply's headers and a body that fits go out in one write;
* acknowledges received data (h2 sends WINDOW_UPDATE when a window is half used);
* bounds: ``max_concurrent_streams`` (SETTINGS; a stream over it is a protocol error),
  ``max_header_list_size`` (SETTINGS; over it is a protocol error), a body over ``max_body`` is answered 413
  and the stream reset;
* a stream reset by the client, a refused body, or a lost connection: an app still waiting for the body ends
  (``receive`` raises, as a cancellation would); an app past it runs to its end, its sends dropped,
  ``receive`` then gives ``http.disconnect``;
* closes with GOAWAY after ``idle_timeout`` seconds without a request under way, and after ``max_requests``
  requests once their answers are sent (streams opened meanwhile are refused: REFUSED_STREAM); when the
  server stops, GOAWAY at once.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio
from h2.errors import ErrorCodes
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app

from trio_dht.proxy.hypercorn_link import PrefixedStream

Scope = dict[str, Any]
App = Callable[[Scope, Callable[[], Awaitable[dict[str, Any]]], Callable[[dict[str, Any]], Awaitable[None]]],
               Awaitable[None]]  # fmt: skip

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_RECEIVE = 65536
_CONNECTION_WINDOW = 1 << 24
"""The connection's receive window: many streams' bodies arrive without waiting for a WINDOW_UPDATE."""
_MAX_UNWRITTEN = 256 * 1024
"""Bytes of frames made by reading (acks of pings and settings, resets) held while a write is under way."""
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError)
_DISCONNECT = {"type": "http.disconnect"}


@dataclass(frozen=True, slots=True)
class H2Settings:
    """An HTTP/2 connection's bounds and timeouts."""

    max_concurrent_streams: int = 1000
    max_header_list_size: int = 65536
    max_body: int = 65536
    """Request body bytes at most; a larger body is answered 413."""
    idle_timeout: float = 5.0
    """Seconds without a request under way before the server closes the connection (GOAWAY)."""
    max_requests: int = 0
    """Requests per connection before GOAWAY; 0: no limit."""
    handshake_timeout: float = 10.0


class _Gone(Exception):
    """What ``receive`` raises into an app waiting for a body that will not come (the stream is gone); the
    app ends as if cancelled."""


class _Stream:
    """One request: its scope, its body as it arrives, and its reply's progress."""

    __slots__ = ("arrived", "body", "complete", "ended", "gone", "headers", "id", "scope", "size",
                 "started", "status")  # fmt: skip

    def __init__(self, stream_id: int, scope: Scope) -> None:
        self.id = stream_id
        self.scope = scope
        self.body: list[bytes] = []
        self.size = 0
        self.complete = False
        """The whole body is here."""
        self.arrived: trio.Event | None = None
        """Set when the body is complete, if the app is waiting for it."""
        self.gone = False
        """Reset by the client, refused, or the connection is lost: the reply goes nowhere."""
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.started = False
        """The reply's headers are sent."""
        self.ended = False
        """The reply is complete."""

    def drop(self) -> None:
        """The stream is gone: an app waiting for the body gets :class:`_Gone` from ``receive``."""
        self.gone = True
        if self.arrived is not None:
            self.arrived.set()


class ServerConnection:
    """One HTTP/2 connection serving ``app``; :meth:`run` returns once it is closed and its apps are done."""

    def __init__(
        self, app: App, stream: trio.abc.Stream, scope: Scope, settings: H2Settings, read: bytes = b""
    ) -> None:
        self._app = app
        self._io = stream
        self._scope = scope
        """What every request's scope shares (client, server, scheme)."""
        self._settings = settings
        self._read = read
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self._h2 = h2.connection.H2Connection(config)
        self._h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
            },
        )
        self._h2.decoder.max_header_list_size = settings.max_header_list_size  # h2 sets it on a change only
        self._streams: dict[int, _Stream] = {}
        """Requests under way: from their headers to the end of their app."""
        self._requests = 0
        self._closing = False
        """No new request: streams are refused, GOAWAY once those under way are done."""
        self._goaway_sent = False
        self._lost = False
        self._dirty = trio.Event()
        """Set when h2 has bytes to write."""
        self._window = trio.Event()
        """Set (and replaced) when a send window may open, a stream is reset, or the connection is gone."""
        self._flushed = trio.Event()
        """Set once the last bytes are written (or cannot be)."""
        self._finished = False
        """The read loop has ended: the writer writes what is left and stops."""
        self._read_scope = trio.CancelScope()
        """The read loop's: cancelled once the GOAWAY is sent."""
        self._timer_scope = trio.CancelScope()
        self._out = b""
        """Bytes h2 made while reading, not yet written (about :data:`_MAX_UNWRITTEN` at most: past it, the
        read loop waits for the writer)."""
        self._wrote = trio.Event()
        """Set (and replaced) after each write."""
        self._idle_since = trio.current_time()
        """When the last request under way ended."""
        self._apps: trio.Nursery | None = None

    # -- the Trio shell --------------------------------------------------------------------------------------

    async def run(self) -> None:
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
        async with trio.open_nursery() as apps:
            self._apps = apps
            async with trio.open_nursery() as io:
                io.start_soon(self._write_loop)
                io.start_soon(self._idle_timer)
                with self._read_scope, suppress(*_BROKEN):
                    await self._read_loop()
                self._timer_scope.cancel()
                self._finished = True
                self._dirty.set()
                io.cancel_scope.deadline = trio.current_time() + 1.0  # the last write (GOAWAY), if it can
            if self._goaway_sent:  # the client's last bytes are read, lest closing resets the connection
                with trio.move_on_after(1.0), suppress(*_BROKEN):
                    if isinstance(self._io, trio.abc.HalfCloseableStream):
                        await self._io.send_eof()
                    while await self._io.receive_some(_RECEIVE):
                        pass
            self._lost = True
            for stream in list(self._streams.values()):
                stream.drop()
            self._wake_senders()
            with trio.CancelScope(shield=True), trio.move_on_after(1.0), suppress(*_BROKEN):
                await self._io.aclose()

    def goaway(self, *, now: bool = False) -> None:
        """Close the connection with GOAWAY: ``now``, or once the requests under way are done (streams the
        client opens meanwhile are refused: REFUSED_STREAM). h2 sends no frame after its GOAWAY, and neither
        can an h2 client take one, so the GOAWAY comes last."""
        self._closing = True
        if (now or not self._streams) and not self._goaway_sent:
            self._goaway_sent = True
            with suppress(h2.exceptions.ProtocolError):
                self._h2.close_connection()
            self._read_scope.cancel()
            self._dirty.set()

    async def wait_flushed(self) -> None:
        await self._flushed.wait()

    async def _read_loop(self) -> None:
        data, self._read = self._read, b""
        while True:
            if data:
                try:
                    events = self._h2.receive_data(data)
                except h2.exceptions.ProtocolError:  # h2 has queued a GOAWAY
                    self._goaway_sent = True
                    return
                self._handle(events)
                out = self._h2.data_to_send()  # most reads make no frame to send: no write then
                if out:
                    self._out += out
                    self._dirty.set()
            if self._closing and not self._streams:
                self.goaway()
                return
            while len(self._out) > _MAX_UNWRITTEN:  # a client that sends (pings) and never reads waits
                if self._flushed.is_set():  # the writer is gone: nothing more can be written
                    return
                await self._wrote.wait()
            data = await self._io.receive_some(_RECEIVE)
            if not data:
                return

    async def _idle_timer(self) -> None:
        """GOAWAY once no request has been under way for ``idle_timeout`` seconds."""
        with self._timer_scope:
            await self._idle_wait()
            self.goaway()

    async def _idle_wait(self) -> None:
        while True:
            idle_until = self._idle_since + self._settings.idle_timeout
            if not self._streams and trio.current_time() >= idle_until:
                return
            await trio.sleep_until(idle_until if not self._streams else trio.current_time() + 1.0)

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._dirty.wait()
                self._dirty = trio.Event()
                data = self._h2.data_to_send()
                if self._out:
                    data, self._out = self._out + data, b""
                if data:
                    await self._io.send_all(data)
                    self._wrote.set()
                    self._wrote = trio.Event()
                if self._finished and not self._dirty.is_set():
                    return
        except _BROKEN:
            pass
        finally:
            self._flushed.set()
            self._wrote.set()

    def _wake_senders(self) -> None:
        self._window.set()
        self._window = trio.Event()

    # -- h2's events -----------------------------------------------------------------------------------------

    def _handle(self, events: list[h2.events.Event]) -> None:
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                stream = self._streams.get(event.stream_id)
                if stream is not None and not stream.complete:
                    stream.size += len(event.data)
                    if stream.size > self._settings.max_body:
                        self._refuse(stream, 413, ErrorCodes.NO_ERROR)
                    else:
                        stream.body.append(event.data)
            elif isinstance(event, h2.events.RequestReceived):
                self._request(event)
            elif isinstance(event, h2.events.StreamEnded):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream.complete = True
                    if stream.arrived is not None:
                        stream.arrived.set()
            elif isinstance(event, h2.events.StreamReset):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream.drop()
                self._wake_senders()
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self._wake_senders()

    def _request(self, event: h2.events.RequestReceived) -> None:
        if self._closing:
            self._h2.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
            return
        authority = host = b""
        method = path = None
        headers = [(b"host", b"")]
        for name, value in event.headers:
            if name[:1] != b":":
                if name == b"host":
                    host = value
                else:
                    headers.append((name, value))
            elif name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
        headers[0] = (b"host", authority or host)
        if method is None or path is None:  # CONNECT
            self._h2.reset_stream(event.stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        raw_path, _, query = path.partition(b"?")
        scope = dict(self._scope)
        scope["method"] = method.decode("ascii")
        scope["raw_path"] = raw_path
        scope["query_string"] = query
        scope["headers"] = headers
        stream = self._streams[event.stream_id] = _Stream(event.stream_id, scope)
        try:
            scope["path"] = unquote(raw_path.decode("ascii"), errors="strict")
        except UnicodeError:
            self._refuse(stream, 400, ErrorCodes.NO_ERROR)
            return
        self._requests += 1
        if self._settings.max_requests and self._requests >= self._settings.max_requests:
            self.goaway()
        assert self._apps is not None
        self._apps.start_soon(self._call_app, stream)

    def _refuse(self, stream: _Stream, status: int, error: ErrorCodes) -> None:
        """Answer ``status`` without calling the app, and end the stream (asking the client to stop
        sending)."""
        with suppress(h2.exceptions.ProtocolError):
            self._h2.send_headers(stream.id, [(b":status", str(status).encode())], end_stream=True)
        with suppress(h2.exceptions.ProtocolError):
            self._h2.reset_stream(stream.id, error)
        stream.body.clear()
        stream.drop()
        del self._streams[stream.id]

    # -- one request's app -----------------------------------------------------------------------------------

    async def _call_app(self, stream: _Stream) -> None:
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                if not stream.complete:
                    stream.arrived = trio.Event()
                    await stream.arrived.wait()
                    if not stream.complete:
                        raise _Gone
                body = b"".join(stream.body)
                stream.body.clear()
                return {"type": "http.request", "body": body, "more_body": False}
            while not stream.gone:
                await self._window.wait()
            return _DISCONNECT

        async def send(message: dict[str, Any]) -> None:
            await self._send(stream, message)

        try:
            if not stream.gone:
                await self._app(stream.scope, receive, send)
        except Exception:  # _Gone, or the app's bug: a 500 or the stream reset, as hypercorn does
            pass
        finally:
            # A reply left unfinished is ended before a GOAWAY that waited for this stream (none after it).
            if not stream.ended and not stream.gone and not self._lost:
                with suppress(h2.exceptions.ProtocolError):
                    if stream.started:
                        self._h2.reset_stream(stream.id, ErrorCodes.INTERNAL_ERROR)
                    else:
                        self._h2.send_headers(stream.id, [(b":status", b"500")], end_stream=True)
                self._dirty.set()
            self._streams.pop(stream.id, None)
            if not self._streams:
                self._idle_since = trio.current_time()
                if self._closing:
                    self.goaway()

    async def _send(self, stream: _Stream, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            stream.status = message["status"]
            stream.headers = [(bytes(n).lower(), bytes(v)) for n, v in message.get("headers", ())]
            return
        if kind != "http.response.body" or stream.gone or stream.ended or self._lost:
            return
        data = bytes(message.get("body", b""))
        end = not message.get("more_body", False)
        try:
            if not stream.started:
                stream.started = True
                headers = [(b":status", str(stream.status).encode()), *stream.headers]
                self._h2.send_headers(stream.id, headers, end_stream=end and not data)
            while data:
                window = min(self._h2.local_flow_control_window(stream.id), self._h2.max_outbound_frame_size)
                if window <= 0:
                    self._dirty.set()
                    await self._window.wait()
                    if stream.gone or self._lost:
                        return
                    continue
                chunk, data = data[:window], data[window:]
                self._h2.send_data(stream.id, chunk, end_stream=end and not data)
        except h2.exceptions.ProtocolError:  # the stream or the connection closed meanwhile
            stream.gone = True
            return
        stream.ended = end
        self._dirty.set()


class _Server:
    """The listener's side: sorts each connection to HTTP/2 or to hypercorn."""

    def __init__(self, app: App, ssl_context: ssl.SSLContext | None, settings: H2Settings, config: Config):
        self.app = app
        self.ssl_context = ssl_context
        self.settings = settings
        self.config = config
        self.asgi = wrap_app(app, config.wsgi_max_body_size, "asgi")
        self.context = WorkerContext(None)
        self.connections: set[ServerConnection] = set()
        self.stopping = False

    async def serve(self, sock: trio.SocketStream) -> None:
        stream: Any = sock
        read = b""
        try:
            if self.ssl_context is not None:
                stream = trio.SSLStream(sock, self.ssl_context, server_side=True, https_compatible=True)
                with trio.fail_after(self.settings.handshake_timeout):
                    await stream.do_handshake()
                h2_wanted = stream.selected_alpn_protocol() == "h2"
            else:
                with trio.fail_after(self.settings.handshake_timeout):
                    while len(read) < len(PREFACE) and PREFACE.startswith(read):
                        chunk = await sock.receive_some(_RECEIVE)
                        if not chunk:
                            break
                        read += chunk
                h2_wanted = read.startswith(PREFACE)
                if not h2_wanted:
                    stream = PrefixedStream(sock, read)
        except (*_BROKEN, trio.TooSlowError):
            with trio.CancelScope(shield=True), suppress(*_BROKEN):
                await sock.aclose()
            return
        if not h2_wanted:
            await TCPServer(self.asgi, self.config, self.context, {}, stream).run()
            return
        if self.stopping:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0), suppress(*_BROKEN):
                await stream.aclose()
            return
        connection = ServerConnection(self.app, stream, self._scope(sock), self.settings, read)
        self.connections.add(connection)
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)

    def _scope(self, sock: trio.SocketStream) -> Scope:
        client = sock.socket.getpeername()
        server = sock.socket.getsockname()
        return {
            "type": "http",
            "asgi": {"spec_version": "2.1", "version": "3.0"},
            "http_version": "2",
            "scheme": "https" if self.ssl_context is not None else "http",
            "root_path": "",
            "client": (client[0], client[1]),
            "server": (server[0], server[1]),
        }

    async def stop(self) -> None:
        """GOAWAY on every HTTP/2 connection, and hypercorn's idle connections closed; waits (a little) for
        the GOAWAYs to be written."""
        self.stopping = True
        for connection in list(self.connections):
            connection.goaway(now=True)
        await self.context.terminated.set()
        with trio.move_on_after(1.0):
            for connection in list(self.connections):
                await connection.wait_flushed()


@asynccontextmanager
async def serve_h2_on_loopback(
    app: App,
    *,
    ssl_context: ssl.SSLContext | None = None,
    settings: H2Settings | None = None,
    config: Config | None = None,
) -> AsyncIterator[str]:
    """Serve the ASGI ``app`` on 127.0.0.1 (a free port) for the block; yields the base URL. HTTP/2 as the
    module docstring says; TLS with ``ssl_context`` (which should offer ALPN ``h2``); other connections by
    hypercorn with ``config`` (its logs are turned off here)."""
    config = config or Config()
    config.accesslog = None
    config.errorlog = None
    server = _Server(app, ssl_context, settings or H2Settings(), config)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, server.serve, listeners)
        try:
            yield f"{'https' if ssl_context is not None else 'http'}://127.0.0.1:{port}"
        finally:
            with trio.CancelScope(shield=True):
                await server.stop()
            nursery.cancel_scope.cancel()
