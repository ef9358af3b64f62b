"""A node's identity operations, as OpenDHT's ``SecureDht`` layers them over its ``Dht``: signed and
encrypted puts, the certificate the node announces, and finding others' certificates and keys.

The certificate is announced as a permanent, unsigned value of type 8 with id 1 and the PEM chain as data, at
the key id (where OpenDHT 2.x looks) and at SHA-1 of the long key id (where OpenDHT 4.x looks).

:class:`SecureOperations` is a base of :class:`~trio_dht.node.dht.DhtNode`, which owns the network (``get``,
``put``, the searches) and the identity. The ``cryptography`` package is needed only by the operations that
use an identity or parse a certificate, so it is imported when one is first used.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import replace
from typing import TYPE_CHECKING

import trio

from trio_dht.api import NoIdentity, RecipientNotFound
from trio_dht.infohash import HASH_LEN, InfoHash
from trio_dht.node.storage import CERTIFICATE_TYPE
from trio_dht.value import FIELD_ID, FIELD_TYPE, Query, Value, random_value_id
from trio_dht.wire.message import Message

if TYPE_CHECKING:
    from trio_dht.crypto import Certificate, Identity, PublicKey
    from trio_dht.node.protocol import NodeProtocol
    from trio_dht.node.search_driver import Searches

CERTIFICATE_VALUE_ID = 1
"""The value id of a node's certificate announcement."""
PUBLIC_KEY_CACHE = 256
"""Recipients' public keys kept after a certificate lookup (the least recently used go first)."""
LONG_ID_LEN = 32


def identity_node_id(identity: Identity) -> InfoHash:
    """The node id OpenDHT takes for a node with this identity: SHA-1("node:" + hex key id)."""
    return InfoHash(hashlib.sha1(b"node:" + identity.id.hex().encode()).digest())


def certificate_keys(key_id: InfoHash | None, long_id: bytes | None = None) -> list[InfoHash]:
    """Where a certificate is announced and looked up: the key id (where OpenDHT 2.x puts it), and SHA-1 of
    the long key id (where 3.5 and later do), each if known."""
    keys = [key_id] if key_id is not None else []
    if long_id is not None:
        keys.append(InfoHash(hashlib.sha1(long_id).digest()))
    return keys


class SecureOperations:
    """The identity operations of a node (see the module's docstring)."""

    _identity: Identity | None
    protocol: NodeProtocol
    searches: Searches

    def __init__(self, identity: Identity | None) -> None:
        self._identity = identity
        self._public_keys: OrderedDict[bytes, PublicKey] = OrderedDict()

    @property
    def identity(self) -> Identity | None:
        """The key and certificate the node signs with, or None."""
        return self._identity

    if TYPE_CHECKING:

        async def put(self, key: InfoHash, value: Value, *, permanent: bool = False) -> bool: ...

        async def get(self, key: InfoHash, query: Query | None = None) -> list[Value]: ...

    async def _announce_certificate(self, identity: Identity, bootstrapped: trio.Event) -> None:
        """Store our certificate here at once (gets that reach this node find it), then, once bootstrapped,
        put it permanently at its keys."""
        value = Value(identity.certificate.pem, type=CERTIFICATE_TYPE, id=CERTIFICATE_VALUE_ID)
        keys = certificate_keys(identity.id, identity.public_key.long_id)
        for key in keys:
            self.protocol.store(key, value, trio.current_time(), local=True, permanent=True)
        await bootstrapped.wait()
        for key in keys:
            await self.put(key, value, permanent=True)

    def _require_identity(self, operation: str) -> Identity:
        if self._identity is None:
            raise NoIdentity(f"{operation} needs a node with an identity (open_node(identity=...))")
        return self._identity

    async def put_signed(self, key: InfoHash, value: Value, *, permanent: bool = False) -> bool:
        """Sign ``value`` with the node's identity and :meth:`put` it, as OpenDHT's ``putSigned``.

        The values of its id under ``key`` are first fetched from the network (and this node's storage):
        its ``seq`` becomes one more than the highest of those signed by us (with a valid signature), so
        the put replaces them. A value without an id gets a random one. Raises :class:`NoIdentity` on a
        node without an identity, ValueError for an encrypted value or a seq past 65535.
        """
        identity = self._require_identity("put_signed")
        if value.cypher:  # before the network round that sign_value's own check would follow
            raise ValueError("an encrypted value cannot be signed")
        if not value.id:
            value = replace(value, id=random_value_id(), _packed=None)
        found = await self._values_of_id(key, value.id)
        owner = identity.public_key.der
        ours = [
            v for v in found if v.owner == owner and v.seq >= value.seq and self.protocol.verifier.verify(v)
        ]
        return await self.put(key, identity.sign_value(value, previous=ours), permanent=permanent)

    async def put_encrypted(
        self, key: InfoHash, value: Value, to: PublicKey | bytes, *, permanent: bool = False
    ) -> bool:
        """Sign ``value`` for ``to`` and encrypt it for it, then :meth:`put` it, as OpenDHT's
        ``putEncrypted``; only ``to``'s key can read it (a get there returns it decrypted).

        ``to`` is a :class:`~trio_dht.crypto.PublicKey`, or the 20-byte key id or 32-byte long id of one,
        whose certificate is then found on the DHT (:meth:`find_public_key`). Raises :class:`NoIdentity`
        on a node without an identity, :class:`RecipientNotFound` when no certificate is found, ValueError
        for a value already encrypted.
        """
        identity = self._require_identity("put_encrypted")
        if value.cypher:
            raise ValueError("the value is already encrypted")
        from trio_dht.crypto import PublicKey

        if isinstance(to, PublicKey):
            recipient: PublicKey | None = to
        elif isinstance(to, bytes):
            recipient = await self.find_public_key(to)
        else:
            raise TypeError(f"to is a PublicKey, a key id or a long id, not {type(to).__name__}")
        if recipient is None:
            raise RecipientNotFound(f"no certificate of key {bytes(to).hex()} found on the DHT")
        if not value.id:
            value = replace(value, id=random_value_id(), _packed=None)
        return await self.put(key, identity.encrypt_value(value, recipient), permanent=permanent)

    async def find_public_key(self, key_id: bytes) -> PublicKey | None:
        """The public key with this key id (20 bytes) or long id (32 bytes): ours, one found before, or the
        one in a certificate found on the DHT (:meth:`find_certificate`); None if there is none."""
        if len(key_id) not in (HASH_LEN, LONG_ID_LEN):
            raise ValueError(f"a key id is {HASH_LEN} bytes and a long id {LONG_ID_LEN}, not {len(key_id)}")
        known = self._public_keys.get(key_id)
        if known is not None:
            self._public_keys.move_to_end(key_id)
            return known
        own = self._identity.public_key if self._identity is not None else None
        if own is not None and key_id in (own.id, own.long_id):
            return own
        if len(key_id) == LONG_ID_LEN:
            cert = await self.find_certificate(long_id=key_id)
        else:
            cert = await self.find_certificate(InfoHash(key_id))
        if cert is None:
            return None
        self._public_keys[bytes(key_id)] = cert.public_key
        if len(self._public_keys) > PUBLIC_KEY_CACHE:
            self._public_keys.popitem(last=False)
        return cert.public_key

    async def _values_of_id(self, key: InfoHash, value_id: int) -> list[Value]:
        """Every version of value ``value_id`` under ``key``: this node's and every reply's (a get keeps the
        first of each id; a signed put needs the highest seq)."""
        query = Query(where=((FIELD_ID, value_id),))
        found = list(self.storage.get(key, query))

        def on_reply(_sn: object, reply: Message) -> None:
            found.extend(v for v in reply.values if v.id == value_id)

        args = {"h": key, "q": query.to_wire()}
        await self.searches.each_family(lambda v6: self.searches.search(key, v6, "get", args, on_reply))
        return found

    async def find_certificate(
        self, key_id: InfoHash | None = None, long_id: bytes | None = None
    ) -> Certificate | None:
        """The certificate of the public key with this key id and/or long id, from the certificates announced
        at :func:`certificate_keys`, or None. A value that is not a readable certificate of that key is
        skipped. Needs the ``cryptography`` package."""
        from trio_dht.crypto import Certificate, CryptoError

        if key_id is None and long_id is None:
            raise ValueError("find_certificate needs a key id or a long id")
        query = Query(where=((FIELD_TYPE, CERTIFICATE_TYPE),))
        for key in certificate_keys(key_id, long_id):
            for value in await self.get(key, query):
                try:
                    cert = Certificate.from_pem(value.data)
                except CryptoError:
                    continue
                if (key_id is None or cert.id == key_id) and (long_id is None or cert.long_id == long_id):
                    return cert
        return None
