"""Malformed requests against the real program: h11's refusal, never an answer from the front end.

The plain-HTTP port is served by the HTTP worker and the front end, which read the plainest requests
themselves and hand every other one to hypercorn. A request h11 refuses (no ``Host``, a control byte in a
value or the target, a space before a colon, clashing lengths, an unknown transfer coding, ...) must get
exactly h11's refusal (its status, an empty body), whichever process read it first, also when it follows a
plain request on the same connection.
"""

from __future__ import annotations

import h11
import pytest
import trio
from conftest import attacked

pytestmark = pytest.mark.attack

KEY = "0123456789abcdef0123456789abcdef01234567"
BOUND = 5.0
"""Safety bound on each exchange (not a timing assertion)."""

UNSUBSCRIBE = b'{"key":"tok"}'
PLAIN = [
    b"GET /node/info HTTP/1.1\r\nHost: x\r\n\r\n",
    f"GET /key/{KEY} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    f"UNSUBSCRIBE /key/{KEY} HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n\r\n".encode() + UNSUBSCRIBE,
]
"""Plain requests, each answered (the front end is serving)."""

REFUSED = [
    b"GET /node/info HTTP/1.1\r\n\r\n",
    b"GET /node/info HTTP/1.1\r\nAccept: */*\r\n\r\n",
    f"GET /key/{KEY} HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n".encode(),
    # the worker relays an UNSUBSCRIBE it reads
    f"UNSUBSCRIBE /key/{KEY} HTTP/1.1\r\nContent-Length: 13\r\n\r\n".encode() + UNSUBSCRIBE,
    b"GET /node/info HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
    b"GET /node/info HTTP/1.1\r\nHost: x\r\nX: a\x0bb\r\n\r\n",
    f"GET /key/{KEY}\x01 HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    b"GET /node/info HTTP/1.1\r\nHost : x\r\n\r\n",
    b"GET /node/info HTTP/1.1\r\n Host: x\r\n\r\n",
    b"GET /node/info HTTP/1.1\r\nHost: x\r\nX@: y\r\n\r\n",
    b"G@T /node/info HTTP/1.1\r\nHost: x\r\n\r\n",
    f"POST /key/{KEY} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{{}}".encode(),
    f"POST /key/{KEY} HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\n{{}}".encode(),
    f"POST /key/{KEY} HTTP/1.1\r\nHost: x\r\nContent-Length: 0x2\r\n\r\n{{}}".encode(),
    f"POST /key/{KEY} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n".encode(),
    b"GET /node/info HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20_000,  # a head past h11's 16 KiB: 431
]


def h11_refusal(data: bytes) -> int:
    """The status h11 refuses ``data`` with (what hypercorn answers)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        while conn.next_event() is not h11.NEED_DATA:
            pass
    except h11.RemoteProtocolError as refusal:
        return refusal.error_status_hint
    raise AssertionError(f"h11 reads {data!r}")


async def responses(port: int, data: bytes, *, until: int | None = None) -> list[tuple[int, bytes]]:
    """The statuses and bodies of the responses to ``data`` sent on a new connection: ``until`` of them, or
    all of them until the server closes the connection.
    """
    received = bytearray()
    found: list[tuple[int, bytes]] = []
    with trio.fail_after(BOUND):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(data)
            while until is None or len(found) < until:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                received += chunk
                found = _responses(bytes(received))
    return _responses(bytes(received))


def _responses(data: bytes) -> list[tuple[int, bytes]]:
    """The statuses and bodies of the complete responses at the start of ``data``."""
    found = []
    while data:
        conn = h11.Connection(h11.CLIENT)
        conn.send(
            h11.Request(method="GET", target="/", headers=[("Host", "x")])
        )  # so that h11 reads a response
        conn.receive_data(data)
        status, body = 0, b""
        while (event := conn.next_event()) is not h11.NEED_DATA:
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                found.append((status, body))
                break
        else:
            return found
        data = conn.trailing_data[0]
    return found


async def test_requests_h11_refuses_get_its_refusal_from_the_real_program() -> None:
    async with attacked() as target:
        for data in PLAIN:
            assert [status for status, _ in await responses(target.http_port, data, until=1)] == [200], data
        for data in REFUSED:  # h11's refusal: its status, no body
            assert await responses(target.http_port, data, until=1) == [(h11_refusal(data), b"")], data
        plain = PLAIN[0]
        for data in REFUSED[:8]:  # after a plain request on the connection (read by the front end)
            [first, refusal] = await responses(target.http_port, plain + data, until=2)
            assert first[0] == 200 and refusal == (h11_refusal(data), b""), data
