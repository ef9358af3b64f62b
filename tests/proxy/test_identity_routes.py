"""The sign and encrypt routes (``POST /key/{hash}/sign``, ``/encrypt``, the old ``SIGN``/``ENCRYPT``
``/{hash}``): served only when the DHT has an identity, on every HTTP layer (the front end, raw ASGI, Quart),
from the one route table; without an identity they are what any unknown path is."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import httpx
import pytest
import trio
from proxy_layers import serve_with_asgi, serve_with_quart

from trio_dht import signature
from trio_dht.crypto import Identity
from trio_dht.infohash import InfoHash
from trio_dht.node import open_node
from trio_dht.node.storage import CERTIFICATE_TYPE
from trio_dht.proxy import ProxyConfig, create_app, serve_proxy
from trio_dht.proxy.replies import IDENTITY_OPTIONS_HEADERS, OPTIONS_HEADERS
from trio_dht.proxy.routes import recipient_id
from trio_dht.rest.paths import Route, match, served_routes
from trio_dht.testing.memory_dht import MemoryDht
from trio_dht.value import Value

HELLO = InfoHash.get("hello")
BODY = {"data": "aGVsbG8=", "type": 0}
LOCAL = "127.0.0.1"


async def serve(nursery: trio.Nursery, dht: object, layer: str, monkeypatch: pytest.MonkeyPatch) -> str:
    if layer == "asgi":
        serve_with_asgi(monkeypatch)
    elif layer == "quart":
        serve_with_quart(monkeypatch)
    urls = await nursery.start(serve_proxy, dht, ProxyConfig(host=LOCAL, port=0, max_body=4096))
    return urls[0]


@pytest.fixture
async def signing_dht(identity: Identity, other: Identity) -> MemoryDht:
    dht = MemoryDht(identity=identity)
    await dht.put(InfoHash(other.id), Value(other.certificate.pem, type=CERTIFICATE_TYPE))
    return dht


@pytest.fixture(params=["fast", "asgi", "quart"])
async def signing_proxy(
    request: pytest.FixtureRequest,
    nursery: trio.Nursery,
    signing_dht: MemoryDht,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[httpx.AsyncClient]:
    base_url = await serve(nursery, signing_dht, request.param, monkeypatch)
    async with httpx.AsyncClient(base_url=base_url) as client:
        yield client


@pytest.fixture(params=["fast", "asgi", "quart"])
async def plain_proxy(
    request: pytest.FixtureRequest, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    base_url = await serve(nursery, MemoryDht(), request.param, monkeypatch)
    async with httpx.AsyncClient(base_url=base_url) as client:
        yield client


# -- the route table -----------------------------------------------------------------------------------------


def test_match_sign_and_encrypt() -> None:
    hex_key = HELLO.hex().encode()
    for target in (b"/key/hello/sign", b"/KEY/hello/Sign/", b"/key/" + hex_key + b"/sign?x=1"):
        assert match("POST", target) == (Route.SIGN, HELLO)
        assert match("POST", target, served_routes(identity=False)) is None
        assert match("GET", target) is None
    assert match("POST", b"/key/hello/encrypt") == (Route.ENCRYPT, HELLO)
    assert match("POST", b"/key/hello/encrypt", served_routes(push=False)) == (Route.ENCRYPT, HELLO)
    assert match("SIGN", b"/" + hex_key) == (Route.SIGN, HELLO)
    assert match("ENCRYPT", b"/hello") == (Route.ENCRYPT, HELLO)
    assert match("SIGN", b"/" + hex_key, served_routes(identity=False)) is None
    assert match("ENCRYPT", b"/hello", served_routes(push=False, identity=False)) is None
    assert match("POST", b"/" + hex_key + b"/sign") is None  # removed from OpenDHT in 2019
    assert match("SIGN", b"/key/hello") is None
    assert match("POST", b"/key/hello", served_routes(identity=False)) == (Route.PUT, HELLO)  # the rest stay
    assert Route.SIGN.needs_identity and not Route.PUT.needs_identity and not Route.SIGN.needs_push


@pytest.mark.parametrize(
    ("to", "expected"),
    [
        ("ab" * 20, bytes.fromhex("ab" * 20)),
        ("AB" * 20, bytes.fromhex("ab" * 20)),
        ("cd" * 32, bytes.fromhex("cd" * 32)),
        ("00" * 20, None),  # OpenDHT: a zero InfoHash is no destination
        ("ab" * 19, None),
        ("ab" * 21, None),
        ("ab" * 19 + "a ", None),
        ("ab" * 19 + "zz", None),
        ("ab " * 13 + "a", None),
        (None, None),
        (12, None),
        (["ab" * 20], None),
    ],
)
def test_recipient_id(to: object, expected: bytes | None) -> None:
    assert recipient_id(to) == expected


# -- with an identity, on every layer ------------------------------------------------------------------------


async def test_sign(signing_proxy: httpx.AsyncClient, signing_dht: MemoryDht, identity: Identity) -> None:
    r = await signing_proxy.post("/key/hello/sign", json=BODY)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    vid = int(doc.pop("id"))
    assert vid > 0 and doc == BODY
    (stored,) = signing_dht.values(HELLO)
    assert stored.id == vid and stored.data == b"hello" and stored.owner == identity.public_key.der
    assert signature.verify(stored)
    again = await signing_proxy.request("SIGN", f"/{HELLO.hex()}", json={**BODY, "id": str(vid)})
    assert again.status_code == 200 and again.json()["id"] == str(vid)
    (stored,) = signing_dht.values(HELLO)
    assert stored.seq == 1 and signature.verify(stored)  # the new version replaces the first


async def test_the_owner_signature_seq_and_recipient_are_the_nodes_to_set(
    signing_proxy: httpx.AsyncClient, signing_dht: MemoryDht, identity: Identity, other: Identity
) -> None:
    """A client's own owner, sig, seq and to are neither put nor echoed as if they had been."""
    theirs = {"owner": other.public_key.pem.decode(), "sig": "AAAA", "seq": 9}
    r = await signing_proxy.post("/key/hello/sign", json={**BODY, **theirs, "to": other.id.hex(), "id": "5"})
    assert r.status_code == 200 and r.json() == {**BODY, "id": "5"}
    (stored,) = signing_dht.values(HELLO)
    assert (stored.owner, stored.seq, stored.recipient) == (identity.public_key.der, 0, None)
    assert signature.verify(stored)
    long_to = other.public_key.long_id.hex()  # a long id as "to" is the recipient, not the value's field
    r = await signing_proxy.post("/key/k/encrypt", json={**BODY, **theirs, "to": long_to})
    assert r.status_code == 200


async def test_a_value_that_cannot_be_signed_is_400(
    signing_proxy: httpx.AsyncClient, signing_dht: MemoryDht, identity: Identity
) -> None:
    key = InfoHash.get("seq")
    await signing_dht.put(key, identity.sign_value(Value(b"last", id=7, seq=65535)))
    r = await signing_proxy.post("/key/seq/sign", json={**BODY, "id": "7"})  # its seq would be 65536
    assert r.status_code == 400 and "seq" in r.json()["err"]


async def test_a_put_that_outlasts_its_deadline_is_502(
    nursery: trio.Nursery, identity: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trio_dht.proxy import routes

    monkeypatch.setattr(routes, "PUT_DEADLINE", 0.2)
    dht = MemoryDht(identity=identity)

    async def stuck(*args: object, **kwargs: object) -> bool:
        await trio.sleep_forever()
        return True

    monkeypatch.setattr(dht, "put_signed", stuck)
    base_url = await serve(nursery, dht, "fast", monkeypatch)
    async with httpx.AsyncClient(base_url=base_url) as client:
        with trio.fail_after(5):
            r = await client.post("/key/k/sign", json=BODY)
    assert r.status_code == 502 and r.json() == {"err": "Put failed"}


@pytest.mark.parametrize("long", [False, True], ids=["key id", "long id"])
async def test_encrypt(
    signing_proxy: httpx.AsyncClient,
    signing_dht: MemoryDht,
    identity: Identity,
    other: Identity,
    long: bool,
) -> None:
    to = other.public_key.long_id if long else other.id
    r = await signing_proxy.post("/key/hello/encrypt", json={**BODY, "id": "77", "to": to.hex()})
    assert r.status_code == 200 and r.json() == {**BODY, "id": "77"}
    (stored,) = signing_dht.values(HELLO)
    assert stored.id == 77 and stored.cypher and not stored.data and stored.owner is None
    inner = other.decrypt_value(stored, signature.verify)
    assert inner.data == b"hello" and inner.owner == identity.public_key.der
    assert inner.recipient == other.id
    r = await signing_proxy.request("ENCRYPT", "/hello", json={**BODY, "to": to.hex()})
    assert r.status_code == 200 and len(signing_dht.values(HELLO)) == 2


@pytest.mark.parametrize(
    ("path", "body", "status", "err"),
    [
        ("/key/k/sign", b"", 400, "Missing parameters"),
        ("/key/k/encrypt", b" ", 400, "Missing parameters"),
        ("/key/k/sign", b"{", 400, "Incorrect JSON"),
        ("/key/k/encrypt", b"\xff", 400, "Incorrect JSON"),
        ("/key/k/sign", b"[]", 400, "Invalid value: a value is a JSON object"),
        ("/key/k/sign", b'{"data":"!!!"}', 400, "Invalid value: data is not valid base64"),
        (
            "/key/k/encrypt",
            b'{"cypher":"eA==","to":"' + b"ab" * 20 + b'"}',
            400,
            "Invalid value: it is encrypted already",
        ),
        ("/key/k/encrypt", b'{"data":"eA=="}', 400, "No destination found"),
        ("/key/k/encrypt", b'{"data":"eA==","to":"nope"}', 400, "No destination found"),
        ("/key/k/encrypt", b'{"data":"eA==","to":"' + b"0" * 40 + b'"}', 400, "No destination found"),
        ("/key/k/encrypt", b'{"data":"eA==","to":"' + b"ab" * 20 + b'"}', 502, "Put failed"),  # no such key
        ("/key/k/sign", b'{"data":"' + b"A" * 8000 + b'"}', 413, None),
    ],
)
async def test_refusals(
    signing_proxy: httpx.AsyncClient, path: str, body: bytes, status: int, err: str | None
) -> None:
    r = await signing_proxy.post(path, content=body)
    assert r.status_code == status
    if err is not None:
        assert r.json() == {"err": err}


async def test_permanent_is_ignored_as_opendht_does(
    nursery: trio.Nursery, signing_dht: MemoryDht, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url = await serve(nursery, signing_dht, "fast", monkeypatch)
    async with httpx.AsyncClient(base_url=base_url) as client:
        r = await client.post("/key/k/sign", content=b'{"data":"eA==","permanent":true}')
        assert r.status_code == 200
        stats = (await client.get("/node/stats")).json()
    assert (stats["totalPermanentPuts"], stats["permanentPuts"]["bytes"]) == (0, 0)  # nothing held


async def test_a_failed_put_is_502(
    nursery: trio.Nursery, identity: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url = await serve(nursery, MemoryDht(identity=identity, fail_puts=True), "fast", monkeypatch)
    async with httpx.AsyncClient(base_url=base_url) as client:
        r = await client.post("/key/k/sign", json=BODY)
        assert r.status_code == 502 and r.json() == {"err": "Put failed"}
        r = await client.post("/key/k/encrypt", json={**BODY, "to": identity.id.hex()})
        assert r.status_code == 502 and r.json() == {"err": "Put failed"}


async def test_options_list_sign_and_encrypt(
    signing_proxy: httpx.AsyncClient, plain_proxy: httpx.AsyncClient
) -> None:
    for client, headers in ((signing_proxy, IDENTITY_OPTIONS_HEADERS), (plain_proxy, OPTIONS_HEADERS)):
        for method, path in (("OPTIONS", "/hello"), ("GET", "/key/hello/options")):
            r = await client.request(method, path)
            assert r.status_code == 200
            for name, value in headers:
                assert r.headers[name] == value
    r = await signing_proxy.options("/hello")
    assert r.headers["access-control-allow-methods"] == "OPTIONS, GET, POST, LISTEN, SIGN, ENCRYPT"


async def test_counted_in_the_request_rate(identity: Identity) -> None:
    app = create_app(MemoryDht(identity=identity))
    transport = httpx.ASGITransport(app=app, client=(LOCAL, 4321))
    async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
        await client.post("/key/k/sign", json=BODY)
        await client.post("/key/k/encrypt", json={**BODY, "to": identity.id.hex()})
        await client.post("/key/k/encrypt", json=BODY)  # no destination: counted, as OpenDHT counts it
        await client.post("/key/k/sign", content=b"{")  # not counted, as a put with bad JSON
    assert app.state.requests == 3


# -- without an identity: no such route ----------------------------------------------------------------------


async def test_without_identity_the_routes_do_not_exist(plain_proxy: httpx.AsyncClient) -> None:
    for path in ("/key/hello/sign", "/key/hello/encrypt", "/key/hello/SIGN/"):
        r = await plain_proxy.post(path, json={**BODY, "to": "ab" * 20})
        unknown = await plain_proxy.post("/key/hello/nosuch", json={**BODY, "to": "ab" * 20})
        assert (
            (r.status_code, r.content)
            == (unknown.status_code, unknown.content)
            == (404, b'{"err":"Not Found"}\n')
        )
    for method in ("SIGN", "ENCRYPT"):
        r = await plain_proxy.request(method, "/hello", json=BODY)
        unknown = await plain_proxy.request("FOO", "/hello", json=BODY)
        assert (r.status_code, r.content) == (unknown.status_code, unknown.content)
        assert r.status_code == 405 and "SIGN" not in r.headers["allow"]
    r = await plain_proxy.post("/key/hello", json=BODY)
    assert r.status_code == 200


# -- a real node with an identity behind the proxy -----------------------------------------------------------


async def test_a_node_with_an_identity_behind_the_proxy(nursery: trio.Nursery, identity: Identity) -> None:
    async with AsyncExitStack() as stack:
        plain = await stack.enter_async_context(open_node(port=0, host=LOCAL, host6=None))
        node = await stack.enter_async_context(
            open_node(
                port=0, host=LOCAL, host6=None, identity=identity, bootstrap=[(LOCAL, plain.bound_port)]
            )
        )
        with trio.fail_after(10):
            while not (plain.is_connected() and node.is_connected()):
                await trio.sleep(0.02)
        (base_url,) = await nursery.start(serve_proxy, node, ProxyConfig(host=LOCAL, port=0))
        async with httpx.AsyncClient(base_url=base_url, timeout=20) as client:
            r = await client.post("/key/signed/sign", json=BODY)
            assert r.status_code == 200
            vid = int(r.json()["id"])
            (found,) = await plain.get(InfoHash.get("signed"))
            assert found.id == vid and found.owner == identity.public_key.der and signature.verify(found)

            to = identity.public_key.long_id.hex()  # to ourselves: our own key needs no look-up
            r = await client.post("/key/sealed/encrypt", json={**BODY, "to": to})
            assert r.status_code == 200
            (found,) = await plain.get(InfoHash.get("sealed"))
            assert found.id == int(r.json()["id"]) and found.cypher and not found.data
            lines = (await client.get("/key/sealed")).content.splitlines()
            assert [json.loads(line)["data"] for line in lines] == [BODY["data"]]  # decrypted by the node

            r = await client.post("/key/sealed/encrypt", json={**BODY, "to": "ab" * 20})
            assert r.status_code == 502 and r.json() == {"err": "Put failed"}  # no certificate of that key
