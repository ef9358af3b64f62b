"""Decoding and encoding of OpenDHT datagrams (one msgpack map each).

Decoding is as strict as OpenDHT's parser where a real node drops the datagram (BIN-20 ids, boolean ``s``,
STR ``v``, queries with both ``s`` and ``w``...), and as lenient where it is lenient (unknown keys, STR or BIN
``t``). Any datagram OpenDHT would drop raises :class:`MalformedMessage`; callers count it and move on.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from trio_dht.infohash import HASH_LEN, InfoHash
from trio_dht.value import InvalidValue, Query, Value
from trio_dht.wire.compact import MalformedRecords, NodeRecord, pack_nodes, unpack_nodes
from trio_dht.wire.msgpack_codec import packb, unpackb

USER_AGENT = "trio_dht"
METHODS = frozenset({"ping", "find", "get", "put", "refresh", "listen", "update"})

# Values go inline below these limits; otherwise every value of the message is sent as fragments.
INLINE_MAX_BYTES = 600
INLINE_MAX_VALUES = 50
FRAGMENT_SIZE = 1280


class MalformedMessage(ValueError):
    """A datagram a real OpenDHT node would drop."""


class Kind(enum.Enum):
    REQUEST = "q"
    REPLY = "r"
    ERROR = "e"
    FRAGMENT = "p"
    LEGACY_UPDATE = "u"


class ErrorCode(enum.IntEnum):
    """Error codes OpenDHT sends on the wire."""

    INCOMPLETE = 203
    UNAUTHORIZED = 401
    NOT_FOUND = 404


@dataclass(slots=True)
class Message:
    """One decoded datagram. Fields not present in the datagram keep their empty defaults."""

    kind: Kind
    tid: int
    method: str = ""
    sender: InfoHash | None = None
    network: int = 0
    is_client: bool = False
    agent: str | None = None
    info_hash: InfoHash | None = None
    target: InfoHash | None = None
    token: bytes | None = None
    value_id: int | None = None
    nodes4: list[NodeRecord] = field(default_factory=list)
    nodes6: list[NodeRecord] = field(default_factory=list)
    created: int | None = None
    requester_ip: bytes | None = None
    values: list[Value] = field(default_factory=list)
    value_sizes: list[int] = field(default_factory=list)
    has_values: bool = False
    expired: list[int] = field(default_factory=list)
    refreshed: list[int] = field(default_factory=list)
    fields: tuple[tuple[int, ...], list[Any]] | None = None
    want: list[int] | None = None
    sid: int | None = None
    listen_version: int | None = None
    query: Query | None = None
    error_code: int = 0
    error_text: str = ""
    parts: dict[int, tuple[int, bytes]] = field(default_factory=dict)

    @property
    def fragmented(self) -> bool:
        """A header announcing values that follow as fragments."""
        return bool(self.value_sizes)


# -- decoding -----------------------------------------------------------------------------------------------

_UINT32 = 0xFFFFFFFF
_UINT64 = (1 << 64) - 1
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_as_hash = partial(bytes.__new__, InfoHash)
"""InfoHash of bytes whose length is already checked (skips the check in ``InfoHash.__new__``)."""


def _hash(obj: Any, what: str) -> InfoHash:
    if type(obj) is not bytes or len(obj) != HASH_LEN:
        raise MalformedMessage(f"{what} is not a 20-byte BIN")
    return _as_hash(obj)


def _blob(obj: Any, what: str) -> bytes:
    """BIN, or (as OpenDHT tolerates for tokens, node lists and data) STR or an array of small ints."""
    if type(obj) is bytes:
        return obj
    if type(obj) is str:
        return obj.encode("utf-8", "surrogateescape")
    if isinstance(obj, list) and all(type(b) is int and 0 <= b < 256 for b in obj):
        return bytes(obj)
    raise MalformedMessage(f"{what} is not binary")


def _uint(obj: Any, what: str, bits: int) -> int:
    if type(obj) is not int or not 0 <= obj < (1 << bits):
        raise MalformedMessage(f"{what} is not a uint{bits}")
    return obj


def _uint_list(obj: Any, what: str, bits: int) -> list[int]:
    if not isinstance(obj, list):
        raise MalformedMessage(f"{what} is not an array")
    return [_uint(x, what, bits) for x in obj]


def _tid(obj: Any) -> int:
    if type(obj) is int:
        return _uint(obj, "t", 32)
    if type(obj) in (bytes, str):
        raw = obj if type(obj) is bytes else obj.encode("utf-8", "surrogateescape")
        if len(raw) == 4:
            return int.from_bytes(raw, "big")
    raise MalformedMessage("t is not a uint32")


def _decode_values(msg: Message, raw: Any) -> None:
    if not isinstance(raw, list):
        raise MalformedMessage("values is not an array")
    msg.has_values = True
    # (raw[0] first: a generator left unfinished costs a GeneratorExit on Python 3.11)
    if raw and type(raw[0]) is int and all(type(x) is int for x in raw):
        msg.value_sizes = [_uint(x, "value size", 32) for x in raw]
        return
    for item in raw:
        try:
            msg.values.append(Value.from_wire(item))
        except InvalidValue:
            continue  # one bad value does not spoil the rest, as in OpenDHT


def _decode_body(msg: Message, body: Any, what: str) -> None:
    """The ``a``, ``r`` or ``u`` map."""
    if type(body) is not dict:
        raise MalformedMessage(f"{what} is not a map")
    sender = body.get("id")
    if type(sender) is not bytes or len(sender) != HASH_LEN:
        raise MalformedMessage(f"{what} has no 20-byte BIN id")
    msg.sender = _as_hash(sender)
    if len(body) == 1:
        return
    for key, val in body.items():
        if key == "id" or type(key) is not str:
            continue
        if key == "h":
            msg.info_hash = _hash(val, "h")
        elif key == "target":
            msg.target = _hash(val, "target")
        elif key == "token":
            msg.token = _blob(val, "token")
        elif key == "vid":
            msg.value_id = _uint(val, "vid", 64)
        elif key == "n4":
            try:
                msg.nodes4 = unpack_nodes(_blob(val, "n4"), v6=False)
            except MalformedRecords as exc:
                raise MalformedMessage(str(exc)) from None
        elif key == "n6":
            try:
                msg.nodes6 = unpack_nodes(_blob(val, "n6"), v6=True)
            except MalformedRecords as exc:
                raise MalformedMessage(str(exc)) from None
        elif key == "c":
            if type(val) is not int or not _INT64_MIN <= val <= _INT64_MAX:
                raise MalformedMessage("c is not an int64")
            msg.created = val
        elif key == "sa":
            if type(val) is not bytes:
                raise MalformedMessage("sa is not BIN")
            if len(val) in (4, 16):
                msg.requester_ip = val
        elif key == "values":
            _decode_values(msg, val)
        elif key == "exp":
            msg.expired = _uint_list(val, "exp", 64)
        elif key == "re":
            msg.refreshed = _uint_list(val, "re", 64)
        elif key == "fileds":
            if not isinstance(val, dict) or not isinstance(val.get("f"), list) or not val["f"]:
                raise MalformedMessage("fileds needs a non-empty f")
            if not isinstance(val.get("v"), list):
                raise MalformedMessage("fileds needs v")
            msg.fields = (tuple(sorted(set(_uint_list(val["f"], "fileds.f", 8)))), val["v"])
        elif key == "w":
            msg.want = _uint_list(val, "w", 32)
        elif key == "sid":
            msg.sid = _tid(val)
        elif key == "ve":
            msg.listen_version = _uint(val, "ve", 32)
        elif key == "q":
            try:
                msg.query = Query.from_wire(val)
            except InvalidValue as exc:
                raise MalformedMessage(str(exc)) from None


def _decode_parts(msg: Message, parts: Any) -> None:
    if not isinstance(parts, dict):
        raise MalformedMessage("p is not a map")
    for index, part in parts.items():
        if type(index) is not int or index < 0 or not isinstance(part, dict):
            raise MalformedMessage("bad fragment entry")
        offset = _uint(part.get("o"), "fragment offset", 32)
        msg.parts[index] = (offset, _blob(part.get("d"), "fragment data"))


def decode(datagram: bytes) -> Message:
    """Parse one datagram; raises :class:`MalformedMessage` for anything a real node would drop."""
    try:
        top = unpackb(datagram)
    except ValueError as exc:
        raise MalformedMessage(f"not msgpack: {type(exc).__name__}") from None
    if type(top) is not dict:
        raise MalformedMessage("not a map")
    get = top.get
    agent = get("v")
    if agent is not None and type(agent) is not str:
        raise MalformedMessage("v is not STR")
    network = get("n", 0)
    if type(network) is not int or not 0 <= network <= _UINT32:
        raise MalformedMessage("n is not a uint32")
    is_client = get("s", False)
    if type(is_client) is not bool:
        raise MalformedMessage("s is not a boolean")
    tid = get("t")
    if type(tid) is not int or not 0 <= tid <= _UINT32:
        tid = _tid(tid)  # a 4-byte BIN or STR, or malformed (None: no t)

    if "e" in top:
        err = top["e"]
        if not isinstance(err, list) or not err or type(err[0]) is not int:
            raise MalformedMessage("e is not [code, text]")
        msg = Message(Kind.ERROR, tid, "", None, network, is_client, agent)
        msg.error_code = err[0]
        msg.error_text = err[1] if len(err) > 1 and isinstance(err[1], str) else ""
        if "r" in top:
            _decode_body(msg, top["r"], "r")
        return msg
    if "r" in top:
        msg = Message(Kind.REPLY, tid, "", None, network, is_client, agent)
        _decode_body(msg, top["r"], "r")
        return msg
    if "p" in top:
        msg = Message(Kind.FRAGMENT, tid, "", None, network, is_client, agent)
        _decode_parts(msg, top["p"])
        return msg
    if "u" in top:
        msg = Message(Kind.LEGACY_UPDATE, tid, "", None, network, is_client, agent)
        _decode_body(msg, top["u"], "u")
        return msg
    kind = get("y", "q")
    if kind != "q":
        raise MalformedMessage(f"unexpected y {kind!r}")
    method = get("q")
    if type(method) is not str or method not in METHODS:
        raise MalformedMessage("unknown query")
    if "a" not in top:
        raise MalformedMessage("query without a")
    msg = Message(Kind.REQUEST, tid, method, None, network, is_client, agent)
    _decode_body(msg, top["a"], "a")
    return msg


# -- encoding -----------------------------------------------------------------------------------------------


def pack_values(values: list[Value]) -> tuple[list[Any], list[bytes]]:
    """The ``values`` field and, when too large to go inline, the serialised values to send as fragments."""
    packed = [v.packed() for v in values]
    if len(values) < INLINE_MAX_VALUES and sum(map(len, packed)) < INLINE_MAX_BYTES:
        return [v.to_wire() for v in values], []
    return [len(p) for p in packed], packed


def fragments(tid: int, packed_values: list[bytes], network: int = 0, is_client: bool = False) -> list[bytes]:
    """Fragment datagrams for serialised values, in order (the only order OpenDHT 2.4 accepts)."""
    out = []
    for index, blob in enumerate(packed_values):
        for offset in range(0, len(blob), FRAGMENT_SIZE):
            top: dict[str, Any] = {
                "y": "p",
                "t": tid,
                "p": {index: {"o": offset, "d": blob[offset : offset + FRAGMENT_SIZE]}},
            }
            if network:
                top["n"] = network
            if is_client:
                top["s"] = True
            out.append(packb(top))
    return out


_FIXMAP = [bytes((0x80 | entries,)) for entries in range(16)]
"""The one-byte header of a msgpack map, by its number of entries (below 16)."""


class Encoder:
    """Builds a node's outgoing datagrams (its id, network, client flag and agent are fixed).

    Replies, the datagrams a node sends most, are put together from bytes packed once: a msgpack map is its
    header followed by its packed keys and values, so only the body and the tid are packed per reply.
    """

    def __init__(self, node_id: InfoHash, network: int = 0, is_client: bool = False, agent: str = USER_AGENT):
        self.node_id = node_id
        self.network = network
        self.is_client = is_client
        self.agent = agent
        after_tid = {"y": "r", **self._trailer()}
        self._reply_head = _FIXMAP[2 + len(after_tid)] + packb("r")  # then the "r" map, "t", the rest
        self._reply_id = packb("id") + packb(node_id)
        self._reply_t = packb("t")
        self._reply_tail = packb(after_tid)[1:]  # its entries without the map header

    def _trailer(self) -> dict[str, Any]:
        """The keys every datagram ends with."""
        trailer: dict[str, Any] = {"v": self.agent}
        if self.network:
            trailer["n"] = self.network
        if self.is_client:
            trailer["s"] = True
        return trailer

    def _finish(self, top: dict[str, Any]) -> bytes:
        top.update(self._trailer())
        return packb(top)

    def request(self, tid: int, method: str, args: dict[str, Any]) -> bytes:
        """A query; ``args`` must not hold ``id`` (it is put first)."""
        return self._finish({"a": {"id": self.node_id, **args}, "q": method, "t": tid, "y": "q"})

    def request_with_values(
        self, tid: int, method: str, args: dict[str, Any], values: list[Value]
    ) -> list[bytes]:
        """A put or update carrying values: the request, then its fragments if any.

        ``values`` goes before ``c`` and ``token``, the order in which OpenDHT nodes pack a put and an update.
        """
        field_, packed = pack_values(values)
        head = {k: v for k, v in args.items() if k not in ("c", "token")}
        tail = {k: args[k] for k in ("c", "token") if k in args}
        args = {**head, "values": field_, **tail}
        return [self.request(tid, method, args), *fragments(tid, packed, self.network, self.is_client)]

    def reply(self, tid: int, body: dict[str, Any]) -> bytes:
        """The bytes of ``{"r": {"id": node_id, **body}, "t": tid, "y": "r", "v": agent, ...}``."""
        if len(body) >= 15:
            return self._finish({"r": {"id": self.node_id, **body}, "t": tid, "y": "r"})
        return b"".join(
            (
                self._reply_head,
                _FIXMAP[1 + len(body)],
                self._reply_id,
                packb(body)[1:],  # the body's entries, after id
                self._reply_t,
                packb(tid),
                self._reply_tail,
            )
        )

    def reply_with_values(self, tid: int, body: dict[str, Any], values: list[Value]) -> list[bytes]:
        field_, packed = pack_values(values)
        body = {**body, "values": field_}
        return [self.reply(tid, body), *fragments(tid, packed, self.network, self.is_client)]

    def error(self, tid: int, code: int, text: str) -> bytes:
        return self._finish({"e": [code, text], "r": {"id": self.node_id}, "t": tid, "y": "e"})

    # Convenience builders for the reply bodies that carry nodes.
    @staticmethod
    def nodes_body(
        requester_ip: bytes, n4: list[NodeRecord], n6: list[NodeRecord], token: bytes | None
    ) -> dict:
        body: dict[str, Any] = {"sa": requester_ip}
        if n4:
            body["n4"] = pack_nodes(n4, v6=False)
        if n6:
            body["n6"] = pack_nodes(n6, v6=True)
        if token is not None:
            body["token"] = token
        return body
