"""The proxy on a real hypercorn on 127.0.0.1: connection handling, streaming, listen, TLS, shutdown."""

from __future__ import annotations

import json
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from proxy_layers import serve_with_asgi, serve_with_quart

from trio_dht.infohash import InfoHash
from trio_dht.limits import Limits
from trio_dht.proxy import ProxyConfig, serve_proxy
from trio_dht.rest.value_json import value_line
from trio_dht.testing.memory_dht import MemoryDht
from trio_dht.value import Value

BOUND = 5.0
"""Safety bound on every wait (not a timing assertion)."""


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.fixture
async def dht(nursery: trio.Nursery) -> MemoryDht:
    dht = MemoryDht(lifetime=lambda value: 0.5 if value.type == 5 else 600.0)
    await nursery.start(dht.run)  # expiries for callback listens (the proxy's listen streams)
    return dht


@pytest.fixture(params=["fast", "asgi", "quart"])
async def base_url(
    request: pytest.FixtureRequest, nursery: trio.Nursery, dht: MemoryDht, monkeypatch: pytest.MonkeyPatch
) -> str:
    if request.param == "asgi":
        serve_with_asgi(monkeypatch)
    elif request.param == "quart":
        serve_with_quart(monkeypatch)
    config = ProxyConfig(host="127.0.0.1", port=0)
    urls = await nursery.start(serve_proxy, dht, config)
    return urls[0]


async def raw_request(port: int, request: bytes) -> bytes:
    """Send ``request`` and read until the server closes (bounded by 1 s)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(1):
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data


@pytest.mark.parametrize("path", ["/node/stats", "/node/info", "/key/hello", "/nope/x"])
async def test_connection_close_gets_eof(base_url: str, path: str) -> None:
    data = await raw_request(
        port_of(base_url), f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    assert data.startswith(b"HTTP/1.1 ")


@pytest.mark.parametrize("layer", [serve_with_asgi, serve_with_quart], ids=["asgi", "quart"])
async def test_a_connection_that_got_a_value_stream_still_idles_out(
    layer, nursery: trio.Nursery, dht: MemoryDht, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end of a streamed GET through hypercorn (TLS and handed-over connections) leaves the connection to
    its deadlines: closed at once with ``Connection: close``, else once idle past the keep-alive timeout
    (here the 1 s head timeout, which bounds it)."""
    layer(monkeypatch)
    urls = await nursery.start(
        serve_proxy, dht, ProxyConfig(host="127.0.0.1", port=0, limits=Limits(http_head_timeout=1.0))
    )
    await dht.put(InfoHash.get("hello"), Value(data=b"v", id=1))
    for extra, bound in ((b"Connection: close\r\n", 1.0), (b"", 3.0)):
        stream = await trio.open_tcp_stream("127.0.0.1", port_of(urls[0]))
        async with stream:
            await stream.send_all(b"GET /key/hello HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n")
            data = b""
            with trio.fail_after(bound):
                while chunk := await stream.receive_some(65536):
                    data += chunk
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"0\r\n\r\n")


async def test_http10_gets_eof(base_url: str) -> None:
    data = await raw_request(port_of(base_url), b"GET /node/stats HTTP/1.0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200")


async def test_headers_on_the_wire(base_url: str) -> None:
    data = await raw_request(
        port_of(base_url), b"GET /key/hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    assert b"\r\ntransfer-encoding: chunked" in head
    assert b"\r\ncontent-type: application/json" in head
    assert b"\r\naccess-control-allow-origin: *" in head
    assert b"\r\nserver: trio-dht" in head and b"hypercorn" not in head


async def test_get_streams_values(base_url: str, dht: MemoryDht) -> None:
    async with httpx.AsyncClient(base_url=base_url) as c:
        for i in range(3):
            r = await c.post("/key/hello", json={"data": "eA==", "id": i + 1})
            assert r.status_code == 200
        big = Value(data=b"z" * 40_000, id=99)  # one 53 KB line
        assert (await c.post("/key/big", content=value_line(big))).status_code == 200
        r = await c.get("/key/hello")
        assert sorted(json.loads(line)["id"] for line in r.text.splitlines()) == ["1", "2", "3"]
        r = await c.get("/key/big")
        assert r.content == value_line(big)


async def read_line(lines: AsyncIterator[str]) -> dict:
    with trio.fail_after(BOUND):
        return json.loads(await lines.__anext__())


async def test_listen_stream(base_url: str, dht: MemoryDht) -> None:
    key = InfoHash.get("chan")
    await dht.put(key, Value(data=b"init", id=1))
    async with httpx.AsyncClient(base_url=base_url, timeout=None) as c:
        async with c.stream("GET", "/key/chan/listen") as r:
            assert r.status_code == 200 and r.headers["content-type"] == "application/json"
            lines = r.aiter_lines()
            assert await read_line(lines) == {"data": "aW5pdA==", "id": "1", "type": 0}
            assert (await c.post("/key/chan", json={"data": "bmV3", "id": 2})).status_code == 200
            assert await read_line(lines) == {"data": "bmV3", "id": "2", "type": 0}
            assert (await c.get("/node/stats")).json()["listenCount"] == 1
            await dht.put(key, Value(data=b"exp", id=900, type=5))  # lives 0.5 s here
            assert await read_line(lines) == {"data": "ZXhw", "id": "900", "type": 5}
            assert await read_line(lines) == {"data": "ZXhw", "expired": True, "id": "900", "type": 5}
            assert dht.listener_count(key) == 1
        # the client went away: the backend listen is cancelled
        with trio.fail_after(BOUND):
            while dht.listener_count(key):
                await trio.sleep(0.01)
        assert (await c.get("/node/stats")).json()["listenCount"] == 0


@pytest.mark.parametrize("layer", [None, serve_with_asgi], ids=["fast", "asgi"])
async def test_a_listen_stream_is_counted_once_its_head_is_sent(
    layer, nursery: trio.Nursery, dht: MemoryDht, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The front end and the raw-ASGI path (the layers that serve routes) count a listen stream in
    ``/metrics`` as it starts, not when it ends (hours later)."""
    if layer is not None:
        layer(monkeypatch)
    urls = await nursery.start(serve_proxy, dht, ProxyConfig(host="127.0.0.1", port=0))
    base_url = urls[0]

    def listens_counted(text: str) -> float:
        families = text_string_to_metric_families(text)
        requests = next(f for f in families if f.name == "trio_dht_http_requests")
        return sum(s.value for s in requests.samples if s.labels.get("route") == "listen")

    async with httpx.AsyncClient(base_url=base_url, timeout=None) as c:
        assert listens_counted((await c.get("/metrics")).text) == 0
        async with c.stream("GET", "/key/counted/listen") as r:
            assert r.status_code == 200
            with trio.fail_after(BOUND):
                while listens_counted((await c.get("/metrics")).text) != 1:
                    await trio.sleep(0.01)
        await trio.sleep(0.1)  # the stream's end is not counted again
        assert listens_counted((await c.get("/metrics")).text) == 1


async def test_legacy_listen_method(base_url: str, dht: MemoryDht) -> None:
    await dht.put(InfoHash.get("old"), Value(data=b"x", id=3))
    async with httpx.AsyncClient(base_url=base_url, timeout=None) as c, c.stream("LISTEN", "/old") as r:
        assert r.status_code == 200
        assert (await read_line(r.aiter_lines()))["id"] == "3"


async def test_shutdown_ends_listen_streams_cleanly(dht: MemoryDht) -> None:
    config = ProxyConfig(host="127.0.0.1", port=0, graceful_timeout=1.0)
    got: list[str] = []
    async with trio.open_nursery() as nursery:
        server_scope = trio.CancelScope()

        async def run_server(task_status: trio.TaskStatus[list[str]]) -> None:
            with server_scope:
                await serve_proxy(dht, config, task_status=task_status)

        (url,) = await nursery.start(run_server)
        await dht.put(InfoHash.get("s"), Value(data=b"x", id=1))
        async with (
            httpx.AsyncClient(base_url=url, timeout=None) as c,
            c.stream("GET", "/key/s/listen") as r,
        ):
            lines = r.aiter_lines()
            got.append(await lines.__anext__())
            server_scope.cancel()
            with trio.fail_after(BOUND):
                async for line in lines:  # ends without a protocol error: the last chunk was sent
                    got.append(line)
    assert len(got) == 1 and dht.listener_count() == 0


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        pytest.skip("openssl is not available")
    return cert, key


async def test_tls_beside_plain(
    nursery: trio.Nursery, dht: MemoryDht, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    config = ProxyConfig(host="127.0.0.1", port=0, tls_port=0, certificate=str(cert), private_key=str(key))
    urls = await nursery.start(serve_proxy, dht, config)
    https = next(u for u in urls if u.startswith("https://"))
    http = next(u for u in urls if u.startswith("http://"))
    context = ssl.create_default_context(cafile=str(cert))
    async with httpx.AsyncClient(verify=context) as c:
        r = await c.get(https + "/node/info")
        assert r.status_code == 200 and r.json()["node_id"] == dht.node_id.hex()
        assert (await c.get(http + "/node/info")).status_code == 200
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    async with httpx.AsyncClient(verify=context) as c:
        with pytest.raises(httpx.ConnectError):
            await c.get(https + "/node/info")  # TLS 1.3 only, as OpenDHT


async def test_tls_offers_http1_only(
    nursery: trio.Nursery, dht: MemoryDht, certificate: tuple[Path, Path]
) -> None:
    """ALPN selects http/1.1, never h2 (an HTTP/2 response would wait on the client's window, no deadline)."""
    cert, key = certificate
    config = ProxyConfig(host="127.0.0.1", port=0, tls_port=0, certificate=str(cert), private_key=str(key))
    urls = await nursery.start(serve_proxy, dht, config)
    port = int(next(u for u in urls if u.startswith("https://")).rsplit(":", 1)[1])
    for offer, chosen in ((["h2"], None), (["h2", "http/1.1"], "http/1.1")):
        context = ssl.create_default_context(cafile=str(cert))
        context.set_alpn_protocols(offer)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, context, server_hostname="127.0.0.1")
        with trio.fail_after(BOUND):
            await stream.do_handshake()
            assert stream.selected_alpn_protocol() == chosen
            await stream.send_all(b"GET /node/info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200")
        await stream.aclose()
