"""The proxy client's signed and encrypted puts, through our real proxy on 127.0.0.1 (a MemoryDht with an
identity behind it, or one without)."""

from __future__ import annotations

import pytest
import trio

from trio_dht import signature
from trio_dht.client import ProxyHTTPError, open_proxy_client
from trio_dht.crypto import Identity
from trio_dht.infohash import InfoHash
from trio_dht.proxy import ProxyConfig, serve_proxy
from trio_dht.testing.memory_dht import MemoryDht
from trio_dht.value import Value

KEY = InfoHash.get("signed")


async def proxy_for(nursery: trio.Nursery, dht: MemoryDht) -> str:
    (url,) = await nursery.start(serve_proxy, dht, ProxyConfig(host="127.0.0.1", port=0, node_info_cache=0))
    return url


async def test_put_signed(nursery: trio.Nursery, identity: Identity) -> None:
    dht = MemoryDht(identity=identity)
    async with open_proxy_client(await proxy_for(nursery, dht)) as client:
        value = Value(data=b"hello", utype="text/plain")
        assert await client.put_signed(KEY, value)
        assert value.id != 0 and value.owner is None  # the id from the reply; signed on the proxy's side
        (stored,) = dht.values(KEY)
        assert stored.id == value.id and stored.data == b"hello" and stored.utype == "text/plain"
        assert stored.owner == identity.public_key.der and signature.verify(stored)
        dht.fail_puts = True
        assert not await client.put_signed(KEY, Value(data=b"again"))
        with pytest.raises(ValueError, match="permanent"):
            await client.put_signed(KEY, Value(data=b"x"), permanent=True)


async def test_put_encrypted(nursery: trio.Nursery, identity: Identity, other: Identity) -> None:
    dht = MemoryDht(identity=identity)
    await dht.put(InfoHash(other.id), Value(other.certificate.pem, type=8))
    async with open_proxy_client(await proxy_for(nursery, dht)) as client:
        for number, to in enumerate((other.public_key, other.id, other.public_key.long_id)):
            key = InfoHash.get(f"sealed {number}")
            value = Value(data=b"for you")
            assert await client.put_encrypted(key, value, to)
            (stored,) = dht.values(key)
            assert stored.id == value.id and stored.cypher
            inner = other.decrypt_value(stored, signature.verify)
            assert inner.data == b"for you" and inner.owner == identity.public_key.der
        assert not await client.put_encrypted(
            KEY, Value(data=b"x"), bytes(20 * [0xAB])
        )  # no such certificate
        for bad in (b"short", "ab" * 20, 42):
            with pytest.raises(ValueError, match="to must be"):
                await client.put_encrypted(KEY, Value(data=b"x"), bad)
        with pytest.raises(ValueError, match="permanent"):
            await client.put_encrypted(KEY, Value(data=b"x"), other.id, permanent=True)


async def test_a_proxy_without_identity_has_no_such_route(nursery: trio.Nursery, other: Identity) -> None:
    async with open_proxy_client(await proxy_for(nursery, MemoryDht())) as client:
        with pytest.raises(ProxyHTTPError) as raised:
            await client.put_signed(KEY, Value(data=b"x"))
        assert raised.value.status == 404
        with pytest.raises(ProxyHTTPError) as raised:
            await client.put_encrypted(KEY, Value(data=b"x"), other.public_key)
        assert raised.value.status == 404
        assert await client.put(KEY, Value(data=b"plain"))
