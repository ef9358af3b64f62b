"""The records between the proxy's front end and its HTTP worker processes (sans-IO).

A worker (:mod:`~trio_dht.proxy.http_worker`) accepts the plain-HTTP connections and reads their requests.
It relays each SUBSCRIBE and UNSUBSCRIBE on a key route to the front end, which owns the subscriptions and
the DHT node, and writes the response the front end sends back. Any other request hands its connection over,
with the bytes already read, and the front end serves it from then on.

The channel is an ``AF_UNIX`` ``SOCK_SEQPACKET`` socket pair: a record is one ``send`` and one ``recv``,
never split or merged, so a record can batch the frames of one pass of a loop and a hand-over record can
carry its socket (``SCM_RIGHTS``). A record is frames, each a header ``<IIB``: payload length, request id,
kind; then the payload:

* :data:`RELAY` (worker to front end): method (1 byte: SUBSCRIBE 1, UNSUBSCRIBE 2), ``Connection: close``
  (1 byte), the key (20 bytes), the client's address (1 byte of length, then ASCII), the body.
* :data:`RESPONSE` (front end to worker): close after it (1 byte), the HTTP response, or its end: a response
  longer than :data:`MAX_RECORD` comes first in :data:`PART` frames of the same id (payload: its bytes).
* :data:`HAND_OVER` (worker to front end, with one file descriptor, alone in its record): the bytes read.
* :data:`STATS` (worker, when they changed): its counts of the limits reached, each an unsigned 64-bit
  integer, in the order of :meth:`~trio_dht.proxy.conn_limits.HttpCounters.as_list`.
* :data:`READY` (worker, once it serves) and :data:`DRAIN` (front end: stop accepting, close idle
  connections, exit once every response is sent): no payload.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import NamedTuple

RELAY, RESPONSE, HAND_OVER, READY, DRAIN, PART, STATS = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, UNSUBSCRIBE = 1, 2
METHOD_NAMES = {SUBSCRIBE: "SUBSCRIBE", UNSUBSCRIBE: "UNSUBSCRIBE"}

MAX_RECORD = 64 * 1024
"""A writer starts a new record beyond this many bytes; no frame is much larger (a hand-over's bytes are at
most a read and a request head). A record must fit the socket's send buffer: :func:`socket_pair` sizes it."""
BATCH = 4
"""Each side sends a record every this many frames, and at the end of each pass of its loop. Sending only at
the end of a pass moves the requests of a load client in lockstep, each stage waiting for the whole batch of
the one before (cores then idle); a record per frame costs a system call each way. Four is the best of the
batch sizes measured under SUBSCRIBE load (1, 2, 4, 8)."""
RECEIVE_SIZE = 4 * MAX_RECORD
"""Every record fits in this many bytes (none is much over :data:`MAX_RECORD`); each end receives into one
buffer of this size, reused (a fresh quarter-megabyte object per record fragments the heap)."""
MAX_RELAYED_BODY = 16 * 1024
"""A larger SUBSCRIBE body is not relayed: its connection is handed over (and answered, or refused with
413, by the front end)."""

_HEADER = struct.Struct("<IIB")
_RELAY_HEAD = struct.Struct("<BB20sB")


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """A non-blocking channel: (the front end's end, the worker's end)."""
    ends = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for end in ends:
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 * MAX_RECORD)
        end.setblocking(False)
    return ends


class BadRecord(ValueError):
    """A record that does not parse: the channel's peer is not this module's."""


class Frame(NamedTuple):
    kind: int
    request_id: int
    payload: bytes


class Relayed(NamedTuple):
    """A request relayed by a worker."""

    method: int
    close: bool
    key: bytes
    client: str
    body: bytes


def frame(kind: int, request_id: int = 0, payload: bytes = b"") -> bytes:
    return _HEADER.pack(len(payload), request_id, kind) + payload


def relay_frame(request_id: int, method: int, close: bool, key: bytes, client: str, body: bytes) -> bytes:
    address = client.encode("ascii", "replace")[:255]
    head = _RELAY_HEAD.pack(method, close, key, len(address))
    return frame(RELAY, request_id, head + address + body)


def response_frames(request_id: int, close: bool, response: bytes) -> list[bytes]:
    """A response as frames of at most :data:`MAX_RECORD` bytes: :data:`PART` ones, then its
    :data:`RESPONSE`."""
    flag = b"\x01" if close else b"\x00"
    cut = (len(response) - 1) // MAX_RECORD * MAX_RECORD  # where the last (non-empty) piece starts
    parts = [frame(PART, request_id, response[i : i + MAX_RECORD]) for i in range(0, cut, MAX_RECORD)]
    parts.append(frame(RESPONSE, request_id, flag + response[cut:]))
    return parts


def frames(record: bytes | memoryview) -> Iterator[Frame]:
    """The frames of a record, in order; :class:`BadRecord` at the first that does not fit."""
    view = memoryview(record)
    offset, size = 0, len(record)
    while offset < size:
        if size - offset < _HEADER.size:
            raise BadRecord("a truncated frame header")
        length, request_id, kind = _HEADER.unpack_from(view, offset)
        offset += _HEADER.size
        if length > size - offset:
            raise BadRecord("a frame longer than its record")
        yield Frame(kind, request_id, bytes(view[offset : offset + length]))
        offset += length


def parse_relayed(payload: bytes) -> Relayed:
    if len(payload) < _RELAY_HEAD.size:
        raise BadRecord("a truncated relayed request")
    method, close, key, address_length = _RELAY_HEAD.unpack_from(payload)
    start = _RELAY_HEAD.size + address_length
    if method not in METHOD_NAMES or len(payload) < start:
        raise BadRecord("a relayed request of an unknown method, or truncated")
    client = payload[_RELAY_HEAD.size : start].decode("ascii", "replace")
    return Relayed(method, bool(close), key, client, payload[start:])


def stats_frame(counts: list[int]) -> bytes:
    return frame(STATS, 0, struct.pack(f"<{len(counts)}Q", *counts))


def parse_stats(payload: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(payload) // 8}Q", payload[: len(payload) // 8 * 8]))


def parse_response(payload: bytes) -> tuple[bool, bytes]:
    """``(close after it, the response bytes)``."""
    if not payload:
        raise BadRecord("an empty response frame")
    return payload[0] == 1, payload[1:]


class RecordWriter:
    """Frames gathered into records of at most about :data:`MAX_RECORD` bytes, for one send each."""

    def __init__(self) -> None:
        self._records: list[bytes] = []
        self._current: list[bytes] = []
        self._size = 0
        self.frames = 0

    def add(self, data: bytes) -> None:
        if self._current and self._size + len(data) > MAX_RECORD:
            self._seal()
        self._current.append(data)
        self._size += len(data)
        self.frames += 1

    def take(self) -> list[bytes]:
        """The records gathered so far (the writer is then empty)."""
        if self._current:
            self._seal()
        records, self._records = self._records, []
        self.frames = 0
        return records

    def __bool__(self) -> bool:
        return bool(self._current or self._records)

    def _seal(self) -> None:
        self._records.append(b"".join(self._current))
        self._current, self._size = [], 0
