"""``GET /status``, the status page, as a route: one entry of the table, HTML with a Content-Security-Policy
that allows exactly its own inline script and style, served the same by every HTTP layer (the front end, the
raw-ASGI path, the Quart app), handed over by an HTTP worker; ``/key/status`` still reaches the key named
"status", and ``GET /`` stays node info's JSON."""

from __future__ import annotations

import base64
import hashlib
import json
import re

import httpx
import pytest
import trio
from proxy_layers import serve_with_asgi, serve_with_quart

from trio_dht.infohash import InfoHash
from trio_dht.limits_hit import LIMIT_COUNTERS
from trio_dht.proxy import ProxyConfig, serve_proxy, status_page
from trio_dht.proxy.asgi import create_app
from trio_dht.proxy.http1 import read_head
from trio_dht.proxy.http_worker import relayed_request
from trio_dht.proxy.routes import ROUTES, Request
from trio_dht.rest.paths import Route, match
from trio_dht.testing.memory_dht import MemoryDht

HTML = "text/html; charset=utf-8"


def directives(policy: str) -> dict[str, list[str]]:
    return {name: values for name, *values in (part.split() for part in policy.split(";"))}


def sha256(text: str) -> str:
    return f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"


def test_status_is_a_route_and_key_still_reaches_the_key_named_status() -> None:
    for target in (b"/status", b"/STATUS/", b"/status?x=1"):
        assert match("GET", target) == (Route.STATUS, None)
    assert match("POST", b"/status") is None and match("SUBSCRIBE", b"/status") is None
    assert match("GET", b"/key/status") == (Route.GET, InfoHash.get("status"))
    assert match("POST", b"/key/status") == (Route.PUT, InfoHash.get("status"))
    assert match("GET", b"/statusx") == (Route.GET, InfoHash.get("statusx"))


def test_the_worker_hands_status_over() -> None:
    head = read_head(bytearray(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert relayed_request(head) is None  # type: ignore[arg-type]


def test_the_page_and_its_policy() -> None:
    reply = ROUTES[Route.STATUS].handler(create_app(MemoryDht()).state, Request())
    assert reply.status == 200 and reply.headers[0] == ("Content-Type", HTML)
    headers = dict(reply.headers)
    assert headers["X-Content-Type-Options"] == "nosniff"
    html = reply.body.decode()
    policy = directives(headers["Content-Security-Policy"])
    scripts = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    styles = re.findall(r"<style>(.*?)</style>", html, re.DOTALL)
    assert len(scripts) == len(styles) == 1
    assert policy["script-src"] == [sha256(scripts[0])] and policy["style-src"] == [sha256(styles[0])]
    assert policy["default-src"] == ["'none'"] and policy["connect-src"] == ["'self'"]
    assert policy["img-src"] == ["data:"] and policy["frame-ancestors"] == ["'none'"]
    assert "'unsafe-inline'" not in headers["Content-Security-Policy"]
    # Nothing is fetched from elsewhere: no src or href but the data: favicon, no absolute URL.
    assert re.findall(r'(?:src|href)="([^"]*)"', html) == ["data:,"]
    assert "http://" not in html and "https://" not in html and "@import" not in html
    # The limit counters come from the one list; the page reads only routes of the table.
    [block] = re.findall(r'<script type="application/json" id="limit-counters">(.*?)</script>', html)
    assert json.loads(block) == list(LIMIT_COUNTERS)
    read = re.findall(r'getJson\("([^"]+)"', scripts[0])
    assert sorted(read) == ["healthz", "node/info", "node/stats"]
    assert [match("GET", f"/{path}".encode())[0] for path in read] == [  # type: ignore[index]
        Route.NODE_INFO,
        Route.NODE_STATS,
        Route.HEALTHZ,
    ]
    assert status_page.reply() is reply  # made once


@pytest.fixture(params=["fast", "asgi", "quart"])
async def base_url(
    request: pytest.FixtureRequest, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> str:
    if request.param == "asgi":
        serve_with_asgi(monkeypatch)
    elif request.param == "quart":
        serve_with_quart(monkeypatch)
    urls = await nursery.start(serve_proxy, MemoryDht(), ProxyConfig(host="127.0.0.1", port=0))
    return urls[0]


async def test_every_layer_serves_the_page_and_the_key_named_status(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url, trust_env=False, timeout=5) as http:
        r = await http.get("/status")
        assert r.status_code == 200 and r.headers["content-type"] == HTML
        assert r.text.startswith("<!DOCTYPE html>") and r.content == status_page.reply().body
        assert (
            r.headers["content-security-policy"]
            == dict(status_page.reply().headers)["Content-Security-Policy"]
        )
        assert (await http.get("/STATUS/")).headers["content-type"] == HTML
        r = await http.post("/key/status", json={"data": "aGVsbG8=", "id": "5"})
        assert r.status_code == 200
        r = await http.get("/key/status")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert [json.loads(line)["id"] for line in r.text.splitlines()] == ["5"]
        r = await http.get("/")
        assert r.headers["content-type"] == "application/json" and "node_id" in r.json()
