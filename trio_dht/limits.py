"""Every budget a stranger's input is held to, in one frozen :class:`Limits`.

The design rule: whatever a peer can make us keep or wait for has a bound here. Every per-peer table has a
cap and an eviction rule, every wait on a peer a deadline, every queue a bound and an age limit; memory that
an unsolicited datagram can cost is proportional to its own size; nothing retries a persistent error without
pause. Reaching a limit is a counted drop or a clear error (HTTP 429/408/413/503), never a crash.

The defaults are meant for a public node. Operators change any of them with ``--limit NAME=VALUE``
(repeatable; ``trio-dht --limits`` lists them with their defaults); library users pass ``Limits(...)``.
Durations take the command line's forms (``90``, ``30s``, ``2m``), sizes a ``K``/``M``/``G`` suffix
(powers of 1024).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True, slots=True)
class Limits:
    """The budgets; each field's docstring says what reaching it does. Durations are seconds."""

    # -- UDP node ---
    udp_reassembly_bytes: int = 16 * MIB
    """Bytes held, in all, by fragmented messages being reassembled; a fragment past it is dropped."""
    udp_reassembly_bytes_per_source: int = 1 * MIB
    """Bytes held by fragmented messages from one source (IPv4 address, IPv6 /64; loopback per port)."""
    udp_reassembly_messages: int = 4096
    """Fragmented messages being reassembled at once (requests from others at most half, so replies to our
    own requests keep room); a new one past it is dropped (counted) once stale ones are swept."""
    udp_confirm_queue: int = 1024
    """Nodes waiting for a confirmation ping; new ones past it are not queued (counted)."""
    udp_confirm_in_flight: int = 64
    """Confirmation pings awaiting their reply at once; the queue waits for a free slot."""
    udp_rate_sources: int = 65536
    """Sources the UDP rate limiter tracks; when full, a quarter is freed at once (idle, light ones first)."""
    udp_amplification: float = 3.0
    """Bytes sent to an address not yet validated, as a multiple of the bytes received from it."""
    udp_validated_addresses: int = 65536
    """Addresses remembered as validated (they answered us) or counted for amplification; LRU eviction."""
    udp_listeners: int = 100000
    """Remote nodes' listens held in all; a new one past it is refused with an error (counted)."""
    udp_listeners_per_source: int = 4096
    """Remote nodes' listens held per source (IPv4 address, IPv6 /64); a new one past it is refused."""
    rsa_max_bits: int = 4096
    """Largest RSA key accepted on a signed value (public exponent 65537 only)."""
    verify_cache: int = 16384
    """Signature checks remembered per (key, value); least recently used evicted."""
    decrypts_per_second: float = 50.0
    """RSA private-key operations a node with an identity spends decrypting values (a token bucket with a
    second's worth of burst); a value past it is handed over opaque and counted, and decrypted when seen
    again with budget."""
    decrypt_cache_bytes: int = 8 * MIB
    """Decrypted values remembered by their cypher (also at most 4,096 cyphers); least recently used
    evicted."""

    # -- HTTP proxy ---
    http_head_timeout: float = 10.0
    """From a request's first byte to the end of its head (also a TLS handshake); then a 408 and the
    connection is closed, however the bytes trickle in."""
    http_body_timeout: float = 30.0
    """From the end of a request's head to the end of its body; then a 408 and the connection is closed."""
    http_send_timeout: float = 30.0
    """How long a response may wait, once the socket stops taking it, for a client that does not read; then
    the connection is closed."""
    http_send_buffer: int = 4 * MIB
    """Response bytes held for a client that does not read (a GET's values, a listen stream's lines, a
    relayed response); past it the connection is closed."""
    http_connections_per_ip: int = 256
    """Open connections per client address (IPv6 per /64, loopback per address), in each process that
    accepts them: the front end and each HTTP worker count their own, so one address may hold up to
    (``http_workers`` + 1) x this in all. The next one is closed at accept."""
    http_listens_per_ip: int = 64
    """Listen streams per client address (IPv6 per /64, loopback per address); the next is answered 429."""
    http_rate_clients: int = 100_000
    """Clients whose request rate is tracked (the per-IP rate limit); when full, a quarter is forgotten in
    one pass, oldest first, those whose buckets have refilled before busy ones (counted)."""

    # -- push ---
    push_request_timeout: float = 10.0
    """One gateway request as a whole (connect, send, the whole response); past it the request is a
    temporary failure (retried with backoff) and counted."""
    push_response_bytes: int = 64 * KIB
    """Response body read from a gateway; past it reading stops, the connection is closed and the request
    fails (counted)."""
    push_concurrency: int = 16
    """Gateway requests in flight per gateway kind (gorush, UnifiedPush, ...); within a kind, one request at a
    time per lane (a gorush connection, a UnifiedPush endpoint host)."""
    push_one_off_attempts: int = 5
    """Failed attempts after which a one-off push (pingPush, a permanent put's warning) is dropped
    (counted)."""
    push_max_age: float = 120.0
    """A push still queued this long after its newest news is dropped when its turn comes, or at once when its
    lane backs off past that age (counted)."""
    push_queue: int = 262144
    """Pushes queued in all (waiting, backed off or parked; one per subscription and kind at most); a new one
    past it is dropped (counted)."""
    push_lane_queue: int = 65536
    """Pushes queued for one lane (a UnifiedPush endpoint host, a gorush connection); a new one past it is
    dropped (counted), so one host cannot take the whole queue."""
    push_one_off_queue: int = 4096
    """One-off pushes (pingPush, permanent put warnings) queued at once; a new one past it is dropped
    (counted)."""
    subscriptions_per_source: int = 10000
    """Push subscriptions created per client address (IPv6 per /64); a new SUBSCRIBE past it is answered 429
    (a refresh is not new; unsubscribe and expiry free slots)."""
    subscriptions_total: int = 1_000_000
    """Push subscriptions in all (about 1 KB each, more for a key of its own); a new SUBSCRIBE past it is
    answered 503."""
    permanent_puts_per_source: int = 1000
    """Permanent puts held per client address (IPv6 per /64); a new one past it is answered 429 (a re-POST of
    a held put is not new; expiry frees slots)."""
    permanent_puts_bytes_per_source: int = 4 * MIB
    """Bytes of the values held as permanent puts per client address (IPv6 per /64; their packed size); a put
    that would hold more is answered 429."""
    permanent_puts_bytes: int = 64 * MIB
    """Bytes of the values held as permanent puts, in all (their packed size); a put that would hold more is
    answered 503."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"limit {f.name} must be positive")

    def replace(self, assignments: list[str]) -> Limits:
        """A copy with ``NAME=VALUE`` assignments applied (ValueError naming the bad one)."""
        changes: dict[str, float | int] = {}
        kinds = {f.name: f.type for f in dataclasses.fields(self)}
        for assignment in assignments:
            name, sep, text = assignment.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in kinds:
                known = ", ".join(kinds)
                raise ValueError(f"unknown limit {assignment!r}: use NAME=VALUE with NAME one of {known}")
            changes[name] = parse_size(text) if kinds[name] in ("int", int) else parse_seconds(text)
        return dataclasses.replace(self, **changes)

    def describe(self) -> list[tuple[str, str, str]]:
        """(name, default, what it bounds) for each limit, for ``--limits``."""
        docs = _field_docs()
        return [
            (f.name, _show(f.name, getattr(self, f.name)), docs.get(f.name, ""))
            for f in dataclasses.fields(self)
        ]


def _show(name: str, value: float) -> str:
    """A limit as ``--limit`` takes it back: sizes (names with ``bytes`` or ``buffer``) as ``16M`` or
    ``64K``, durations (``*_timeout``, ``*_age``) as ``10s``, the rest as plain numbers."""
    if name.endswith(("_timeout", "_age")):
        return f"{value:g}s"
    if "bytes" in name or "buffer" in name:
        for unit, size in (("G", 1024 * MIB), ("M", MIB), ("K", KIB)):
            if value >= size and value % size == 0:
                return f"{int(value) // size}{unit}"
    return f"{value:g}" if isinstance(value, float) else str(value)


_SIZE = re.compile(r"(\d+)([kmg]?)i?b?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": KIB, "m": MIB, "g": 1024 * MIB}
_SECONDS = re.compile(r"(\d+(?:\.\d+)?)(ms|[hms]?)")
_SECONDS_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "ms": 0.001}


def parse_size(text: str) -> int:
    """A whole number, with an optional K/M/G suffix (powers of 1024): ``4M`` is 4,194,304."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a size: {text!r} (use e.g. 1000, 64K, 4M)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def parse_seconds(text: str) -> float:
    """Seconds: ``10``, ``2.5``, ``30s``, ``2m``, ``1h``, ``500ms``."""
    match = _SECONDS.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 10, 30s, 2m, 500ms)")
    return float(match.group(1)) * _SECONDS_UNITS[match.group(2)]


def _field_docs() -> dict[str, str]:
    """Each field's docstring (the string literal under it in this module's source)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(Limits))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for field, doc in itertools.pairwise(body):
        if (
            isinstance(field, ast.AnnAssign)
            and isinstance(field.target, ast.Name)
            and isinstance(doc, ast.Expr)
            and isinstance(doc.value, ast.Constant)
        ):
            docs[field.target.id] = " ".join(str(doc.value.value).split())
    return docs


DEFAULT = Limits()
