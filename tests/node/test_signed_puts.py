"""A node with an identity: its id, signed puts (seq from the network), encrypted puts and its certificate,
on loopback."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace

import pytest
import trio

from trio_dht import signature
from trio_dht.crypto import Identity
from trio_dht.infohash import InfoHash
from trio_dht.node import open_node
from trio_dht.node.dht import CERTIFICATE_VALUE_ID, DhtNode, NoIdentity, RecipientNotFound, identity_node_id
from trio_dht.node.storage import NEVER
from trio_dht.value import Value

LOCAL = "127.0.0.1"


@asynccontextmanager
async def nodes(*identities: Identity | None) -> AsyncIterator[list[DhtNode]]:
    """A node without identity, then one per ``identities`` bootstrapped to it (each connected)."""
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(open_node(port=0, host=LOCAL, host6=None))
        out = [first]
        for number, identity in enumerate(identities):
            node_id = InfoHash.get(f"node {number}") if identity is None or number else None
            node = await stack.enter_async_context(
                open_node(
                    port=0,
                    host=LOCAL,
                    host6=None,
                    identity=identity,
                    node_id=node_id,
                    bootstrap=[(LOCAL, first.bound_port)],
                )
            )
            out.append(node)
        with trio.fail_after(10):
            while not all(node.is_connected() for node in out):
                await trio.sleep(0.02)
        yield out


async def test_a_node_with_an_identity_takes_its_node_id(identity: Identity) -> None:
    expected = hashlib.sha1(b"node:" + identity.id.hex().encode()).digest()
    assert identity_node_id(identity) == InfoHash(expected)
    async with open_node(port=0, host=LOCAL, host6=None, identity=identity) as node:
        assert node.node_id == InfoHash(expected) and node.identity is identity
    fixed = InfoHash.get("fixed")
    async with open_node(port=0, host=LOCAL, host6=None, identity=identity, node_id=fixed) as node:
        assert node.node_id == fixed
    async with open_node(port=0, host=LOCAL, host6=None) as node:
        assert node.identity is None
        with pytest.raises(NoIdentity):
            await node.put_signed(InfoHash.get("k"), Value(b"x"))


async def test_put_signed_increments_seq_and_replaces_the_value(identity: Identity) -> None:
    async with nodes(identity) as (plain, signer):
        key = InfoHash.get("signed twice")
        assert await signer.put_signed(key, Value(b"first", id=42))
        (got,) = await plain.get(key)
        assert (got.id, got.data, got.seq, got.owner) == (42, b"first", 0, identity.public_key.der)
        assert signature.verify(got)
        assert await signer.put_signed(key, Value(b"second", id=42))
        assert await signer.put_signed(key, Value(b"third", id=42))
        stored = plain.storage.get_value(key, 42)
        assert stored is not None and (stored.data, stored.seq) == (b"third", 2)
        assert signature.verify(stored)
        # A value without an id gets a random one.
        assert await signer.put_signed(key, Value(b"no id"))
        assert {v.data for v in await plain.get(key)} == {b"third", b"no id"}


async def test_put_signed_takes_seq_from_the_network(identity: Identity) -> None:
    """A second node with the same identity, which never stored the value, signs above the network's seq."""
    async with nodes(identity, identity) as (plain, first, second):
        key = InfoHash.get("seq from the network")
        assert await first.put(key, identity.sign_value(Value(b"seq 7", id=9, seq=7)))
        second.storage.remove(key, 9)  # it stored the put as one of the closest nodes: forget that
        assert second.storage.get_value(key, 9) is None
        assert await second.put_signed(key, Value(b"seq 8", id=9))
        stored = plain.storage.get_value(key, 9)
        assert stored is not None and (stored.data, stored.seq) == (b"seq 8", 8)


async def test_a_forged_value_does_not_raise_our_seq(identity: Identity) -> None:
    """Type 2 values are stored without a signature check (OpenDHT checks types 0, 1, 3, 4, 5 only), so the
    network can answer one with our owner and a signature that fails: a get drops it (as OpenDHT's SecureDht)
    and put_signed, which reads every reply, does not count it."""
    async with nodes(identity) as (plain, signer):
        key = InfoHash.get("forged seq")
        real = identity.sign_value(Value(b"ours", type=2, id=5, seq=3))
        forged = replace(real, seq=900, _packed=None)
        assert not signature.verify(forged)
        plain.protocol.store(key, forged, trio.current_time(), local=True)
        assert await signer.get(key) == []
        assert signer.protocol.screen.bad_signatures == 1
        assert [v.seq for v in await signer._values_of_id(key, 5)] == [900]
        await signer.put_signed(key, Value(b"next", type=2, id=5))
        stored = signer.storage.get_value(key, 5)
        assert stored is not None and (stored.data, stored.seq) == (b"next", 0)
        assert signature.verify(stored)


async def test_another_owner_cannot_edit_our_signed_value(identity: Identity, other: Identity) -> None:
    async with nodes(identity, other) as (plain, ours, theirs):
        key = InfoHash.get("edited by another owner")
        assert await ours.put_signed(key, Value(b"mine", id=77))
        await theirs.put_signed(key, Value(b"stolen", id=77))
        for node in (plain, ours):
            stored = node.storage.get_value(key, 77)
            assert stored is not None and (stored.data, stored.owner) == (b"mine", identity.public_key.der)
        assert [v.data for v in await plain.get(key)] == [b"mine"]


async def test_the_certificate_is_announced_and_found(identity: Identity, other: Identity) -> None:
    async with nodes(identity) as (plain, node):
        keys = [identity.id, InfoHash(hashlib.sha1(identity.public_key.long_id).digest())]
        with trio.fail_after(10):
            while any(plain.storage.get_value(key, CERTIFICATE_VALUE_ID) is None for key in keys):
                await trio.sleep(0.05)
        for key in keys:
            value = plain.storage.get_value(key, CERTIFICATE_VALUE_ID)
            assert value is not None
            assert (value.type, value.data, value.is_signed) == (8, identity.certificate.pem, False)
        assert (node._permanent.keys()) >= {(key, CERTIFICATE_VALUE_ID) for key in keys}

        found = await plain.find_certificate(identity.id)
        assert found is not None and found.der == identity.certificate.der
        found = await plain.find_certificate(identity.id, identity.public_key.long_id)
        assert found is not None and found.der == identity.certificate.der
        assert await plain.find_certificate(other.id) is None
        # A certificate stored at another key id is not that key's.
        assert await plain.put(other.id, Value(identity.certificate.pem, type=8, id=1))
        assert await node.find_certificate(other.id) is None
        assert await node.find_certificate(other.id, other.public_key.long_id) is None


def test_the_node_imports_and_runs_without_cryptography() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'cryptography': raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import trio, trio_dht\n"
        "from trio_dht.node import open_node\n"
        "async def main():\n"
        "    async with open_node(port=0, host='127.0.0.1', host6=None) as node:\n"
        "        assert node.identity is None\n"
        "trio.run(main)\n"
        "assert 'trio_dht.crypto' not in sys.modules and 'cryptography' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


async def test_a_permanent_signed_put_is_edited_in_place(identity: Identity) -> None:
    async with nodes(identity) as (plain, signer):
        key = InfoHash.get("permanent signed")
        assert await signer.put_signed(key, Value(b"v1", id=3), permanent=True)
        assert await signer.put_signed(key, Value(b"v2", id=3), permanent=True)
        assert [k for k in signer._permanent if k[0] == key] == [(key, 3)]  # one re-announce, of the edit
        stored = signer.storage.stored(key, 3)
        assert stored is not None and (stored.value.data, stored.value.seq) == (b"v2", 1)
        assert stored.expiration == NEVER
        remote = plain.storage.get_value(key, 3)
        assert remote is not None and (remote.data, remote.seq) == (b"v2", 1)
        assert signer.cancel_put(key, 3) and signer.storage.get_value(key, 3) is None


# -- encrypted puts -------------------------------------------------------------------------------------


async def test_put_encrypted_is_read_by_its_recipient_only(identity: Identity, other: Identity) -> None:
    async with nodes(identity, other, None) as (plain, sender, recipient, stranger):
        with trio.fail_after(10):  # the recipient's certificate is announced
            while plain.storage.get_value(other.id, CERTIFICATE_VALUE_ID) is None:
                await trio.sleep(0.05)
        key = InfoHash.get("encrypted")
        # By key id: the sender finds the recipient's certificate on the DHT (then keeps its key).
        assert await sender.put_encrypted(key, Value(b"for you", id=4, utype="text/plain"), other.id)
        assert await sender.find_public_key(bytes(other.id)) == other.public_key
        stored = plain.storage.get_value(key, 4)
        assert stored is not None and stored.cypher and not stored.data and stored.owner is None
        got = await recipient.get(key)
        assert [(v.id, v.data, v.utype, v.owner_id, v.recipient) for v in got] == [
            (4, b"for you", "text/plain", identity.id, other.id)
        ]
        assert [v.cypher for v in await stranger.get(key)] == [stored.cypher]  # no identity: opaque
        assert [v.cypher for v in await sender.get(key)] == [stored.cypher]  # not for the sender either
        assert (sender.protocol.screen.not_for_us, recipient.protocol.screen.decrypted) == (1, 1)
        await recipient.get(key)  # the same cypher again: its outcome is remembered
        assert recipient.protocol.screen.decrypted == 1
        assert recipient.limit_counters()["values_decrypted"] == 1  # as /node/stats shows it
        assert sender.limit_counters()["values_not_for_us"] == 1

        # By long id and by public key, and listened to: the recipient's listen hears it decrypted.
        key = InfoHash.get("encrypted, listened")
        async with recipient.listen(key) as events:
            assert await sender.put_encrypted(key, Value(b"by long id", id=5), other.public_key.long_id)
            assert await sender.put_encrypted(key, Value(b"by key", id=6), other.public_key)
            with trio.fail_after(10):
                heard = {(await events.receive()).value.data for _ in range(2)}
        assert heard == {b"by long id", b"by key"}


async def test_put_encrypted_needs_an_identity_and_a_known_recipient(
    identity: Identity, other: Identity
) -> None:
    async with nodes(identity) as (plain, sender):
        key = InfoHash.get("nobody")
        with pytest.raises(NoIdentity):
            await plain.put_encrypted(key, Value(b"x"), other.public_key)
        with pytest.raises(RecipientNotFound):
            await sender.put_encrypted(key, Value(b"x"), bytes(InfoHash.get("no such key")))
        with pytest.raises(RecipientNotFound):
            await sender.put_encrypted(key, Value(b"x"), other.public_key.long_id)
        with pytest.raises(ValueError):
            await sender.put_encrypted(key, Value(id=1, cypher=b"sealed"), other.public_key)
        with pytest.raises(ValueError):
            await sender.put_encrypted(key, Value(b"x"), b"short id")
        with pytest.raises(TypeError):
            await sender.put_encrypted(key, Value(b"x"), other.id.hex())
        assert plain.storage.get_value(key, 1) is None


async def test_a_forged_signed_value_does_not_hide_the_real_one(identity: Identity) -> None:
    """Replies are screened before a get keeps the first value of each id."""
    async with nodes(None, None) as (first, forger, reader):
        key = InfoHash.get("forged first")
        real = identity.sign_value(Value(b"real", type=2, id=8))
        forged = replace(real, data=b"forged", _packed=None)
        forger.protocol.store(key, forged, trio.current_time(), local=True)  # type 2: stored unchecked
        first.protocol.store(key, real, trio.current_time(), local=True)
        assert [v.data for v in await reader.get(key)] == [b"real"]
        assert reader.protocol.screen.bad_signatures >= 1
