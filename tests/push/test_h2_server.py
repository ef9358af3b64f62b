"""The doubles' HTTP/2 server (``testing/h2_server.py``): h2c and TLS, many streams, bounds, flow control,
resets, GOAWAY, and the HTTP/1.1 connections it hands to hypercorn."""

import json
import ssl
from contextlib import asynccontextmanager

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import httpx
import trio
import trio.testing
from h2.errors import ErrorCodes
from hyperframe.frame import HeadersFrame

from trio_dht.testing.apns import _make_tls
from trio_dht.testing.gorush import Reply, read_request, send_reply
from trio_dht.testing.h2_server import _MAX_UNWRITTEN, H2Settings, ServerConnection, serve_h2_on_loopback


class App:
    """An ASGI app that records its scopes and answers each request with its path and body, or a scripted
    reply; ``hold`` keeps requests waiting until set."""

    def __init__(self) -> None:
        self.scopes: list[dict] = []
        self.bodies: list[bytes] = []
        self.reply: Reply | None = None
        self.hold: trio.Event | None = None
        self.after_hold: list[dict] = []
        """With ``wait_disconnect``: what ``receive`` gave after the hold (it waits for a disconnect)."""
        self.wait_disconnect = False
        self.done = 0

    async def __call__(self, scope, receive, send) -> None:
        self.scopes.append(scope)
        request = await read_request(scope, receive)
        self.bodies.append(request.body)
        if self.hold is not None:
            await self.hold.wait()
            if self.wait_disconnect:
                self.after_hold.append(await receive())
        reply = self.reply or Reply(200, json.dumps({"path": request.path, "n": len(request.body)}).encode())
        await send_reply(send, reply)
        self.done += 1


@asynccontextmanager
async def serving(app, **options):
    async with serve_h2_on_loopback(app, **options) as url:
        yield url


class RawClient:
    """An HTTP/2 client on h2 with every frame in the test's hands."""

    def __init__(self, stream, *, window: int | None = None, validate: bool = True) -> None:
        self.stream = stream
        config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=validate,
                                           normalize_outbound_headers=validate)  # fmt: skip
        self.h2 = h2.connection.H2Connection(config)
        if window is not None:
            self.h2.local_settings = h2.settings.Settings(
                client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
            )
        self.h2.initiate_connection()
        self.events: list = []
        self.closed = False

    @classmethod
    @asynccontextmanager
    async def connect(cls, url: str, **options):
        host, port = url.split("//")[1].split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        client = cls(stream, **options)
        await client.flush()
        try:
            yield client
        finally:
            await stream.aclose()

    async def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            await self.stream.send_all(data)

    def request(self, path="/x", body=b"", *, end=True, headers=()) -> int:
        sid = self.h2.get_next_available_stream_id()
        head = [(":method", "POST"), (":scheme", "http"), (":authority", "127.0.0.1"), (":path", path),
                *headers]  # fmt: skip
        self.h2.send_headers(sid, head, end_stream=end and not body)
        if body:
            self.h2.send_data(sid, body, end_stream=end)
        return sid

    async def read(self, *, ack: bool = True) -> list:
        """The events of one read (empty once the server closed)."""
        data = await self.stream.receive_some(65536)
        if not data:
            self.closed = True
            return []
        events = self.h2.receive_data(data)
        for event in events:
            if ack and isinstance(event, h2.events.DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        await self.flush()
        self.events += events
        return events

    async def response(self, sid: int) -> tuple[int, bytes, str]:
        """Status, body and how the stream ended (``"end"``, ``"reset"``, ``"closed"``)."""
        status, body = 0, b""
        seen = 0
        with trio.fail_after(5):
            while True:
                for event in self.events[seen:]:
                    if getattr(event, "stream_id", None) != sid:
                        continue
                    if isinstance(event, h2.events.ResponseReceived):
                        status = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        body += event.data
                    elif isinstance(event, h2.events.StreamEnded):
                        return status, body, "end"
                    elif isinstance(event, h2.events.StreamReset):
                        return status, body, "reset"
                seen = len(self.events)
                if self.closed or not await self.read():
                    return status, body, "closed"

    async def goaway(self) -> h2.events.ConnectionTerminated:
        with trio.fail_after(5):
            while True:
                for event in self.events:
                    if isinstance(event, h2.events.ConnectionTerminated):
                        return event
                assert await self.read(), "closed without GOAWAY"


async def test_many_concurrent_streams_on_one_h2c_connection():
    app = App()
    async with serving(app) as url, httpx.AsyncClient(http1=False, http2=True) as client:
        assert url.startswith("http://127.0.0.1:")

        async def one(i: int) -> None:
            reply = await client.post(f"{url}/p/{i}?q=1", content=b"x" * i)
            assert reply.http_version == "HTTP/2"
            assert reply.json() == {"path": f"/p/{i}?q=1", "n": i}

        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(one, i)
    assert app.done == 300
    assert len({s["client"] for s in app.scopes}) == 1
    scope = app.scopes[0]
    assert scope["type"] == "http" and scope["http_version"] == "2" and scope["scheme"] == "http"
    assert (
        scope["method"] == "POST" and scope["query_string"] == b"q=1" and scope["raw_path"].startswith(b"/p/")
    )
    assert scope["headers"][0] == (b"host", url.split("//")[1].encode())
    assert all(name == name.lower() and not name.startswith(b":") for name, _ in scope["headers"])
    assert scope["server"][0] == "127.0.0.1"


async def test_the_stream_bound_is_advertised_and_kept():
    app = App()
    app.hold = trio.Event()
    async with (
        serving(app, settings=H2Settings(max_concurrent_streams=10)) as url,
        RawClient.connect(url) as raw,
    ):
        await raw.read()
        settings = raw.events[0].changed_settings
        assert settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS].new_value == 10
        await trio.sleep(0.05)  # our SETTINGS ACK is in
        for i in range(10):
            raw.request(f"/{i}")
        await raw.flush()
        with trio.fail_after(5):
            while len(app.bodies) < 10:
                await trio.sleep(0.01)
        eleventh = HeadersFrame(21, flags=["END_HEADERS", "END_STREAM"])  # h2 would refuse to send it
        eleventh.data = hpack.Encoder().encode(
            [(":method", "GET"), (":scheme", "http"), (":authority", "x"), (":path", "/11")]
        )
        await raw.stream.send_all(eleventh.serialize())
        assert (await raw.goaway()).error_code == ErrorCodes.PROTOCOL_ERROR
        app.hold.set()
    assert len(app.scopes) == 10


async def test_tls_with_alpn_h2_and_http1_fallback(tmp_path):
    ca, cert, key = _make_tls(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    server_context.set_alpn_protocols(["h2", "http/1.1"])
    app = App()
    client_context = ssl.create_default_context(cafile=str(ca))
    async with serving(app, ssl_context=server_context) as url:
        assert url.startswith("https://127.0.0.1:")
        async with httpx.AsyncClient(http2=True, verify=client_context) as client:
            reply = await client.post(f"{url}/tls", content=b"abc")
            assert reply.http_version == "HTTP/2" and reply.json() == {"path": "/tls", "n": 3}
        async with httpx.AsyncClient(verify=client_context) as client:  # ALPN http/1.1: hypercorn
            reply = await client.post(f"{url}/one", content=b"abcd")
            assert reply.http_version == "HTTP/1.1" and reply.json() == {"path": "/one", "n": 4}
    assert [s["http_version"] for s in app.scopes] == ["2", "1.1"]
    assert [s["scheme"] for s in app.scopes] == ["https", "https"]


async def test_plain_http1_goes_to_hypercorn_and_h2c_needs_the_preface():
    app = App()
    async with serving(app) as url:
        async with httpx.AsyncClient() as client:
            for _ in range(2):  # keep-alive on the handed-over connection
                reply = await client.post(f"{url}/old?a=b", content=b"12")
                assert reply.http_version == "HTTP/1.1" and reply.json() == {"path": "/old?a=b", "n": 2}
        async with RawClient.connect(url) as raw:  # prior knowledge: the first bytes are the preface
            sid = raw.request("/raw", b"hello")
            await raw.flush()
            assert await raw.response(sid) == (200, b'{"path": "/raw", "n": 5}', "end")
    assert [s["http_version"] for s in app.scopes] == ["1.1", "1.1", "2"]


async def test_a_body_over_the_cap_is_413_and_the_app_never_sees_it():
    app = App()
    async with serving(app, settings=H2Settings(max_body=1000)) as url, RawClient.connect(url) as raw:
        big = raw.request("/big", b"x" * 600, end=False)
        await raw.flush()
        raw.h2.send_data(big, b"y" * 600, end_stream=True)
        exact = raw.request("/exact", b"z" * 1000)
        await raw.flush()
        status, _, how = await raw.response(big)
        assert (status, how) == (413, "end")
        assert await raw.response(exact) == (200, b'{"path": "/exact", "n": 1000}', "end")
        resets = [e for e in raw.events if isinstance(e, h2.events.StreamReset) and e.stream_id == big]
        assert [r.error_code for r in resets] in ([ErrorCodes.NO_ERROR], [])  # h2 may drop it: we had ended
    assert app.bodies == [b"z" * 1000] and app.done == 1  # /big's app, if started, was cancelled


async def test_a_client_that_vanishes_mid_stream():
    app = App()
    async with serving(app) as url:
        async with RawClient.connect(url) as raw:
            raw.request("/half", b"part", end=False)  # the body never ends
            await raw.flush()
            with trio.fail_after(5):
                while not app.scopes:
                    await trio.sleep(0.01)
        app.hold = trio.Event()
        app.wait_disconnect = True
        async with RawClient.connect(url) as raw:  # a request whose app is still at work
            raw.request("/held", b"all")
            await raw.flush()
            with trio.fail_after(5):
                while len(app.bodies) < 1:
                    await trio.sleep(0.01)
        app.hold.set()
        with trio.fail_after(5):
            while app.done < 1:
                await trio.sleep(0.01)
        assert app.after_hold == [{"type": "http.disconnect"}]
        app.hold = None
        async with httpx.AsyncClient(http1=False, http2=True) as client:  # the server still serves
            assert (await client.post(f"{url}/next")).status_code == 200
    assert app.bodies == [b"all", b""]  # the vanished half request's app was cancelled waiting for its body


async def test_a_big_reply_keeps_to_the_client_flow_control_window():
    app = App()
    app.reply = Reply(200, b"0123456789" * 100, repeat=300)  # 300 KB, the window is 16 KiB
    async with serving(app) as url, RawClient.connect(url, window=16384) as raw:
        sid = raw.request("/huge")
        await raw.flush()
        with trio.fail_after(5):  # not acknowledging: the server stops at the window
            received = 0
            while received < 16384:
                for event in await raw.read(ack=False):
                    if isinstance(event, h2.events.DataReceived):
                        received += len(event.data)
        with trio.move_on_after(0.2):
            await raw.read(ack=False)
        assert sum(len(e.data) for e in raw.events if isinstance(e, h2.events.DataReceived)) == 16384
        for event in raw.events:
            if isinstance(event, h2.events.DataReceived):
                raw.h2.acknowledge_received_data(event.flow_controlled_length, sid)
        await raw.flush()
        status, body, how = await raw.response(sid)
        assert (status, how) == (200, "end")
        assert body == b"0123456789" * 30000  # h2 raises FlowControlError if the server overran


async def test_a_stream_reset_by_the_client():
    app = App()
    app.hold = trio.Event()
    app.wait_disconnect = True
    async with serving(app) as url, RawClient.connect(url) as raw:
        sid = raw.request("/reset", b"body")
        await raw.flush()
        with trio.fail_after(5):
            while not app.bodies:
                await trio.sleep(0.01)
        raw.h2.reset_stream(sid, ErrorCodes.CANCEL)
        await raw.flush()
        await trio.sleep(0.1)
        app.hold.set()
        with trio.fail_after(5):
            while app.done < 1:
                await trio.sleep(0.01)
        assert app.after_hold == [{"type": "http.disconnect"}]  # its reply went nowhere
        app.hold = None
        again = raw.request("/again")
        await raw.flush()
        assert await raw.response(again) == (200, b'{"path": "/again", "n": 0}', "end")
        assert not any(isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid for e in raw.events)


async def test_malformed_requests_and_oversized_headers_are_protocol_errors():
    app = App()
    settings = H2Settings(max_header_list_size=4096)
    async with serving(app, settings=settings) as url:
        async with RawClient.connect(url, validate=False) as raw:
            raw.request("/bad", headers=[("connection", "keep-alive")])  # connection-specific: refused
            await raw.flush()
            assert (await raw.goaway()).error_code == ErrorCodes.PROTOCOL_ERROR
        async with RawClient.connect(url, validate=False) as raw:
            raw.request("/upper", headers=[("X-Upper", "1")])
            await raw.flush()
            assert (await raw.goaway()).error_code == ErrorCodes.PROTOCOL_ERROR
        async with RawClient.connect(url) as raw:
            await raw.read()  # the server's SETTINGS, then our ACK
            await trio.sleep(0.05)
            raw.request("/fat", headers=[("x-fat", "f" * 8000)])
            await raw.flush()
            assert (await raw.goaway()).error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert app.scopes == []


async def test_goaway_after_max_requests_once_the_last_are_answered():
    app = App()
    app.hold = trio.Event()
    async with serving(app, settings=H2Settings(max_requests=2)) as url, RawClient.connect(url) as raw:
        first, second = raw.request("/1"), raw.request("/2")
        await raw.flush()
        with trio.fail_after(5):
            while len(app.bodies) < 2:
                await trio.sleep(0.01)
        late = raw.request("/late")  # over the limit: refused, never processed
        await raw.flush()
        assert await raw.response(late) == (0, b"", "reset")
        assert [e.error_code for e in raw.events if isinstance(e, h2.events.StreamReset)] == [
            ErrorCodes.REFUSED_STREAM
        ]
        assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in raw.events)
        app.hold.set()
        assert [(await raw.response(s))[0] for s in (first, second)] == [200, 200]
        goaway = await raw.goaway()  # after the answers: an h2 client takes no frame after a GOAWAY
        assert goaway.error_code == ErrorCodes.NO_ERROR
        with trio.fail_after(5):
            while not raw.closed:
                await raw.read()
    assert sorted(s["path"] for s in app.scopes) == ["/1", "/2"]


async def test_goaway_when_idle():
    async with serving(App(), settings=H2Settings(idle_timeout=0.3)) as url, RawClient.connect(url) as raw:
        start = trio.current_time()
        assert (await raw.goaway()).error_code == ErrorCodes.NO_ERROR
        assert 0.2 < trio.current_time() - start < 3


async def test_goaway_on_shutdown():
    app = App()
    server = serving(app)
    url = await server.__aenter__()
    async with RawClient.connect(url) as raw:
        sid = raw.request("/before")
        await raw.flush()
        assert (await raw.response(sid))[0] == 200
        await server.__aexit__(None, None, None)
        goaway = await raw.goaway()
        assert (goaway.error_code, goaway.last_stream_id) == (ErrorCodes.NO_ERROR, sid)


async def test_an_app_failing_the_last_request_before_goaway_still_answers_500():
    """The last request under way before a GOAWAY fails in the app: its 500 goes out before the GOAWAY."""

    async def failing(scope, receive, send) -> None:
        await read_request(scope, receive)
        raise RuntimeError("the app's bug")

    async with serving(failing, settings=H2Settings(max_requests=1)) as url, RawClient.connect(url) as raw:
        sid = raw.request("/only")
        await raw.flush()
        assert await raw.response(sid) == (500, b"", "end")
        assert (await raw.goaway()).error_code == ErrorCodes.NO_ERROR


async def test_a_client_that_pings_and_never_reads_is_read_no_further():
    """Each PING makes an ack to write; from a client that never reads, the connection reads no further once
    the acks held reach the bound: what it holds stays bounded, whatever the client sends."""
    client_end, server_end = trio.testing.lockstep_stream_pair()  # a write waits for the reader
    connection = ServerConnection(App(), server_end, {"type": "http"}, H2Settings())
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    sent = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.run)
        await client_end.send_all(client.data_to_send())
        with trio.move_on_after(2) as blocked:
            while sent < 64 * 1024 * 1024:
                for i in range(1000):
                    client.ping(i.to_bytes(8, "big"))
                burst = client.data_to_send()  # 17 KB of pings: 17 KB of acks to write
                await client_end.send_all(burst)
                sent += len(burst)
        assert blocked.cancelled_caught, "the server kept reading a client that never reads"
        assert len(connection._out) <= _MAX_UNWRITTEN + 65536  # the bound, and one read's acks
        nursery.cancel_scope.cancel()
