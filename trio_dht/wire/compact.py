"""Compact node records (``n4``: 26 bytes, ``n6``: 38 bytes) and raw addresses (``sa``)."""

from __future__ import annotations

import socket
from functools import lru_cache
from ipaddress import IPv4Address, IPv6Address, ip_address

from trio_dht.infohash import HASH_LEN, InfoHash

Address = tuple[str, int]
"""An (ip, port) pair; ip in canonical text form, IPv4-mapped IPv6 already turned into IPv4."""

NodeRecord = tuple[InfoHash, Address]

RECORD4 = HASH_LEN + 4 + 2
RECORD6 = HASH_LEN + 16 + 2

# Address-family numbers OpenDHT puts in ``w`` (Linux values, with other platforms' IPv6 numbers accepted).
WANT_INET = 2
_WANT_INET6_ALIASES = frozenset({10, 23, 28, 30})
"""IPv6: 10 on Linux, and the other platforms' numbers."""


class MalformedRecords(ValueError):
    """A node list whose length is not a multiple of its record size."""


def is_ipv6(ip: str) -> bool:
    return ":" in ip


def normalize(addr: tuple) -> Address:
    """Canonical (ip, port) from a socket address; IPv4-mapped IPv6 becomes IPv4."""
    ip, port = addr[0], addr[1]
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[7:]
    return (ip, port)


def want_families(want: list[int] | None, requester_is_v6: bool) -> tuple[bool, bool]:
    """Which families (v4, v6) a find/get reply should list, from the request's ``w``."""
    if want is None:
        return (not requester_is_v6, requester_is_v6)
    return (WANT_INET in want, not _WANT_INET6_ALIASES.isdisjoint(want))


@lru_cache(maxsize=65536)
def pack_ip(ip: str) -> bytes:
    """The raw 4 or 16 bytes of an IP address (as ``sa`` carries it)."""
    return socket.inet_pton(socket.AF_INET6 if is_ipv6(ip) else socket.AF_INET, ip)


@lru_cache(maxsize=4096)
def unpack_ip(raw: bytes) -> str | None:
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    if len(raw) == 16:
        return normalize((socket.inet_ntop(socket.AF_INET6, raw), 0))[0]
    return None


def pack_nodes(nodes: list[NodeRecord], v6: bool) -> bytes:
    """Concatenated records: id, address, port (big-endian)."""
    af = socket.AF_INET6 if v6 else socket.AF_INET
    return b"".join(nid + socket.inet_pton(af, ip) + port.to_bytes(2, "big") for nid, (ip, port) in nodes)


def unpack_nodes(blob: bytes, v6: bool) -> list[NodeRecord]:
    """Parse a node list; raises :class:`MalformedRecords` if its length is not a whole number of records."""
    size = RECORD6 if v6 else RECORD4
    if len(blob) % size:
        raise MalformedRecords(f"node list of {len(blob)} bytes is not a multiple of {size}")
    af = socket.AF_INET6 if v6 else socket.AF_INET
    out: list[NodeRecord] = []
    for i in range(0, len(blob), size):
        rec = blob[i : i + size]
        ip = socket.inet_ntop(af, rec[HASH_LEN:-2])
        out.append((InfoHash(rec[:HASH_LEN]), (ip, int.from_bytes(rec[-2:], "big"))))
    return out


@lru_cache(maxsize=65536)
def is_martian(addr: Address, *, allow_link_local: bool = True) -> bool:
    """Addresses OpenDHT never talks to: port 0, IPv4 0/8 and >= 224, IPv6 multicast, unspecified, mapped."""
    ip, port = addr
    if port == 0:
        return True
    try:
        a = ip_address(ip)
    except ValueError:
        return True
    if isinstance(a, IPv4Address):
        first = a.packed[0]
        return first == 0 or first >= 224
    assert isinstance(a, IPv6Address)
    if a.is_multicast or a.is_unspecified or a.ipv4_mapped is not None:
        return True
    return a.is_link_local and not allow_link_local


@lru_cache(maxsize=65536)
def is_loopback(ip: str) -> bool:
    try:
        return ip_address(ip).is_loopback
    except ValueError:
        return False
