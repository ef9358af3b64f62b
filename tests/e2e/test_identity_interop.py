"""trio_dht.crypto against real OpenDHT: PyPI ``opendht`` 4.4.2 and Debian ``dhtnode`` 2.4.12.

* Our certificate loads in ``opendht`` with the same key id, long id and name; our key and certificate run
  ``dhtnode`` (which reports our key id, takes SHA-1("node:" + key id) as node id and announces our
  certificate), and ``dhtnode`` signing a value with our key gives our signature, byte for byte.
* Identities OpenDHT generates load in ours with the same ids, and their certificates have the fields ours
  have.
* A value we sign and put from our node comes back from real nodes as signed by us: their gets check the
  signature (OpenDHT's SecureDht drops values whose signature fails) and their storage accepts it.

With ``CI=true`` a missing peer fails these tests instead of skipping them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from peers import (
    needs_dhtnode,
    needs_opendht,
    open_dhtnode_peer,
    open_opendht_peer,
    poll_until,
    require_dhtnode,
    require_opendht,
)

from trio_dht import InfoHash, Value, open_node, signature
from trio_dht.crypto import Certificate, Identity

pytestmark = pytest.mark.interop

LOOPBACK = "127.0.0.1"
_PUBLIC_KEY_ID = re.compile(r"Public key ID ([0-9a-f]{40})")


def _shape(cert: x509.Certificate) -> dict[str, object]:
    """What generateIdentity fixes in a certificate (not the key, serial or dates themselves)."""
    return {
        "version": cert.version,
        "subject": [(a.oid, a._type) for a in cert.subject],
        "rdns": len(cert.subject.rdns),
        "self_issued": cert.issuer == cert.subject,
        "extensions": [
            (e.oid, e.critical, e.value) for e in cert.extensions if e.oid.dotted_string != "2.5.29.14"
        ],
        "ski_is_key_id": cert.extensions[0].value.digest
        == hashlib.sha1(
            cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ).digest(),
        "validity": cert.not_valid_after_utc - cert.not_valid_before_utc,
        "hash": cert.signature_hash_algorithm.name if cert.signature_hash_algorithm else None,
        "serial_bytes": (cert.serial_number.bit_length() + 7) // 8 <= 8 and cert.serial_number > 0,
    }


def _owner_der(owner: str) -> bytes:
    """The DER key of the proxy JSON's ``owner`` (PEM text or base64 DER, by version)."""
    if owner.startswith("-----BEGIN"):
        key = serialization.load_pem_public_key(owner.encode())
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64decode(owner)


# -- certificates and keys ---------------------------------------------------------------------------------


@needs_opendht
def test_our_certificate_loads_in_opendht_with_our_ids(identity: Identity) -> None:
    require_opendht()
    import opendht

    for ours in (identity, Identity.generate("a 4096-bit node")):
        theirs = opendht.Certificate(ours.certificate.pem)
        assert str(theirs.getId()) == ours.id.hex()
        assert str(theirs.getLongId()) == ours.public_key.long_id.hex()
        assert theirs.getName() == ours.certificate.name
        assert Certificate.from_pem(theirs.toString().encode()).der == ours.certificate.der  # same bytes


@needs_opendht
@pytest.mark.parametrize(("name", "bits"), [("pydht", 2048), ("n\u0153ud_x", 2048), ("pydht", 4096)])
def test_identities_opendht_generates_load_in_ours_and_match_ours(name: str, bits: int) -> None:
    require_opendht()
    import opendht

    theirs = opendht.Identity.generate(name, bits=bits)
    cert = Certificate.from_pem(theirs.certificate.toString().encode())
    assert cert.id.hex() == str(theirs.certificate.getId()) == str(theirs.publickey.getId())
    assert cert.long_id.hex() == str(theirs.certificate.getLongId())
    assert cert.name == name
    ours = Identity.generate(name, bits=bits)
    assert _shape(cert.x509) == _shape(ours.certificate.x509)
    # Their key signs as ours does: RSA PKCS#1 v1.5 with SHA-512, checked by our verifier.
    value = Value(b"signed by opendht", id=5, seq=1, owner=cert.public_key.der)
    signed = Value(
        value.data, id=5, seq=1, owner=value.owner, signature=theirs.key.sign(value.signed_bytes())
    )
    assert signature.Verifier().verify(signed)
    assert not signature.verify(
        Value(b"tampered", id=5, seq=1, owner=value.owner, signature=signed.signature)
    )


@needs_dhtnode
async def test_dhtnode_saves_identities_that_load_in_ours(tmp_path: Path) -> None:
    require_dhtnode()
    path = tmp_path / "dhtnode_identity"
    async with open_dhtnode_peer(extra_args=["-i", "--save-identity", str(path)]) as peer:
        announced = _PUBLIC_KEY_ID.search("\n".join(peer.prompt.lines))
        assert announced is not None, peer.prompt.lines
    loaded = Identity.load(tmp_path / "dhtnode_identity.pem", tmp_path / "dhtnode_identity.crt")
    assert loaded.id.hex() == announced.group(1)
    assert loaded.public_key.bits == 4096
    (issuer,) = loaded.certificate.issuers  # its CA: an EC key, "DHT Node CA"
    issuer_key = issuer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert issuer.subject.rfc4514_string() == f"UID={hashlib.sha1(issuer_key).hexdigest()},CN=DHT Node CA"
    loaded.certificate.x509.verify_directly_issued_by(issuer)
    assert signature.verify(loaded.sign_value(Value(b"x", id=1)))


@needs_dhtnode
async def test_dhtnode_runs_with_our_identity_and_signs_as_we_do(identity: Identity, tmp_path: Path) -> None:
    """dhtnode 2.4.12 cannot read an encrypted key (it passes GNUTLS_PKCS_PLAIN when given a password), so
    the key is saved in the clear here; encrypted keys round-trip in ours (tests/node/test_crypto.py)."""
    require_dhtnode()
    identity.save(tmp_path / "node.pem", tmp_path / "node.crt")
    flags = ["--certificate", str(tmp_path / "node.crt"), "--privkey", str(tmp_path / "node.pem")]
    async with AsyncExitStack() as stack:
        ours = await stack.enter_async_context(open_node(port=0, host=LOOPBACK, host6=None))
        peer = await stack.enter_async_context(
            open_dhtnode_peer(bootstrap=(LOOPBACK, ours.bound_port), extra_args=flags)
        )
        announced = _PUBLIC_KEY_ID.search("\n".join(peer.prompt.lines))
        assert announced is not None and announced.group(1) == identity.id.hex()
        assert await peer.node_id() == hashlib.sha1(b"node:" + identity.id.hex().encode()).digest()
        await peer.wait_for_nodes(1, timeout=15)

        # It announces our certificate: type 8, the PEM, stored at the key id (2.4.12).
        certs = await poll_until(lambda: ours.get(InfoHash(identity.id)), timeout=15)
        assert [(v.type, v.id, v.is_signed) for v in certs] == [(8, 1, False)]
        assert Certificate.from_pem(certs[0].data).der == identity.certificate.der

        # It signs with our key exactly as we do (PKCS#1 v1.5 is deterministic: same bytes, same signature).
        key = InfoHash.get("signed by dhtnode with our key")
        lines = await peer.command(f"s {key.hex()} hello", until=r"Put signed: (success|failure)")
        assert "Put signed: success" in lines[-1], lines
        got = await poll_until(lambda: ours.get(key), timeout=10)
        assert [(v.data, v.utype, v.owner) for v in got] == [
            (b"hello", "text/plain", identity.public_key.der)
        ]
        theirs = got[0]
        again = identity.sign_value(
            Value(b"hello", type=theirs.type, id=theirs.id, seq=theirs.seq, utype="text/plain")
        )
        assert again.signed_bytes() == theirs.signed_bytes() and again.signature == theirs.signature


# -- values we sign, checked by real nodes -----------------------------------------------------------------


@needs_opendht
async def test_a_value_we_sign_comes_back_from_opendht_as_ours(identity: Identity) -> None:
    require_opendht()
    async with AsyncExitStack() as stack:
        ours = await stack.enter_async_context(open_node(port=0, host=LOOPBACK, host6=None))
        real = await stack.enter_async_context(open_opendht_peer(bootstrap=(LOOPBACK, ours.bound_port)))
        await real.wait_for_nodes(1, timeout=15)
        key = InfoHash.get("signed by trio_dht, for opendht")
        signed = identity.sign_value(
            Value(b"signed hello", id=random.getrandbits(63) + 1, utype="text/plain")
        )
        assert await ours.put(key, signed)
        values = await poll_until(lambda: real.get(key), timeout=10)
        assert [(v["id"], v["data"], v["owner"]) for v in values] == [
            (signed.id, b"signed hello", identity.id.hex())
        ]
        assert key.hex() in await real.storage_log()  # stored there: its store policy checked the signature

        # The control: the same value with other data under the same signature is refused (silently: the put
        # is answered) and not found.
        forged_key = InfoHash.get("forged by trio_dht, for opendht")
        assert await ours.put(forged_key, replace(signed, data=b"forged hello", _packed=None))
        await trio.sleep(0.5)
        assert await real.get(forged_key) == []
        assert forged_key.hex() not in await real.storage_log()


@needs_dhtnode
async def test_a_value_we_sign_comes_back_from_dhtnode_as_ours(identity: Identity) -> None:
    require_dhtnode()
    async with AsyncExitStack() as stack:
        ours = await stack.enter_async_context(open_node(port=0, host=LOOPBACK, host6=None))
        peer = await stack.enter_async_context(open_dhtnode_peer(bootstrap=(LOOPBACK, ours.bound_port)))
        await peer.wait_for_nodes(1, timeout=15)
        key = InfoHash.get("signed by trio_dht, for dhtnode")
        signed = identity.sign_value(Value(b"signed hello", id=random.getrandbits(63) + 1, seq=3))
        assert await ours.put(key, signed)
        async with httpx.AsyncClient(base_url=peer.proxy_url, trust_env=False, timeout=20) as client:

            async def fetch() -> list[dict[str, object]]:
                response = await client.get(f"/key/{key.hex()}")
                return [json.loads(line) for line in response.text.splitlines() if line.strip()]

            values = await poll_until(fetch, timeout=10)
        assert len(values) == 1
        value = values[0]
        assert (int(value["id"]), base64.b64decode(value["data"]), value["seq"]) == (
            signed.id,
            b"signed hello",
            3,
        )
        assert _owner_der(value["owner"]) == identity.public_key.der
        assert base64.b64decode(value["sig"]) == signed.signature


# -- a node with an identity: put_signed and certificates, checked by real nodes ---------------------------


async def _proxy_values(proxy_url: str, key: InfoHash) -> list[dict[str, object]]:
    """The proxy JSON of the values dhtnode finds at ``key``."""
    async with httpx.AsyncClient(base_url=proxy_url, trust_env=False, timeout=20) as client:
        response = await client.get(f"/key/{key.hex()}")
        return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def _long_id_key(identity: Identity) -> InfoHash:
    return InfoHash(hashlib.sha1(identity.public_key.long_id).digest())


@needs_opendht
async def test_put_signed_reaches_opendht_and_an_edit_replaces_it(identity: Identity) -> None:
    """The real node stores our signed value, then our edit (seq + 1) in its place: checked in its own
    storage, after our node has stopped."""
    require_opendht()
    key = InfoHash.get("put_signed, for opendht")
    vid = random.getrandbits(63) + 1
    async with open_opendht_peer() as real:
        async with open_node(
            port=0, host=LOOPBACK, host6=None, identity=identity, bootstrap=[real.address]
        ) as ours:
            await real.wait_for_nodes(1, timeout=15)
            assert await ours.put_signed(key, Value(b"first", id=vid, utype="text/plain"))
            assert await poll_until(lambda: real.get(key), timeout=10) == [
                {
                    "id": vid,
                    "data": b"first",
                    "type": None,
                    "utype": "text/plain",
                    "owner": identity.id.hex(),
                    "recipient": None,
                }
            ]
            assert await ours.put_signed(key, Value(b"edited", id=vid, utype="text/plain"))
            mine = ours.storage.get_value(key, vid)
            assert mine is not None and mine.seq == 1
        values = await real.get(key)  # ours is gone: what the real node stored
        assert [(v["id"], v["data"], v["owner"]) for v in values] == [(vid, b"edited", identity.id.hex())]


@needs_dhtnode
async def test_put_signed_reaches_dhtnode_and_an_edit_replaces_it(identity: Identity) -> None:
    require_dhtnode()
    key = InfoHash.get("put_signed, for dhtnode")
    vid = random.getrandbits(63) + 1
    async with open_dhtnode_peer() as peer:
        async with open_node(
            port=0, host=LOOPBACK, host6=None, identity=identity, bootstrap=[peer.address]
        ) as ours:
            await peer.wait_for_nodes(1, timeout=15)
            assert await ours.put_signed(key, Value(b"first", id=vid))
            first = await poll_until(lambda: _proxy_values(peer.proxy_url, key), timeout=10)
            assert [(int(v["id"]), base64.b64decode(v["data"]), v["seq"]) for v in first] == [
                (vid, b"first", 0)
            ]
            assert _owner_der(first[0]["owner"]) == identity.public_key.der
            assert await ours.put_signed(key, Value(b"edited", id=vid))
        values = await _proxy_values(peer.proxy_url, key)  # ours is gone: what dhtnode stored
        assert [(int(v["id"]), base64.b64decode(v["data"]), v["seq"]) for v in values] == [
            (vid, b"edited", 1)
        ]
        assert _owner_der(values[0]["owner"]) == identity.public_key.der
        edited = identity.sign_value(Value(b"edited", id=vid, seq=1))
        assert base64.b64decode(values[0]["sig"]) == edited.signature


@needs_dhtnode
async def test_we_find_the_certificate_dhtnode_announces(tmp_path: Path) -> None:
    require_dhtnode()
    theirs = Identity.generate("dhtnode's", bits=2048)
    theirs.save(tmp_path / "node.pem", tmp_path / "node.crt")
    flags = ["--certificate", str(tmp_path / "node.crt"), "--privkey", str(tmp_path / "node.pem")]
    async with AsyncExitStack() as stack:
        ours = await stack.enter_async_context(open_node(port=0, host=LOOPBACK, host6=None))
        peer = await stack.enter_async_context(
            open_dhtnode_peer(bootstrap=(LOOPBACK, ours.bound_port), extra_args=flags)
        )
        await peer.wait_for_nodes(1, timeout=15)
        found = await poll_until(lambda: ours.find_certificate(theirs.id), timeout=15)
        assert found.der == theirs.certificate.der and found.name == "dhtnode's"
        found = await ours.find_certificate(theirs.id, theirs.public_key.long_id)
        assert found is not None and found.der == theirs.certificate.der
        assert await ours.find_certificate(InfoHash.get("no such key")) is None


@needs_dhtnode
async def test_dhtnode_stores_our_certificate_at_the_key_id(identity: Identity) -> None:
    """Our node announces its certificate to dhtnode; after our node stopped, dhtnode's proxy returns it from
    its own storage at the key id. At SHA-1(long id) 2.4.12 stores nothing: its type-8 store policy accepts a
    certificate only at its key id."""
    require_dhtnode()
    async with open_dhtnode_peer() as peer:
        async with open_node(
            port=0, host=LOOPBACK, host6=None, identity=identity, bootstrap=[peer.address]
        ) as ours:
            await peer.wait_for_nodes(1, timeout=15)
            at_key_id = await poll_until(lambda: _proxy_values(peer.proxy_url, identity.id), timeout=15)
            with trio.fail_after(15):  # both announces done (put registers a permanent put once announced)
                while (_long_id_key(identity), 1) not in ours._permanent:
                    await trio.sleep(0.05)
            assert ours.node_id == hashlib.sha1(b"node:" + identity.id.hex().encode()).digest()
        assert [(v["type"], int(v["id"])) for v in at_key_id] == [(8, 1)]
        for values in (at_key_id, await _proxy_values(peer.proxy_url, identity.id)):
            assert Certificate.from_pem(base64.b64decode(values[0]["data"])).der == identity.certificate.der
        assert await _proxy_values(peer.proxy_url, _long_id_key(identity)) == []


@needs_opendht
async def test_opendht_gets_our_certificate_at_both_keys(identity: Identity) -> None:
    """The ``opendht`` binding has no ``findCertificate``: a get of type 8 at each key, from the real node's
    own storage once our node has stopped."""
    require_opendht()
    async with open_opendht_peer() as real:
        async with open_node(port=0, host=LOOPBACK, host6=None, identity=identity, bootstrap=[real.address]):
            await real.wait_for_nodes(1, timeout=15)
            for key in (identity.id, _long_id_key(identity)):
                await poll_until(lambda key=key: real.get(key, value_type=8), timeout=15)
        for key in (identity.id, _long_id_key(identity)):
            values = await real.get(key, value_type=8)
            assert [(v["id"], v["type"], v["owner"]) for v in values] == [(1, 8, None)]
            assert Certificate.from_pem(values[0]["data"]).der == identity.certificate.der
