"""The proxy app at the ASGI level (httpx.ASGITransport): every non-streaming route, headers, errors,
fuzzing. Most tests run twice: through :class:`ProxyApp` (the raw-ASGI path of the route table, ``fast``) and
through its Quart app alone (the same routes as Quart views, ``quart``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quart import Blueprint

from trio_dht.infohash import InfoHash
from trio_dht.proxy import ProxyConfig, RateLimit, create_app
from trio_dht.proxy.asgi import ProxyApp, proxy_state, to_response
from trio_dht.proxy.permanent import PermanentPut
from trio_dht.proxy.replies import OPTIONS_HEADERS, Reply
from trio_dht.rest.paths import canonical_path
from trio_dht.rest.value_json import PushTarget
from trio_dht.testing.memory_dht import MemoryDht
from trio_dht.value import Value

HELLO = InfoHash.get("hello")


class QuartOnly:
    """A proxy app whose requests all go to its Quart app (paths canonicalised, as :class:`ProxyApp` does)."""

    def __init__(self, app: ProxyApp) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            canonical = canonical_path(scope.get("raw_path") or scope["path"].encode())
            if canonical is not None:
                scope = {**scope, "path": canonical[0], "raw_path": canonical[0].encode()}
        await self.app.quart(scope, receive, send)


def served(app: ProxyApp, fast: bool) -> Any:
    """``app`` itself (``fast``), or the same app with every request served by Quart."""
    return app if fast else QuartOnly(app)


def client_for(app: Any, host: str = "127.0.0.1") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=(host, 4321)), base_url="http://proxy"
    )


@pytest.fixture
def dht() -> MemoryDht:
    return MemoryDht()


@pytest.fixture(params=[True, False], ids=["fast", "quart"])
async def client(request: pytest.FixtureRequest, dht: MemoryDht) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(dht, ProxyConfig(max_body=4096))
    async with client_for(served(app, request.param)) as c:
        yield c


def assert_base_headers(r: httpx.Response) -> None:
    assert r.headers["content-type"] == "application/json"
    assert r.headers["access-control-allow-origin"] == "*"
    assert r.headers["server"] == "trio-dht"


@pytest.mark.parametrize("path", ["/", "/node/info", "/NODE/INFO/"])
async def test_node_info(client: httpx.AsyncClient, dht: MemoryDht, path: str) -> None:
    r = await client.get(path)
    assert r.status_code == 200 and r.content.endswith(b"}\n")
    assert_base_headers(r)
    assert int(r.headers["content-length"]) == len(r.content)
    doc = r.json()
    assert doc["node_id"] == dht.node_id.hex()
    assert doc["ipv4"] == {"good": 8, "dubious": 0, "incoming": 0}
    assert doc["ipv4"]["good"] + doc["ipv6"]["good"] > 0  # C++ clients need this to be Connected
    assert doc["public_ip"] == "127.0.0.1"
    assert {"storage_size", "storage_values"} <= doc.keys()
    assert list(doc) == sorted(doc)


async def test_node_info_not_ready() -> None:
    class Broken(MemoryDht):
        def info(self) -> Any:
            raise RuntimeError("not running")

    async with client_for(create_app(Broken())) as c:
        r = await c.get("/node/info")
    assert r.status_code == 503 and r.json() == {"err": "Incorrect DhtRunner"}


async def test_node_stats(client: httpx.AsyncClient, dht: MemoryDht) -> None:
    await client.post("/key/a", content=b'{"data":"eA==","permanent":true}')
    r = await client.get("/node/stats")
    assert r.status_code == 200
    assert_base_headers(r)
    doc = r.json()
    assert doc["putCount"] == 1 and doc["totalPermanentPuts"] == 1 and doc["listenCount"] == 0
    assert doc["pushListenersCount"] == 0 and doc["nodeInfo"]["node_id"] == dht.node_id.hex()
    assert {"serverStartTime", "lastUpdated", "requestRate"} <= doc.keys()


async def test_put_then_get(client: httpx.AsyncClient, dht: MemoryDht) -> None:
    r = await client.post("/key/hello", content=b'{"data":"aGVsbG8=","id":"12345","type":0}')
    assert r.status_code == 200 and r.content == b'{"data":"aGVsbG8=","id":"12345","type":0}\n'
    assert_base_headers(r)
    r = await client.post("/hello", content=b'{"data":"d29ybGQ="}')  # legacy route, no id
    assert r.status_code == 200
    vid = r.json()["id"]
    assert isinstance(vid, str) and int(vid) > 0
    assert {v.id for v in dht.values(HELLO)} == {12345, int(vid)}
    for path in ("/key/hello", f"/key/{HELLO.hex()}", f"/{HELLO.hex().upper()}", "/key/hello/?x=1"):
        r = await client.get(path)
        assert r.status_code == 200 and "content-length" not in r.headers
        assert_base_headers(r)
        lines = r.content.splitlines()
        assert sorted(json.loads(line)["id"] for line in lines) == sorted(["12345", vid])


async def test_get_empty_key(client: httpx.AsyncClient) -> None:
    r = await client.get("/key/nothing-here")
    assert r.status_code == 200 and r.content == b""


async def test_put_fields_carried_through(client: httpx.AsyncClient, dht: MemoryDht) -> None:
    body = {"data": "eA==", "id": 42, "type": 7, "prio": 1, "utype": "text/plain", "pt": "audioCall"}
    r = await client.post("/key/k", json=body)
    assert r.json() == {**body, "id": "42"}
    (stored,) = dht.values(InfoHash.get("k"))
    assert (stored.type, stored.prio, stored.utype, stored.push_type) == (7, 1, "text/plain", "audioCall")


async def test_put_failed_is_502() -> None:
    async with client_for(create_app(MemoryDht(fail_puts=True))) as c:
        r = await c.post("/key/k", content=b'{"data":"eA=="}')
    assert r.status_code == 502 and r.json() == {"err": "Put failed"}
    assert_base_headers(r)


async def test_permanent_put_merges_id_less_repeats(client: httpx.AsyncClient, dht: MemoryDht) -> None:
    body = {"data": "cGVybTI=", "permanent": {"key": "ptok", "platform": "android", "client_id": "cp"}}
    first = (await client.post("/key/p", json=body)).json()["id"]
    second = (await client.post("/key/p", json=body)).json()["id"]
    assert first == second
    assert len(dht.values(InfoHash.get("p"))) == 1


@pytest.mark.parametrize("path", ["/hello", "/key/hello/listen", "/key/hello/options"])
async def test_options(client: httpx.AsyncClient, path: str) -> None:
    method = "GET" if path.endswith("/options") else "OPTIONS"
    r = await client.request(method, path)
    assert r.status_code == 200 and r.content == b""
    assert_base_headers(r)
    for name, value in OPTIONS_HEADERS:
        assert r.headers[name] == value


async def test_ping_push(client: httpx.AsyncClient) -> None:
    r = await client.post("/node/pingPush", json={"key": "tok", "client_id": "c"})
    assert r.status_code == 200 and r.content == b"{}\n"
    assert (await client.post("/node/pingPush", json={"client_id": "c"})).json() == {"err": "No token"}
    assert (await client.post("/node/pingPush", content=b"{")).status_code == 400


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "err"),
    [
        ("POST", "/key/k", b"", 400, "Missing parameters"),
        ("POST", "/key/k", b"{", 400, "Incorrect JSON"),
        ("POST", "/key/k", b"\xff\xfe", 400, "Incorrect JSON"),
        ("POST", "/key/k", b"[" * 100_0 + b"]" * 100_0, 400, None),
        ("POST", "/key/k", b"[]", 400, None),
        ("POST", "/key/k", b'"x"', 400, None),
        ("POST", "/key/k", b'{"data":"!!!"}', 400, None),
        ("POST", "/key/k", b'{"type":"x"}', 400, None),
        ("POST", "/key/k", b"x" * 5000, 413, None),
        ("GET", "/node/unknown", None, 404, "Not Found"),
        ("GET", "/key/h/unknown", None, 404, "Not Found"),
        ("GET", "/a/b/c/d", None, 404, "Not Found"),
        ("POST", "/node//pingPush", b"{}", 404, "Not Found"),  # no slash-merging redirect
        ("GET", "/key//listen", None, 404, "Not Found"),
        ("PUT", "/key/k", None, 405, "Method Not Allowed"),
        ("DELETE", "/key/k", None, 405, "Method Not Allowed"),
        ("HEAD", "/key/k", None, 405, None),
        ("OPTIONS", "/key/k", None, 405, None),  # as OpenDHT: no OPTIONS on /key/{hash}
        ("POST", "/key/k/listen", b"{}", 405, None),
        ("SUBSCRIBE", "/key/k", b"{}", 405, None),  # the push package adds it
        ("FOO", "/", None, 405, None),
    ],
)
async def test_bad_requests(
    client: httpx.AsyncClient, method: str, path: str, body: bytes | None, status: int, err: str | None
) -> None:
    r = await client.request(method, path, content=body)
    assert r.status_code == status
    assert_base_headers(r)
    if method != "HEAD":
        doc = r.json()
        assert isinstance(doc["err"], str)
        if err is not None:
            assert doc["err"] == err
    if status == 405 and method != "HEAD":
        assert "allow" in r.headers


async def test_chunked_body_over_the_cap_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 1000

    r = await client.post("/key/k", content=chunks())
    assert r.status_code == 413


async def test_rate_limit() -> None:
    app = create_app(MemoryDht(), ProxyConfig(rate_limit=RateLimit(per_second=0.001, burst=2)))
    async with client_for(app, host="192.0.2.7") as c:
        statuses = [(await c.get("/node/info")).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    async with client_for(app, host="127.0.0.1") as c:  # loopback is not limited by default
        assert all([(await c.get("/")).status_code == 200 for _ in range(5)])


async def test_extra_blueprint_and_push_hooks() -> None:
    from trio_dht.push.service import PushReply

    bp = Blueprint("extra", __name__)
    seen: list[Any] = []

    @bp.route("/key/<hash:key>", methods=["PATCH"])
    async def patch(key: InfoHash) -> Any:
        proxy_state().count_request()
        seen.append(key)
        return to_response(Reply(200, b"{}\n"))

    class Hooks:
        def subscribe(self, key: InfoHash, body: bytes, source: str = "") -> PushReply:
            seen.append(("subscribe", key, body))
            return PushReply(200, b"{}\n")

        def unsubscribe(self, key: InfoHash, body: bytes) -> PushReply:
            return PushReply(200)

        async def ping(self, target: PushTarget) -> None:
            seen.append(target)

        def permanent_put_due(self, held: PermanentPut) -> None:
            seen.append(held)

        def stats(self) -> dict[str, Any]:
            return {"pushListenersCount": 3}

    app = create_app(MemoryDht(), blueprints=[bp], push=Hooks())
    async with client_for(app) as c:
        r = await c.request("PATCH", "/KEY/hello/", content=b"x")
        assert r.status_code == 200 and r.content == b"{}\n"
        assert_base_headers(r)
        r = await c.request("SUBSCRIBE", "/KEY/hello/", content=b'{"key":"t"}')
        assert r.status_code == 200 and r.content == b"{}\n"
        assert_base_headers(r)
        assert (await c.post("/node/pingPush", json={"key": "t", "platform": "ios"})).status_code == 200
        assert (await c.get("/node/stats")).json()["pushListenersCount"] == 3
    assert seen == [HELLO, ("subscribe", HELLO, b'{"key":"t"}'), PushTarget("t", platform="ios")]


# -- fuzzing -------------------------------------------------------------------------------------------------

METHODS = [
    "GET",
    "POST",
    "PUT",
    "DELETE",
    "PATCH",
    "OPTIONS",
    "HEAD",
    "LISTEN",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "FOO",
]
SEGMENTS = st.sampled_from(
    [
        "key",
        "KEY",
        "node",
        "info",
        "stats",
        "pingPush",
        "listen",
        "options",
        "hello",
        "",
        "%7E",
        "%2F",
        "%zz",
        "0" * 40,
        "a" * 41,
        "\u00e9",
    ]
) | st.text(max_size=12)
PATHS = st.lists(SEGMENTS, max_size=4).map(lambda segs: "/" + "/".join(segs)) | st.just("/")
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "data": st.text(max_size=12) | st.integers(),
        "id": st.integers() | st.text(max_size=22),
        "type": st.integers() | st.text(max_size=3),
        "owner": st.text(max_size=30),
        "seq": st.integers(),
        "sig": st.text(max_size=8),
        "to": st.text(max_size=42),
        "cypher": st.text(max_size=8),
        "utype": JSON_VALUES,
        "prio": JSON_VALUES,
        "pt": JSON_VALUES,
        "permanent": JSON_VALUES,
        "key": JSON_VALUES,
    },
)
BODIES = (
    st.none()
    | st.binary(max_size=64)
    | JSON_VALUES.map(lambda v: json.dumps(v).encode())
    | FIELDS.map(lambda v: json.dumps(v).encode())
)


def is_endless(method: str, path: str) -> bool:
    match = canonical_path(path.encode("utf-8", "surrogateescape"))
    if match is None:
        return False
    return (method == "GET" and match[0].endswith("/listen")) or (method == "LISTEN" and len(match[0]) == 41)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(METHODS), path=PATHS, body=BODIES, fast=st.booleans())
async def test_fuzz_no_server_errors(method: str, path: str, body: bytes | None, fast: bool) -> None:
    if is_endless(method, path):
        return
    app = create_app(MemoryDht(), ProxyConfig(max_body=256))
    async with client_for(served(app, fast)) as c:
        try:
            with trio.fail_after(5):
                r = await c.request(method, httpx.URL(path=path), content=body)
        except httpx.InvalidURL:
            return
    assert r.status_code < 500 or (r.status_code == 502 and method == "POST"), (r.status_code, r.content)
    if method != "HEAD":
        assert r.content == b"" or r.content.endswith(b"\n")
        for line in r.content.splitlines():
            json.loads(line)


async def test_value_json_fuzz_seed_cases(client: httpx.AsyncClient) -> None:
    for body in (
        b'{"permanent":{"key":{}}}',
        b'{"owner":"x"}',
        b'{"cypher":5}',
        b'{"data":"","id":"' + b"9" * 30 + b'"}',
    ):
        r = await client.post("/key/k", content=body)
        assert r.status_code < 500


async def test_put_value_round_trips_through_get(client: httpx.AsyncClient) -> None:
    v = Value(data=bytes(range(256)) * 100, id=77, utype="bin")
    from trio_dht.rest.value_json import value_line

    r = await client.post("/key/big", content=value_line(v))
    assert r.status_code == 413  # over this client's 4 KiB cap
    app = create_app(MemoryDht())
    async with client_for(app) as c:
        assert (await c.post("/key/big", content=value_line(v))).content == value_line(v)
        assert (await c.get("/key/big")).content == value_line(v)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "quart"])
async def test_permanent_puts_per_client_address(dht: MemoryDht, fast: bool) -> None:
    from trio_dht.limits import Limits

    app = create_app(dht, ProxyConfig(limits=Limits(permanent_puts_per_source=2)))

    async def post(host: str, value: dict[str, Any]) -> httpx.Response:
        async with client_for(served(app, fast), host) as c:
            return await c.post(f"/key/{HELLO.hex()}", json={**value, "permanent": True})

    assert (await post("2001:db8::1", {"data": "YQ==", "id": "1"})).status_code == 200
    assert (await post("2001:db8::2", {"data": "Yg=="})).status_code == 200  # the same /64
    r = await post("2001:db8::3", {"data": "Yw=="})
    assert r.status_code == 429 and r.json() == {"err": "Too many permanent puts from this address"}
    assert_base_headers(r)
    assert (await post("2001:db8::3", {"data": "YTI=", "id": "1"})).status_code == 200  # a refresh
    assert (await post("2001:db8::4", {"data": "Yg=="})).status_code == 200  # an id-less repeat: merged
    assert (await post("2001:db8:0:1::1", {"data": "Yw=="})).status_code == 200  # another /64
    assert (await post("10.0.0.1", {"data": "ZA=="})).status_code == 200
    assert (await post("::ffff:10.0.0.1", {"data": "ZQ=="})).status_code == 200  # IPv4-mapped: 10.0.0.1
    assert (await post("10.0.0.1", {"data": "Zg=="})).status_code == 429
    async with client_for(app) as c:
        stats = (await c.get("/node/stats")).json()
    assert stats["totalPermanentPuts"] == 5
    assert stats["permanentPuts"]["sources"] == 3 and stats["permanentPuts"]["refusedPerSource"] == 2
    assert [v.data for v in await dht.get(HELLO)].count(b"c") == 1


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "quart"])
async def test_a_permanent_put_the_state_file_refuses_is_a_503(dht: MemoryDht, fast: bool, tmp_path) -> None:
    import sqlite3

    from trio_dht.persist import StateStore
    from trio_dht.proxy.put_journal import StorePutJournal

    path = tmp_path / "state.db"
    store = StateStore(path)
    app = create_app(dht, journal=StorePutJournal(store))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    async with client_for(served(app, fast)) as c:
        r = await c.post(f"/key/{HELLO.hex()}", json={"data": "eA==", "permanent": True})
        assert r.status_code == 503 and r.json() == {"err": "Cannot save the change: state file unavailable"}
        assert_base_headers(r)
        assert await dht.get(HELLO) == []  # not put either
        stats = (await c.get("/node/stats")).json()
        assert stats["totalPermanentPuts"] == 0 and stats["stateFile"] == {"skippedRows": 0, "writeErrors": 1}
        other.execute("ROLLBACK")
        r = await c.post(f"/key/{HELLO.hex()}", json={"data": "eA==", "permanent": True})
        assert r.status_code == 200
    assert [p.value_id for p in store.load_puts()] == [int(r.json()["id"])]
    other.close()
    store.close()
