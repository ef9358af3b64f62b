"""A stranger's SUBSCRIBEs, permanent puts and UnifiedPush endpoints, against the real program.

* Subscriptions and permanent puts per client address are capped (``--limit subscriptions_per_source=5``,
  ``--limit permanent_puts_per_source=5``): the next new one is a 429 with a JSON error, a refresh is not
  new, the counts go down when subscriptions end (unsubscribe, expiry), and ``/node/stats`` counts the
  refusals. Through the HTTP worker (which relays SUBSCRIBE with the client's address) and without it.
* UnifiedPush endpoints that reach loopback in spellings an HTTP client would follow (IPv4-mapped IPv6,
  numeric IPv4 forms, localhost names) are refused at SUBSCRIBE; a host name that ``/etc/hosts`` maps to
  loopback is accepted, but nothing is ever sent to it. Only loopback spellings are given to the program.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest
import trio
from conftest import Target, attacked

from trio_dht.infohash import InfoHash

CAP = 5
ATTEMPTS = 4 * CAP
KEY = InfoHash.get("attacked key").hex()
CAPS = ("--limit", f"subscriptions_per_source={CAP}", "--limit", f"permanent_puts_per_source={CAP}")


def http_client(target: Target) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=target.url, timeout=5, trust_env=False)


def subscribe_body(client_id: str, **fields: object) -> dict[str, object]:
    return {"key": "attacker-token", "platform": "android", "client_id": client_id, **fields}


@pytest.mark.parametrize("workers", ["1", "0"], ids=["worker", "front-end"])
async def test_subscriptions_per_source_are_capped(workers: str) -> None:
    flags = (*CAPS, "--http-workers", workers, "--subscription-lifetime", "4s")
    async with attacked(*flags) as target, http_client(target) as http:
        statuses = []
        for i in range(ATTEMPTS):
            r = await http.request("SUBSCRIBE", f"/key/{KEY}", json=subscribe_body(f"c{i}"))
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert r.json() == {"err": "Too many push subscriptions from this address"}
                assert r.headers["content-type"] == "application/json"
        assert statuses == [200] * CAP + [429] * (ATTEMPTS - CAP)
        # A refresh of one held is not new; an unsubscribe frees a slot.
        r = await http.request("SUBSCRIBE", f"/key/{KEY}", json=subscribe_body("c0", refresh=True))
        assert r.status_code == 200
        r = await http.request("UNSUBSCRIBE", f"/key/{KEY}", json=subscribe_body("c1"))
        assert r.status_code == 200
        r = await http.request("SUBSCRIBE", f"/key/{KEY}", json=subscribe_body("new"))
        assert r.status_code == 200
        stats = (await target.stats())["pushSubscriptions"]
        assert (stats["active"], stats["refusedPerSource"], stats["sources"]) == (CAP, ATTEMPTS - CAP, 1)
        # Expiry frees every slot (4 s lifetime).
        with trio.fail_after(10):
            while (await target.stats())["pushSubscriptions"]["active"]:
                await trio.sleep(0.2)
        for i in range(CAP):
            r = await http.request("SUBSCRIBE", f"/key/{KEY}", json=subscribe_body(f"after{i}"))
            assert r.status_code == 200
        r = await http.request("SUBSCRIBE", f"/key/{KEY}", json=subscribe_body("one too many"))
        assert r.status_code == 429


async def test_permanent_puts_per_source_are_capped() -> None:
    async with attacked(*CAPS) as target, http_client(target) as http:
        statuses, ids = [], []
        for i in range(ATTEMPTS):
            value = {"data": f"{i:04}", "permanent": True}  # distinct content: no merging
            r = await http.post(f"/key/{KEY}", json=value)
            statuses.append(r.status_code)
            if r.status_code == 200:
                ids.append(r.json()["id"])
            else:
                assert r.json() == {"err": "Too many permanent puts from this address"}
        assert statuses == [200] * CAP + [429] * (ATTEMPTS - CAP)
        # Re-POSTing a held id refreshes it; an id-less repeat of held content merges with it.
        r = await http.post(f"/key/{KEY}", json={"data": "cmVmcmVzaA==", "id": ids[0], "permanent": True})
        assert r.status_code == 200
        r = await http.post(f"/key/{KEY}", json={"data": "0001", "permanent": True})
        assert r.status_code == 200 and r.json()["id"] == ids[1]
        stats = await target.stats()
        assert stats["totalPermanentPuts"] == CAP
        assert stats["permanentPuts"]["sources"] == 1
        assert stats["permanentPuts"]["refusedPerSource"] == ATTEMPTS - CAP


LOOPBACK_ENDPOINTS = [
    "http://127.0.0.1:{port}/up",
    "http://[::1]:{port}/up",
    "http://[::ffff:127.0.0.1]:{port}/up",  # IPv4-mapped
    "http://2130706433:{port}/up",
    "http://0x7f.1:{port}/up",
    "http://0177.0.0.1:{port}/up",
    "http://127.1:{port}/up",
    "http://127.0.0.1.:{port}/up",
    "http://localhost:{port}/up",
    "http://localhost.:{port}/up",
    "http://a.localhost:{port}/up",
]
"""Spellings of loopback only: should the guard regress, the program still connects nowhere but here (the
spellings of other addresses, such as NAT64, 6to4 or Teredo ones, are unit-tested without a network)."""


def loopback_name() -> str | None:
    """A host name that ``/etc/hosts`` maps to loopback addresses only (not ``localhost``, which the guard
    refuses by name), if the system resolver reads that file first; found without any lookup."""
    try:
        nsswitch = Path("/etc/nsswitch.conf").read_text()
        hosts = Path("/etc/hosts").read_text()
    except OSError:
        return None
    sources = next((line.split()[1:] for line in nsswitch.splitlines() if line.startswith("hosts:")), [])
    if sources[:1] != ["files"]:
        return None
    addresses: dict[str, set[str]] = {}
    for line in hosts.splitlines():
        address, *names = line.split("#", 1)[0].split() or [""]
        for name in names:
            addresses.setdefault(name.lower(), set()).add(address)
    for name, found in addresses.items():
        by_name = name == "localhost" or name.endswith(".localhost")
        if not by_name and all(a.startswith("127.") or a == "::1" for a in found):
            return name
    return None


async def test_unifiedpush_endpoints_that_reach_loopback_are_refused() -> None:
    name = loopback_name()
    with trio.socket.socket() as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        async with attacked() as target, http_client(target) as http:
            for endpoint in LOOPBACK_ENDPOINTS:
                body = {"key": endpoint.format(port=port), "platform": "unifiedpush", "client_id": "c"}
                r = await http.request("SUBSCRIBE", f"/key/{KEY}", json=body)
                assert r.status_code == 400 and r.json()["err"].startswith("Bad endpoint"), endpoint
            if name is None:
                return
            # A name that resolves to loopback passes the form check; the push is never sent to it.
            endpoint = f"http://{name}:{port}/up"
            body = {"key": endpoint, "platform": "unifiedpush", "client_id": "c"}
            assert (await http.request("SUBSCRIBE", f"/key/{KEY}", json=body)).status_code == 200
            await http.post(f"/key/{KEY}", content=json.dumps({"data": "d2FrZQ==", "id": "5"}))
            with trio.fail_after(10):
                while not (await target.stats())["pushSubscriptions"]["prunedTokens"]:
                    await trio.sleep(0.1)
        with trio.move_on_after(0.2):
            await listener.accept()
            raise AssertionError("the program connected to a loopback endpoint")


async def test_totals_are_capped() -> None:
    """Past the per-source caps (many addresses), the totals hold: subscriptions and permanent put bytes."""
    flags = ("--limit", f"subscriptions_total={CAP}", "--limit", "permanent_puts_bytes=100K")
    async with attacked(*flags) as target, http_client(target) as http:
        statuses = []
        for i in range(2 * CAP):
            r = await http.request("SUBSCRIBE", f"/key/{KEY}", json=subscribe_body(f"c{i}"))
            statuses.append(r.status_code)
        assert statuses == [200] * CAP + [503] * CAP
        assert r.json() == {"err": "Too many push subscriptions on this proxy"}
        statuses = []
        for i in range(6):
            data = base64.b64encode(bytes([i]) * 30_000).decode()
            r = await http.post(f"/key/{KEY}", json={"data": data, "permanent": True})
            statuses.append(r.status_code)
        assert statuses == [200] * 3 + [503] * 3
        assert r.json() == {"err": "Too many permanent puts on this proxy"}
        stats = await target.stats()
        assert (
            stats["pushSubscriptions"]["refusedFull"] == CAP and stats["pushSubscriptions"]["active"] == CAP
        )
        assert stats["permanentPuts"]["refusedFull"] == 3 and stats["totalPermanentPuts"] == 3
        assert 90_000 < stats["permanentPuts"]["bytes"] <= 100 * 1024
