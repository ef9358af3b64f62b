"""The HTTP/2 request core (driven against an ``h2`` server connection in memory) and its Trio shell
(against a small ``h2`` server on loopback, and against httpx to the FCM double: the same requests
arrive)."""

from __future__ import annotations

import json
from contextlib import suppress
from functools import partial

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import httpx
import trio
from hyperframe.frame import GoAwayFrame

from trio_dht.push.gateway import Reply, ReplyTooLarge
from trio_dht.push.http2 import (
    LAST_STREAM_ID,
    Http2Requests,
    Request,
    StreamError,
    TimedOut,
    Unprocessed,
    Unreachable,
    open_http2_origin,
)
from trio_dht.testing.fcm import open_fcm_double

S = h2.settings.SettingCodes


class Server:
    """An ``h2`` server connection, in memory, talking to one :class:`Http2Requests`."""

    def __init__(self, client: Http2Requests, **settings: int) -> None:
        self.client = client
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.h2.initiate_connection()
        if settings:
            self.h2.update_settings({getattr(S, name.upper()): value for name, value in settings.items()})
        self.requests: dict[int, dict] = {}
        self.resets: dict[int, int] = {}

    def pump(self) -> list:
        """Exchange bytes until both sides are quiet; the client's finished streams."""
        finished = []
        for _ in range(20):
            to_server = self.client.data_to_send()
            if to_server:
                self._events(self.h2.receive_data(to_server))
            to_client = self.h2.data_to_send()
            if to_client:
                finished += self.client.receive(to_client)
            if not to_server and not to_client:
                return finished
        raise AssertionError("no quiet")

    def _events(self, events) -> None:
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.requests[event.stream_id] = {"headers": list(event.headers), "body": b"", "ended": False}
            elif isinstance(event, h2.events.DataReceived):
                self.requests[event.stream_id]["body"] += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.requests[event.stream_id]["ended"] = True
            elif isinstance(event, h2.events.StreamReset):
                self.resets[event.stream_id] = event.error_code

    def reply(self, stream_id: int, status: int = 200, body: bytes = b"", headers=()) -> None:
        self.h2.send_headers(stream_id, [(b":status", str(status).encode()), *headers], end_stream=not body)
        if body:
            self.h2.send_data(stream_id, body, end_stream=True)


def connected(**settings: int) -> tuple[Http2Requests, Server]:
    client = Http2Requests("push.example:443", max_body=1000)
    server = Server(client, **settings)
    assert server.pump() == []
    return client, server


def test_a_batch_goes_out_in_one_write_and_each_reply_comes_back_whole():
    client, server = connected(max_concurrent_streams=100)
    headers = [(b"authorization", b"Bearer t"), (b"content-type", b"application/json")]
    ids = [client.request(b"/send", headers, json.dumps({"n": n}).encode()) for n in range(10)]
    assert ids == list(range(1, 21, 2))
    server.pump()
    assert all(r["ended"] for r in server.requests.values()) and len(server.requests) == 10
    assert server.requests[3]["headers"] == [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", b"push.example:443"),
        (b":path", b"/send"),
        *headers,
        (b"content-length", b"8"),
    ]
    assert server.requests[3]["body"] == b'{"n": 1}'
    for sid in ids:
        server.reply(sid, 200 if sid != 5 else 429, b'{"ok": %d}' % sid, [(b"retry-after", b"7")])
    finished = dict(server.pump())
    assert set(finished) == set(ids) and client.open_streams == 0
    assert finished[1] == Reply(200, {"retry-after": "7"}, b'{"ok": 1}')
    assert finished[5].status_code == 429 and finished[5].headers["retry-after"] == "7"


def test_streams_wait_for_the_servers_limit_one_until_its_settings_arrive():
    client = Http2Requests("a", max_body=1000)
    assert client.can_open
    client.request(b"/", [], b"x")
    assert not client.can_open  # one stream before the server's SETTINGS (APNs starts at 1)
    server = Server(client, max_concurrent_streams=2)
    server.pump()
    assert client.can_open
    client.request(b"/", [], b"y")
    assert not client.can_open
    server.reply(1)
    assert [sid for sid, _ in server.pump()] == [1] and client.can_open


def test_h2_counts_the_cores_open_streams_and_still_forgets_closed_ones():
    """h2 takes the core's count of requests under way (no walk over its streams per request), which is its
    own exact count whenever a request may start, and still forgets closed streams: thousands of requests
    leave it holding a bounded number."""
    client, server = connected(max_concurrent_streams=300)
    held = []
    for _ in range(30):
        ids = [client.request(b"/", [], b"x") for _ in range(250)]
        connection = client._h2
        exact = sum(1 for sid, stream in connection.streams.items() if stream.open and sid % 2)  # no sweep
        assert connection.open_outbound_streams == exact == 250
        server.pump()
        for sid in ids[:-1]:
            server.reply(sid)
        server.h2.reset_stream(ids[-1])  # one ends reset, not answered
        assert len(server.pump()) == 250 and client.open_streams == 0
        held.append(len(connection.streams))
    assert max(held) <= 2 * 250 + 64  # 7,500 requests


def test_a_body_larger_than_the_window_is_sent_as_the_server_opens_it():
    client, server = connected(initial_window_size=100, max_concurrent_streams=10)
    body = bytes(range(256)) * 4
    sid = client.request(b"/big", [], body)
    server.pump()
    assert server.requests[sid]["body"] == body and server.requests[sid]["ended"]


def test_an_oversized_reply_is_refused_and_its_stream_reset():
    client, server = connected(max_concurrent_streams=10)
    declared, sent, fine = (client.request(b"/", [], b"x") for _ in range(3))
    server.pump()
    server.h2.send_headers(declared, [(b":status", b"200"), (b"content-length", b"5000")])
    server.h2.send_headers(sent, [(b":status", b"500")])
    server.h2.send_data(sent, b"x" * 800)
    server.h2.send_data(sent, b"x" * 800)
    server.reply(fine, 200, b"x" * 1000)  # at the cap
    finished = dict(server.pump())
    assert isinstance(finished[declared], ReplyTooLarge) and finished[declared].status_code == 200
    assert isinstance(finished[sent], ReplyTooLarge) and finished[sent].status_code == 500
    assert finished[fine].content == b"x" * 1000
    assert server.resets == {declared: h2.errors.ErrorCodes.CANCEL, sent: h2.errors.ErrorCodes.CANCEL}


def test_goaway_marks_the_streams_it_never_processed_and_lets_the_others_finish():
    client, server = connected(max_concurrent_streams=10)
    ids = [client.request(b"/", [], b"x") for _ in range(4)]  # 1, 3, 5, 7
    server.pump()
    # (h2 cannot send after its own GOAWAY: the frame is made here, and the replies after it)
    finished = dict(client.receive(GoAwayFrame(0, last_stream_id=3).serialize()))
    assert set(finished) == {5, 7} and all(isinstance(e, Unprocessed) for e in finished.values())
    assert client.goaway and not client.can_open and client.open_streams == 2
    server.reply(1)
    server.reply(3, 410)
    finished = dict(server.pump())
    assert finished[1].status_code == 200 and finished[3].status_code == 410
    assert client.open_streams == 0 and ids == [1, 3, 5, 7]


def test_goaway_with_an_error_fails_every_stream():
    client, server = connected(max_concurrent_streams=10)
    for _ in range(3):
        client.request(b"/", [], b"x")
    server.pump()
    server.h2.close_connection(h2.errors.ErrorCodes.INTERNAL_ERROR, last_stream_id=3)
    finished = dict(server.pump())
    assert isinstance(finished[5], Unprocessed)
    assert type(finished[1]) is StreamError and type(finished[3]) is StreamError


def test_refused_streams_may_be_sent_again_other_resets_not():
    client, server = connected(max_concurrent_streams=10)
    refused, cancelled = client.request(b"/", [], b"x"), client.request(b"/", [], b"x")
    server.pump()
    server.h2.reset_stream(refused, h2.errors.ErrorCodes.REFUSED_STREAM)
    server.h2.reset_stream(cancelled, h2.errors.ErrorCodes.INTERNAL_ERROR)
    finished = dict(server.pump())
    assert isinstance(finished[refused], Unprocessed)
    assert type(finished[cancelled]) is StreamError


def test_garbage_ends_the_connection_and_every_stream_with_it():
    client, server = connected(max_concurrent_streams=10)
    client.request(b"/", [], b"x")
    server.pump()
    finished = client.receive(b"\x00\x00\x08\x07\x00\x00\x00\x00\x01" + b"\xff" * 8)  # GOAWAY on stream 1
    assert [type(e) for _, e in finished] == [StreamError] and client.goaway
    assert client.data_to_send()  # our GOAWAY
    assert client.connection_lost() == []


def test_reply_headers_over_the_cap_end_the_connection_not_the_process():
    client, server = connected(max_concurrent_streams=10)
    sid = client.request(b"/", [], b"x")
    server.pump()
    server.h2.send_headers(sid, [(b":status", b"200"), *[(b"x-%d" % i, b"v" * 1000) for i in range(20)]])
    finished = client.receive(server.h2.data_to_send())
    assert [type(e) for _, e in finished] == [StreamError] and "protocol error" in str(finished[0][1])
    assert client.goaway


def test_a_window_update_then_a_reset_of_a_held_back_body_fails_that_stream_only():
    client, server = connected(initial_window_size=10, max_concurrent_streams=10)
    held = client.request(b"/", [], b"x" * 100)
    client.request(b"/", [], b"y")
    server.pump()
    server.h2.increment_flow_control_window(1000, stream_id=held)
    server.h2.reset_stream(held, h2.errors.ErrorCodes.INTERNAL_ERROR)
    finished = dict(client.receive(server.h2.data_to_send()))  # h2 would refuse the rest of the body
    assert type(finished[held]) is StreamError and client.open_streams == 1 and not client.goaway


def test_a_window_update_then_goaway_with_an_error_ends_the_connection_without_raising():
    client, server = connected(initial_window_size=10, max_concurrent_streams=10)
    sid = client.request(b"/", [], b"x" * 100)
    server.pump()
    server.h2.increment_flow_control_window(1000, stream_id=sid)
    server.h2.close_connection(h2.errors.ErrorCodes.INTERNAL_ERROR, last_stream_id=sid)
    finished = dict(client.receive(server.h2.data_to_send()))
    assert type(finished[sid]) is StreamError and client.goaway and client.open_streams == 0


def test_an_early_reply_closes_the_stream_whose_body_was_held_back():
    client, server = connected(initial_window_size=10, max_concurrent_streams=1)
    sid = client.request(b"/", [], b"x" * 100)
    server.pump()
    server.reply(sid, 413)
    [(done, reply)] = server.pump()
    assert (done, reply.status_code) == (sid, 413)
    assert client._h2.open_outbound_streams == 0 and client.can_open  # h2 counts it closed too
    client.request(b"/", [], b"y")  # h2 would refuse a second stream over the server's limit of 1


def test_goaway_marks_never_written_streams_unprocessed_whatever_its_last_stream_id():
    client, server = connected(max_concurrent_streams=10)
    sent = client.request(b"/", [], b"x")
    server.pump()
    held = client.request(b"/", [], b"y")  # started, not yet written when the GOAWAY comes
    finished = dict(client.receive(GoAwayFrame(0, last_stream_id=2**31 - 1).serialize()))
    assert set(finished) == {held} and isinstance(finished[held], Unprocessed) and client.open_streams == 1
    assert sent == 1


def test_a_connection_whose_stream_ids_run_short_takes_no_more_requests():
    client, _ = connected(max_concurrent_streams=10)
    client._h2.highest_outbound_stream_id = LAST_STREAM_ID
    client.request(b"/", [], b"x")
    assert client.goaway and not client.can_open


def test_a_reset_request_is_forgotten():
    client, server = connected(max_concurrent_streams=10)
    sid = client.request(b"/", [], b"x")
    server.pump()
    client.reset(sid)
    server.pump()
    assert server.resets == {sid: h2.errors.ErrorCodes.CANCEL} and client.open_streams == 0


# -- the Trio shell, against a small h2 server on loopback ---------------------------------------------------


async def serve_h2(nursery, handler, *, max_streams=100):
    """An h2c server on 127.0.0.1: ``handler(conn, stream_id, body)`` -> (status, body) or None (no reply);
    returns its port and the list of connections' request counts."""
    connection, served = h2c_connection_handler(handler, max_streams=max_streams)
    listeners = await nursery.start(partial(trio.serve_tcp, connection, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1], served


def h2c_connection_handler(handler, *, max_streams):
    """The connection task of :func:`serve_h2`, and its list of request counts."""
    served = []

    async def connection(stream):
        with suppress(trio.BrokenResourceError):  # a client that resets the connection
            await serve_one(stream)

    async def serve_one(stream):
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        conn.update_settings({S.MAX_CONCURRENT_STREAMS: max_streams})
        await stream.send_all(conn.data_to_send())
        bodies: dict[int, bytes] = {}
        served.append(0)
        index = len(served) - 1
        async with stream:
            while data := await stream.receive_some(65536):
                try:
                    events = conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    return  # frames after its own GOAWAY (h2 takes none)
                for event in events:
                    if isinstance(event, h2.events.DataReceived):
                        bodies[event.stream_id] = bodies.get(event.stream_id, b"") + event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        body = bodies.pop(event.stream_id, b"")
                        if body == b"close":
                            return  # the socket closes, nothing more answered
                        served[index] += 1
                        answer = handler(conn, event.stream_id, body)
                        if answer is not None:
                            conn.send_headers(event.stream_id, [(b":status", str(answer[0]).encode())])
                            conn.send_data(event.stream_id, answer[1], end_stream=True)
                await stream.send_all(conn.data_to_send())

    return connection, served


def requests(n):
    return [Request(b"/p", [(b"content-type", b"text/plain")], f"r{i}".encode()) for i in range(n)]


async def test_goaway_mid_batch_resends_only_what_the_server_did_not_process():
    answered = []
    gone = set()

    def handler(conn, stream_id, body):
        if id(conn) in gone:
            return None  # after its GOAWAY, the server processes nothing more
        answered.append(body)
        if len(answered) == 5:  # the fifth request of the first connection is its last
            conn.send_headers(stream_id, [(b":status", b"200")])
            conn.send_data(stream_id, body, end_stream=True)
            conn.close_connection(last_stream_id=stream_id)
            gone.add(id(conn))
            return None
        return 200, body

    async with trio.open_nursery() as nursery:
        port, _ = await serve_h2(nursery, handler)
        async with open_http2_origin(f"http://127.0.0.1:{port}") as origin:
            replies = await origin.request_many(requests(3))
            replies += await origin.request_many(requests(10))
            assert [r.content for r in replies] == [f"r{i}".encode() for i in (*range(3), *range(10))]
            assert origin.connections_made == 2
        nursery.cancel_scope.cancel()
    assert sorted(answered) == sorted(r.content for r in replies)  # each answered once: none twice, none lost


async def test_a_cancelled_batch_resets_its_streams_and_the_connection_serves_on():
    def handler(conn, stream_id, body):
        return None if body == b"r0" else (200, body)

    async with trio.open_nursery() as nursery:
        port, _ = await serve_h2(nursery, handler)
        async with open_http2_origin(f"http://127.0.0.1:{port}") as origin:
            with trio.move_on_after(0.5) as scope:
                await origin.request_many(requests(2))
            assert scope.cancelled_caught
            assert [r.status_code for r in await origin.request_many(requests(3)[1:])] == [200, 200]
            assert origin.connections_made == 1
            assert origin._connection.core.open_streams == 0
        nursery.cancel_scope.cancel()


async def test_a_lost_connection_fails_its_streams_and_the_next_batch_reconnects():
    async with trio.open_nursery() as nursery:
        port, _served = await serve_h2(nursery, lambda conn, sid, body: (200, body))
        async with open_http2_origin(f"http://127.0.0.1:{port}") as origin:
            lost = await origin.request_many([Request(b"/", [], b"close")])
            assert [type(r) for r in lost] == [StreamError]
            assert "closed the connection" in str(lost[0])
            assert [r.status_code for r in await origin.request_many(requests(2))] == [200, 200]
            assert origin.connections_made == 2
        nursery.cancel_scope.cancel()


async def test_at_the_servers_stream_limit_the_rest_of_a_batch_waits_for_a_free_stream():
    async with trio.open_nursery() as nursery:
        port, served = await serve_h2(nursery, lambda conn, sid, body: (200, body), max_streams=2)
        async with open_http2_origin(f"http://127.0.0.1:{port}") as origin:
            replies = await origin.request_many(requests(9))
        assert [r.content for r in replies] == [f"r{i}".encode() for i in range(9)] and served == [9]
        nursery.cancel_scope.cancel()


async def test_idle_connection_is_closed_and_a_new_one_made(autojump_clock):
    async with trio.open_nursery() as nursery:
        port, _served = await serve_h2(nursery, lambda conn, sid, body: (200, body))
        async with open_http2_origin(f"http://127.0.0.1:{port}", idle=60) as origin:
            await origin.request_many(requests(1))
            await trio.sleep(59)
            await origin.request_many(requests(1))
            await trio.sleep(61)
            assert origin._connection is None
            await origin.request_many(requests(1))
            assert origin.connections_made == 2
        nursery.cancel_scope.cancel()


async def test_an_unreachable_origin_is_a_result_not_an_exception():
    async with open_http2_origin("http://127.0.0.1:9") as origin:
        replies = await origin.request_many(requests(2))
    assert [type(r) for r in replies] == [Unreachable, Unreachable] and "127.0.0.1:9" in str(replies[0])


async def test_a_failed_reconnect_keeps_the_replies_that_came():
    accepting = trio.CancelScope()

    def handler(conn, stream_id, body):  # answers the first, then goes away without the second
        if accepting.cancel_called:
            return None
        conn.send_headers(stream_id, [(b":status", b"200")])
        conn.send_data(stream_id, body, end_stream=True)
        conn.close_connection(last_stream_id=stream_id)
        accepting.cancel()  # and nothing listens any more
        return None

    async with trio.open_nursery() as handlers:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        serve, _ = h2c_connection_handler(handler, max_streams=100)

        async def accept():
            with accepting:
                await trio.serve_listeners(serve, listeners, handler_nursery=handlers)

        handlers.start_soon(accept)
        async with open_http2_origin(f"http://127.0.0.1:{port}") as origin:
            replies = await origin.request_many(requests(2))
        handlers.cancel_scope.cancel()
    assert replies[0].content == b"r0" and isinstance(replies[1], Unreachable)


async def test_past_its_deadline_a_batch_keeps_its_replies_and_the_connection_serves_on():
    def handler(conn, stream_id, body):
        return None if body == b"r1" else (200, body)  # r1 never answered

    async with trio.open_nursery() as nursery:
        port, _ = await serve_h2(nursery, handler)
        async with open_http2_origin(f"http://127.0.0.1:{port}") as origin:
            replies = await origin.request_many(requests(3), deadline=trio.current_time() + 0.5)
            assert [r.content if isinstance(r, Reply) else type(r) for r in replies] == [
                b"r0",
                TimedOut,
                b"r2",
            ]
            assert (await origin.request_many(requests(1)))[0].content == b"r0"
            assert origin.connections_made == 1
        nursery.cancel_scope.cancel()


# -- differential: the same requests through httpx and through ours reach the FCM double alike --------------


async def test_the_double_receives_from_us_what_it_receives_from_httpx():
    async with open_fcm_double() as fcm, httpx.AsyncClient(http1=False, http2=True) as client:
        url = f"{fcm.url}/v1/projects/other/messages:send"
        headers = {"authorization": "Bearer nope", "content-type": "application/json", "x-n": "1"}
        body = json.dumps({"message": {"token": "t"}}).encode()
        theirs = await client.post(url, content=body, headers=headers)
        async with open_http2_origin(fcm.url) as origin:
            [ours] = await origin.request_many(
                [
                    Request(
                        b"/v1/projects/other/messages:send",
                        [(k.encode(), v.encode()) for k, v in headers.items()],
                        body,
                    )
                ]
            )
    assert (ours.status_code, ours.content) == (theirs.status_code, theirs.content) == (401, theirs.content)
    assert ours.headers["content-type"] == theirs.headers["content-type"]
    first, second = fcm.requests
    assert (first.method, first.path, first.body) == (second.method, second.path, second.body)
    ignore = {"user-agent", "accept", "accept-encoding"}  # httpx's defaults
    assert {k: v for k, v in first.headers.items() if k not in ignore} == second.headers
