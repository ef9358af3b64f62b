"""DHT values (OpenDHT's ``Value``), their msgpack form, types and queries."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

from trio_dht.infohash import HASH_LEN, InfoHash
from trio_dht.wire.msgpack_codec import packb, unpackb

MAX_VALUE_SIZE = 64 * 1024
"""Largest value a node stores (data + signature + cypher + utype + push type), as OpenDHT."""


@dataclass(frozen=True, slots=True)
class ValueType:
    """A registered value type: its id, name and lifetime in seconds."""

    id: int
    name: str
    expiration: float


VALUE_TYPES: dict[int, ValueType] = {
    t.id: t
    for t in (
        ValueType(0, "User Data", 10 * 60),
        ValueType(1, "DHT message", 5 * 60),
        ValueType(2, "Internet Service Announcement", 15 * 60),
        ValueType(3, "IM message", 5 * 60),
        ValueType(4, "Certificate trust request", 7 * 24 * 3600),
        ValueType(5, "ICE candidates", 60),
        ValueType(8, "Certificate", 7 * 24 * 3600),
    )
}
SECURED_TYPES = frozenset({0, 1, 3, 4, 5})
"""Types whose store and edit policies OpenDHT's SecureDht wraps (signature checks, signed edits only)."""


def type_expiration(type_id: int) -> float:
    """Lifetime of a value of this type, in seconds (unknown types live as User Data)."""
    vt = VALUE_TYPES.get(type_id)
    return vt.expiration if vt else VALUE_TYPES[0].expiration


def random_value_id() -> int:
    """A random non-zero 64-bit value id (from Python's seeded PRNG, as OpenDHT draws its ids from a seeded
    mt19937: ids are public and need no secrecy, and reading the OS's CSPRNG costs a system call each)."""
    while True:
        vid = random.getrandbits(64)
        if vid:
            return vid


class InvalidValue(ValueError):
    """A msgpack object that is not a valid OpenDHT value."""


def _bin(obj: Any, what: str) -> bytes:
    if isinstance(obj, bytes):
        return obj
    if isinstance(obj, str):
        return obj.encode("utf-8", "surrogateescape")
    if isinstance(obj, list | tuple) and all(isinstance(b, int) and 0 <= b < 256 for b in obj):
        return bytes(obj)
    raise InvalidValue(f"{what} is not binary")


_UINT64 = (1 << 64) - 1


def _uint(obj: Any, what: str, bits: int) -> int:
    if type(obj) is not int or not 0 <= obj < (1 << bits):
        raise InvalidValue(f"{what} is not a uint{bits}")
    return obj


@dataclass(eq=False, slots=True)
class Value:
    """One value stored under a key.

    ``id`` 0 means "not yet assigned": :meth:`Node.put` picks a random one.
    ``owner`` is the DER SubjectPublicKeyInfo of a signed value's key; ``cypher`` holds an encrypted value's
    ciphertext (then ``data`` is empty). ``prio`` and ``push_type`` are hints for push notifications only.
    """

    data: bytes = b""
    type: int = 0
    id: int = 0
    seq: int = 0
    owner: bytes | None = None
    recipient: bytes | None = None
    signature: bytes = b""
    cypher: bytes = b""
    utype: str = ""
    prio: int = 0
    push_type: str = ""
    _packed: bytes | None = field(default=None, repr=False, compare=False)
    _json: bytes | None = field(default=None, init=False, repr=False, compare=False)
    _json_expired: bytes | None = field(default=None, init=False, repr=False, compare=False)
    """The proxy's JSON lines for this value, live and expired (cached by ``value_line``; not copied by
    ``dataclasses.replace``)."""

    # -- identity --------------------------------------------------------------------------------

    @property
    def is_signed(self) -> bool:
        return self.owner is not None and bool(self.signature)

    @property
    def is_encrypted(self) -> bool:
        return bool(self.cypher)

    @property
    def owner_id(self) -> InfoHash | None:
        """SHA-1 of the owner's public key (OpenDHT's key id), or None for unsigned values."""
        return InfoHash(hashlib.sha1(self.owner).digest()) if self.owner is not None else None

    def content_key(self) -> tuple:
        """What OpenDHT compares to tell a re-put (same content) from an edit."""
        if self.cypher:
            return (self.cypher,)
        return (self.owner, self.recipient, self.type, self.data, self.utype, self.seq, self.signature)

    def same_content(self, other: Value) -> bool:
        return self.content_key() == other.content_key()

    @property
    def size(self) -> int:
        """Bytes counted against storage limits (data, signature, cypher, utype, push type)."""
        return (
            len(self.data)
            + len(self.signature)
            + len(self.cypher)
            + len(self.utype.encode())
            + len(self.push_type.encode())
        )

    # -- msgpack --------------------------------------------------------------------------------

    def body(self) -> dict[str, Any]:
        """The body map in OpenDHT's key order; for signed values these are the signed bytes."""
        body: dict[str, Any] = {}
        if self.owner is not None:
            body["seq"] = self.seq
            body["owner"] = self.owner
            if self.recipient is not None:
                body["to"] = self.recipient
        body["type"] = self.type
        body["data"] = self.data
        if self.utype:
            body["utype"] = self.utype
        return body

    def signed_bytes(self) -> bytes:
        """The exact bytes an owner signs (RSA PKCS#1 v1.5, SHA-512)."""
        return packb(self.body())

    def to_wire(self) -> dict[str, Any]:
        """The Value map as it travels in ``values`` arrays."""
        dat: Any
        if self.cypher:
            dat = self.cypher
        else:
            dat = {"body": self.body()}
            if self.owner is not None:
                dat["sig"] = self.signature
        obj: dict[str, Any] = {"id": self.id, "dat": dat}
        if self.prio:
            obj["p"] = self.prio
        if self.push_type:
            obj["pt"] = self.push_type
        return obj

    def packed(self) -> bytes:
        """Serialised Value (cached: values are not mutated once stored)."""
        if self._packed is None:
            self._packed = packb(self.to_wire())
        return self._packed

    @classmethod
    def from_wire(cls, obj: Any) -> Value:
        """Parse a Value map; raises :class:`InvalidValue` on anything OpenDHT would refuse."""
        if not isinstance(obj, dict) or len(obj) < 2:
            raise InvalidValue("a value is a map of at least 2 entries")
        if "id" not in obj or "dat" not in obj:
            raise InvalidValue("a value needs id and dat")
        vid = obj["id"]
        if type(vid) is not int or not 0 <= vid <= _UINT64:
            raise InvalidValue("value id is not a uint64")
        dat = obj["dat"]
        if isinstance(dat, bytes):
            v = cls(id=vid, cypher=dat)
        elif isinstance(dat, dict):
            body = dat.get("body")
            if not isinstance(body, dict) or "data" not in body or "type" not in body:
                raise InvalidValue("a value body needs data and type")
            data = body["data"]
            if type(data) is not bytes:
                data = _bin(data, "data")
            type_ = body["type"]
            if type(type_) is not int or not 0 <= type_ <= 0xFFFF:
                raise InvalidValue("type is not a uint16")
            v = cls(data, type_, vid)
            utype = body.get("utype")
            if utype is not None:
                v.utype = utype.decode("utf-8", "replace") if isinstance(utype, bytes) else str(utype)
            if "owner" in body:
                owner = body["owner"]
                v.owner = _bin(owner, "owner")
                if "seq" not in body or "sig" not in dat:
                    raise InvalidValue("a signed value needs seq and sig")
                v.seq = _uint(body["seq"], "seq", 16)
                v.signature = _bin(dat["sig"], "sig")
                to = body.get("to")
                if to is not None:
                    to = _bin(to, "to")
                    if len(to) != HASH_LEN:
                        raise InvalidValue("to is not 20 bytes")
                    v.recipient = to
        else:
            raise InvalidValue("dat is neither a map nor binary")
        if len(obj) > 2:
            prio = obj.get("p")
            if prio is not None:
                v.prio = _uint(prio, "priority", 32)
            pt = obj.get("pt")
            if isinstance(pt, str):
                v.push_type = pt
        return v

    @classmethod
    def unpack(cls, data: bytes) -> Value:
        """Parse a serialised Value (as carried by fragments)."""
        try:
            obj = unpackb(data)
        except ValueError as exc:
            raise InvalidValue(f"undecodable value: {exc}") from None
        v = cls.from_wire(obj)
        v._packed = bytes(data)
        return v


# -- queries ------------------------------------------------------------------------------------------------

FIELD_ID = 1
FIELD_TYPE = 2
FIELD_OWNER = 3
FIELD_SEQ = 4
FIELD_UTYPE = 5
_KNOWN_FIELDS = frozenset({FIELD_ID, FIELD_TYPE, FIELD_OWNER, FIELD_SEQ, FIELD_UTYPE})


@dataclass(frozen=True, slots=True)
class Query:
    """A get/listen filter: ``select`` field ids and ``where`` (field, value) equalities, all ANDed."""

    select: tuple[int, ...] = ()
    where: tuple[tuple[int, Any], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.select or self.where)

    def matches(self, value: Value) -> bool:
        for f, want in self.where:  # noqa: SIM110 (all() leaves a generator unfinished: a GeneratorExit)
            if _field_value(value, f) != want:
                return False
        return True

    def to_wire(self) -> dict[str, Any]:
        return {"s": list(self.select), "w": [{"f": f, "v": v} for f, v in self.where]}

    @classmethod
    def from_wire(cls, obj: Any) -> Query:
        """Parse ``{"s": [...], "w": [...]}``; both keys are required, as in OpenDHT."""
        if (
            not isinstance(obj, dict)
            or not isinstance(obj.get("s"), list)
            or not isinstance(obj.get("w"), list)
        ):
            raise InvalidValue("a query is {s: [...], w: [...]}")
        select = []
        for f in obj["s"]:
            if type(f) is not int or f not in _KNOWN_FIELDS:
                raise InvalidValue("bad select field")
            select.append(f)
        where = []
        for item in obj["w"]:
            if not isinstance(item, dict) or type(item.get("f")) is not int or "v" not in item:
                raise InvalidValue("bad where entry")
            f, v = item["f"], item["v"]
            if f == FIELD_ID:
                v = _uint(v, "where id", 64)
            elif f == FIELD_TYPE:
                v = _uint(v, "where type", 16)
            elif f == FIELD_OWNER:
                v = _bin(v, "where owner")
                if len(v) != HASH_LEN:
                    raise InvalidValue("where owner is not 20 bytes")
                v = InfoHash(v)
            elif f == FIELD_UTYPE:
                v = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                if not isinstance(v, str):
                    raise InvalidValue("where utype is not text")
            else:
                raise InvalidValue("this where field cannot be serialised")
            where.append((f, v))
        return cls(tuple(sorted(set(select))), tuple(where))

    def field_items(self, value: Value) -> list[Any]:
        """One item per selected field (ascending), as ``fileds`` replies pack them (OwnerPk: full key)."""
        return [
            (value.owner if value.owner is not None else bytes(HASH_LEN))
            if f == FIELD_OWNER
            else _field_value(value, f)
            for f in self.select
        ]


def _field_value(value: Value, f: int) -> Any:
    """A value's field as a Where compares it (the owner by key id)."""
    if f == FIELD_ID:
        return value.id
    if f == FIELD_TYPE:
        return value.type
    if f == FIELD_OWNER:
        return value.owner_id
    if f == FIELD_SEQ:
        return value.seq
    return value.utype
