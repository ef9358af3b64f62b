"""Our REST proxy in front of our real DHT node, with a real OpenDHT node (PyPI opendht 4.4.2) in the DHT.

* OpenDHT's own C++ proxy client (``dhtnode --proxyclient URL``, Debian 2.4.12) gets, puts and listens through
  our proxy, seeing what the real node put into the DHT behind it (and an expiry), and the real node gets what
  it put.
* Raw HTTP (exact request bytes on a socket, as curl sends them) and httpx against the real hypercorn with the
  real :class:`~trio_dht.node.DhtNode` behind it: every route answers; node info counts the real node as good;
  GET streams NDJSON; POST answers the value JSON with its id; a listen stream shows a new value within 1 s of
  its put and an ``"expired":true`` line when it expires. The expiring value is a type-5 value (ICE
  candidates, 60 s) put over the wire with ``c`` = now - 52 s, as in the wire spec's B.3 transcript, so it
  expires about 8 s later.

With ``CI=true`` a missing peer fails these tests instead of skipping them.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import httpx
import pytest
import trio
from peers import (
    needs_dhtnode,
    needs_opendht,
    open_dhtnode_proxy_client,
    open_opendht_peer,
    poll_until,
    require_dhtnode,
    require_opendht,
)
from peers.opendht_peer import OpenDhtPeer

from trio_dht import InfoHash, Value
from trio_dht.node import DhtNode, open_node
from trio_dht.proxy import ProxyConfig, serve_proxy
from trio_dht.wire.message import Encoder, Kind, decode

pytestmark = [pytest.mark.interop, needs_opendht]

LOOPBACK = "127.0.0.1"


@dataclass
class Stack:
    node: DhtNode
    real: OpenDhtPeer
    url: str
    port: int


async def join_node_and_real_peer(stack: AsyncExitStack) -> tuple[DhtNode, OpenDhtPeer]:
    """Our node and a real OpenDHT node bootstrapped from it, once each counts the other as good."""
    node = await stack.enter_async_context(open_node(port=0, host=LOOPBACK, host6=None))
    real = await stack.enter_async_context(open_opendht_peer(bootstrap=(LOOPBACK, node.bound_port)))
    await real.wait_for_nodes(1, timeout=15)
    with trio.fail_after(15):
        while node.info().ipv4.good < 1:
            await trio.sleep(0.05)
    return node, real


@asynccontextmanager
async def open_stack() -> AsyncIterator[Stack]:
    """Our node + our proxy on it, and a real OpenDHT node bootstrapped from ours; both see each other."""
    async with AsyncExitStack() as stack:
        node, real = await join_node_and_real_peer(stack)
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        urls = await nursery.start(serve_proxy, node, ProxyConfig(host=LOOPBACK, port=0))
        url = next(u for u in urls if u.startswith("http://"))
        yield Stack(node, real, url, int(url.rsplit(":", 1)[1]))


# -- OpenDHT's C++ proxy client through our proxy ------------------------------------------------------------


@needs_dhtnode
async def test_cpp_proxy_client_gets_puts_and_listens_through_our_proxy() -> None:
    require_opendht()
    require_dhtnode()
    async with open_stack() as s, open_dhtnode_proxy_client(s.url) as client:
        # get: a value the real node put into the DHT behind the proxy.
        key = InfoHash.get("interop-proxy-get")
        assert await s.real.put(key, b"from-the-real-node", utype="text/plain")
        values = await client.get(key.hex())
        assert [v["data"] for v in values] == [b"from-the-real-node"]

        # put: the client's value is stored in the DHT, where the real node gets it.
        key = InfoHash.get("interop-proxy-put")
        assert await client.put(key.hex(), "from-the-cpp-proxy-client")
        got = await poll_until(lambda: s.real.get(key), timeout=10)
        assert [v["data"] for v in got] == [b"from-the-cpp-proxy-client"]

        # listen: the existing value first, then the real node's new one.
        key = InfoHash.get("interop-proxy-listen")
        assert await s.real.put(key, b"first", utype="text/plain")
        async with client.listen(key.hex()) as events:
            with trio.fail_after(10):
                first = await events.receive()
            assert first["data"] == b"first" and not first["expired"]
            assert await s.real.put(key, b"second", utype="text/plain")
            with trio.fail_after(10):
                second = await events.receive()
            assert second["data"] == b"second" and not second["expired"]
            # An expiry reaches it too (a type-5 value created 52 s ago lives about 8 s more).
            short = Value(data=b"ice", type=5, id=0x103)
            await _put_over_the_wire(s.node, key, short, created=int(time.time()) - 52)
            with trio.fail_after(5):
                third = await events.receive()
            assert (third["id"], third["data"], third["expired"]) == (0x103, b"ice", False)
            with trio.fail_after(12):
                gone = await events.receive()
            assert (gone["id"], gone["expired"]) == (0x103, True)


# -- raw HTTP and httpx against hypercorn with the real node behind it ---------------------------------------


async def raw_exchange(port: int, request: bytes, *, read_until: bytes | None = None) -> bytes:
    """Send ``request`` as is; read to EOF, or until ``read_until`` appears (for endless streams)."""
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    async with stream:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(10):
            while read_until is None or read_until not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
        return data


def split_response(data: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return status, headers, body


def dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


def curl(method: str, path: str, body: bytes | None = None) -> bytes:
    """The request curl 7.88 sends (``curl -X METHOD [-d BODY] URL``)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "User-Agent: curl/7.88.1", "Accept: */*"]
    if body is not None:
        lines += [f"Content-Length: {len(body)}", "Content-Type: application/x-www-form-urlencoded"]
    lines.append("Connection: close")  # so that a complete answer ends with EOF
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (body or b"")


async def test_every_route_over_raw_http_with_the_real_node_behind() -> None:
    require_opendht()
    async with open_stack() as s:
        key = InfoHash.get("interop-raw-routes")
        assert await s.real.put(key, b"real-value")

        status, headers, body = split_response(await raw_exchange(s.port, curl("GET", "/node/info")))
        assert status.startswith("HTTP/1.1 200")
        assert headers["content-type"] == "application/json"
        assert headers["access-control-allow-origin"] == "*"
        assert int(headers["content-length"]) == len(body) and body.endswith(b"\n")
        info = json.loads(body)
        assert info["node_id"] == s.node.node_id.hex()
        assert info["ipv4"]["good"] + info["ipv6"]["good"] > 0  # what the C++ client needs to say Connected
        assert info["public_ip"] == LOOPBACK

        status, _, body = split_response(await raw_exchange(s.port, curl("GET", "/")))
        assert status.startswith("HTTP/1.1 200") and json.loads(body)["node_id"] == s.node.node_id.hex()

        status, _, body = split_response(await raw_exchange(s.port, curl("GET", "/node/stats")))
        assert status.startswith("HTTP/1.1 200")
        stats = json.loads(body)
        assert stats["nodeInfo"]["node_id"] == s.node.node_id.hex() and stats["listenCount"] == 0

        # GET, new and legacy route: chunked NDJSON holding the real node's value.
        for path in (f"/key/{key.hex()}", f"/{key.hex()}", "/key/interop-raw-routes"):
            status, headers, body = split_response(await raw_exchange(s.port, curl("GET", path)))
            assert status.startswith("HTTP/1.1 200"), path
            assert headers["transfer-encoding"] == "chunked"
            lines = dechunk(body).splitlines()
            assert [base64.b64decode(json.loads(line)["data"]) for line in lines] == [b"real-value"], path

        # POST: the value JSON with its (assigned) id, and the real node gets it.
        post_key = InfoHash.get("interop-raw-post")
        status, headers, body = split_response(
            await raw_exchange(
                s.port, curl("POST", f"/key/{post_key.hex()}", b'{"data":"aGVsbG8=","type":0}')
            )
        )
        assert status.startswith("HTTP/1.1 200")
        reply = json.loads(body)
        assert reply["data"] == "aGVsbG8=" and reply["type"] == 0 and int(reply["id"]) > 0
        got = await poll_until(lambda: s.real.get(post_key), timeout=10)
        assert [(v["id"], v["data"]) for v in got] == [(int(reply["id"]), b"hello")]

        # Options, both spellings.
        for method, path in (("OPTIONS", f"/{key.hex()}"), ("GET", f"/key/{key.hex()}/options")):
            status, headers, body = split_response(await raw_exchange(s.port, curl(method, path)))
            assert status.startswith("HTTP/1.1 200") and body == b""
            assert headers["access-control-allow-methods"] == "OPTIONS, GET, POST, LISTEN"

        # Listen: headers at once, then the existing value (the stream never ends; we hang up).
        data = await raw_exchange(s.port, curl("GET", f"/key/{key.hex()}/listen"), read_until=b"}\n")
        status, headers, body = split_response(data)
        assert status.startswith("HTTP/1.1 200") and headers["transfer-encoding"] == "chunked"
        assert b'"data":"cmVhbC12YWx1ZQ=="' in body

        # pingPush answers (without push hooks there is nobody to send the pong).
        status, _, body = split_response(
            await raw_exchange(s.port, curl("POST", "/node/pingPush", b'{"key":"token"}'))
        )
        assert status.startswith("HTTP/1.1 200") and body == b"{}\n"

        # Errors.
        status, _, body = split_response(await raw_exchange(s.port, curl("POST", f"/key/{key.hex()}", b"{")))
        assert status.startswith("HTTP/1.1 400") and json.loads(body) == {"err": "Incorrect JSON"}
        status, _, _ = split_response(await raw_exchange(s.port, curl("GET", "/node/unknown")))
        assert status.startswith("HTTP/1.1 404")


async def _put_over_the_wire(node: DhtNode, key: InfoHash, value: Value, created: int) -> None:
    """A put to ``node`` from a raw UDP client with the ``c`` (creation time) given: get a token, then put."""
    encoder = Encoder(InfoHash.random(), is_client=True)
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind((LOOPBACK, 0))
        to = (LOOPBACK, node.bound_port)

        async def ask(tid: int, datagrams: list[bytes]):
            # Resent after 1 s, as OpenDHT does: the node leaves the first get of large values from an address
            # it has not validated unanswered (anti-amplification), and answers the resend.
            with trio.fail_after(5):
                while True:
                    for datagram in datagrams:
                        await sock.sendto(datagram, to)
                    with trio.move_on_after(1):
                        while True:
                            msg = decode((await sock.recvfrom(65536))[0])
                            if msg.tid == tid and msg.kind in (Kind.REPLY, Kind.ERROR):
                                return msg

        reply = await ask(1, [encoder.request(1, "get", {"h": key})])
        assert reply.kind is Kind.REPLY and reply.token
        args = {"h": key, "c": created, "token": reply.token}
        reply = await ask(2, encoder.request_with_values(2, "put", args, [value]))
        assert reply.kind is Kind.REPLY and reply.value_id == value.id


async def test_httpx_get_post_and_listen_with_expiry() -> None:
    require_opendht()
    async with open_stack() as s, httpx.AsyncClient(base_url=s.url, trust_env=False) as http:
        info = (await http.get("/node/info")).json()
        assert info["ipv4"]["good"] > 0

        key = InfoHash.get("interop-httpx")
        assert await s.real.put(key, b"one")
        response = await http.get(f"/key/{key.hex()}")
        assert response.status_code == 200 and response.headers["content-type"] == "application/json"
        assert [base64.b64decode(json.loads(line)["data"]) for line in response.text.splitlines()] == [b"one"]

        response = await http.post(f"/key/{key.hex()}", json={"data": base64.b64encode(b"two").decode()})
        assert response.status_code == 200
        posted = response.json()
        assert posted["data"] == "dHdv" and int(posted["id"]) > 0
        got = await poll_until(lambda: s.real.get(key), timeout=10)
        assert sorted(v["data"] for v in got) == [b"one", b"two"]

        listen_key = InfoHash.get("interop-httpx-listen")
        async with http.stream(
            "GET", f"/key/{listen_key.hex()}/listen", timeout=httpx.Timeout(10, read=None)
        ) as r:
            assert r.status_code == 200
            lines = r.aiter_lines()
            # A new value from the real node, through the DHT, within 1 s of its put.
            put_at = trio.current_time()
            assert await s.real.put(listen_key, b"fresh")
            with trio.fail_at(put_at + 1.0):
                line = json.loads(await lines.__anext__())
            assert base64.b64decode(line["data"]) == b"fresh" and "expired" not in line

            # A type-5 value (60 s of life) created 52 s ago: shown at once, expired about 8 s later.
            short = Value(data=b"ice", type=5, id=103)
            await _put_over_the_wire(s.node, listen_key, short, created=int(time.time()) - 52)
            with trio.fail_after(1.0):
                line = json.loads(await lines.__anext__())
            assert line == {"data": "aWNl", "id": "103", "type": 5}
            with trio.fail_after(12):
                line = json.loads(await lines.__anext__())
            assert line == {"data": "aWNl", "expired": True, "id": "103", "type": 5}
