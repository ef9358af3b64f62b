"""The guard on UnifiedPush endpoints: a subscriber chooses the URL we POST to, so it must not reach us.

Only ``http``/``https`` URLs of at most :data:`MAX_ENDPOINT_LEN` bytes are accepted. Unless private addresses
are allowed (tests and self-hosted setups on a LAN), every address the endpoint names or resolves to must be
public (:func:`forbidden_reason`):

- IPv4: the special-purpose ranges (this network, private, CGNAT, loopback, link-local, IETF protocol
  assignments, documentation, benchmarking, the 6to4 relay anycast, multicast, reserved, broadcast) are
  refused, from a table rather than :attr:`ipaddress.IPv4Address.is_global`, whose answer depends on the
  Python version.
- IPv6: only global unicast (``2000::/3``) is accepted, less its special ranges (``2001::/23`` with Teredo,
  documentation ``2001:db8::/32`` and ``3fff::/20``). An IPv4 address carried inside an IPv6 one is decoded
  and checked as IPv4: IPv4-mapped ``::ffff:0:0/96``, IPv4-compatible ``::/96``, IPv4-translated
  ``::ffff:0:0:0/96``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16`` and an ISATAP interface id
  (``…:0:5efe:a.b.c.d``). The local-use NAT64 prefix ``64:ff9b:1::/48`` is refused whole (where its IPv4
  address sits depends on the operator's prefix length).
- Host names: ``localhost`` and ``*.localhost`` are refused (with or without a trailing dot). A host whose
  labels are all numbers (``2130706433``, ``0x7f.1``, ``127.1``, ``0177.0.0.1``) is an IPv4 address in the
  spelling ``inet_aton`` accepts, which the system resolver (hence any HTTP client) turns into that address:
  it is decoded as ``inet_aton`` does and checked, or refused if it does not decode.

A host name is checked again when a push is sent: :func:`resolve_endpoint` resolves it, refuses it if any of
its addresses is forbidden, and the request is then made to the address that was checked (the gateway puts
it in the URL and keeps the name for ``Host`` and the TLS server name), so a second DNS answer cannot swap in
a private address. Redirects are never followed (the HTTP client is built so). Names are looked up through
:class:`Lookups`, which bounds the threads that slow name servers can hold.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import idna
import trio

MAX_ENDPOINT_LEN = 1000
"""UnifiedPush AND_3: endpoints are at most 1000 bytes."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_IPV4_FORBIDDEN = tuple(
    ipaddress.IPv4Network(net)
    for net in (
        "0.0.0.0/8",  # this network
        "10.0.0.0/8",  # private
        "100.64.0.0/10",  # shared address space (CGNAT)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local (cloud metadata services)
        "172.16.0.0/12",  # private
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",  # private
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation
        "203.0.113.0/24",  # documentation
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the broadcast address
    )
)
_IPV6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_IPV6_FORBIDDEN = tuple(
    ipaddress.IPv6Network(net)
    for net in (
        "2001::/23",  # IETF protocol assignments: Teredo 2001::/32, benchmarking, ORCHID
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
    )
)
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_EMBEDDED_IN_LOW_32 = tuple(
    ipaddress.IPv6Network(net)
    for net in (
        "::ffff:0:0/96",  # IPv4-mapped
        "::/96",  # IPv4-compatible (deprecated); holds :: and ::1 too, which decode to 0.0.0.x
        "::ffff:0:0:0/96",  # IPv4-translated (SIIT)
        "64:ff9b::/96",  # NAT64 well-known prefix
    )
)
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_ISATAP_MASK, _ISATAP_ID = 0xFCFFFFFF, 0x00005EFE
"""An ISATAP interface id is ``00-00-5E-FE`` (u/g bits aside) followed by the IPv4 address."""

_NUMERIC_LABEL = re.compile(r"0[xX][0-9a-fA-F]*|[0-9]+")


class ForbiddenEndpoint(ValueError):
    """An endpoint URL we refuse to POST to."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A checked endpoint URL, split into what the request needs."""

    url: str
    scheme: str
    host: str
    port: int
    target: str
    """Path and query, ``/`` if empty."""


def forbidden_reason(address: IPAddress) -> str | None:
    """Why ``address`` may not be posted to, or None if it is public unicast."""
    if isinstance(address, ipaddress.IPv4Address):
        for net in _IPV4_FORBIDDEN:
            if address in net:
                return f"{address} is in {net}"
        return None
    address = ipaddress.IPv6Address(int(address))  # without a scope id
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        reason = forbidden_reason(embedded)
        return None if reason is None else f"{address} carries {reason}"
    if address in _NAT64_LOCAL:
        return f"{address} is in the local-use NAT64 prefix {_NAT64_LOCAL}"
    if address not in _IPV6_GLOBAL_UNICAST:
        return f"{address} is not global unicast"
    for net in _IPV6_FORBIDDEN:
        if address in net:
            return f"{address} is in {net}"
    interface_id = int(address) & (2**64 - 1)
    if interface_id >> 32 & _ISATAP_MASK == _ISATAP_ID:
        reason = forbidden_reason(ipaddress.IPv4Address(interface_id & 0xFFFFFFFF))
        return None if reason is None else f"{address} (ISATAP) carries {reason}"
    return None


def is_forbidden_address(address: IPAddress) -> bool:
    """True for any address that is not public unicast (:func:`forbidden_reason`)."""
    return forbidden_reason(address) is not None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, when its prefix says it carries one."""
    for net in _EMBEDDED_IN_LOW_32:
        if address in net:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _SIX_TO_FOUR:
        return ipaddress.IPv4Address(int(address) >> 80 & 0xFFFFFFFF)
    return None


def numeric_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a host of numeric labels stands for, decoded as ``inet_aton`` does (``127.1``,
    ``2130706433``, ``0x7f.0.0.1``, ``0177.0.0.1``); None for a host with another label.

    Raises :class:`ForbiddenEndpoint` if the labels are all numeric but do not decode (``1.2.3.4.5``,
    ``08.1``, ``256.1.1.1``): no DNS name looks so.
    """
    labels = host.split(".")
    if not all(_NUMERIC_LABEL.fullmatch(label) for label in labels):
        return None
    try:
        parts = [
            int(label, 16) if label[:2].lower() == "0x" and len(label) > 2
            else 0 if label.lower() == "0x"
            else int(label, 8) if label.startswith("0")
            else int(label)
            for label in labels
        ]  # fmt: skip
    except ValueError:
        raise ForbiddenEndpoint(f"endpoint host {host} is not an IPv4 address") from None
    if len(parts) > 4:
        raise ForbiddenEndpoint(f"endpoint host {host} is not an IPv4 address")
    last_bits = 8 * (5 - len(parts))
    if any(part > 255 for part in parts[:-1]) or parts[-1] >= 1 << last_bits:
        raise ForbiddenEndpoint(f"endpoint host {host} is not an IPv4 address")
    value = parts[-1]
    for i, part in enumerate(parts[:-1]):
        value |= part << (24 - 8 * i)
    return ipaddress.IPv4Address(value)


def parse_endpoint(url: str, *, allow_private: bool = False) -> Endpoint:
    """Check the form of ``url`` (and a literal or numeric IP host against the policy); raises
    :class:`ForbiddenEndpoint`."""
    if len(url.encode()) > MAX_ENDPOINT_LEN:
        raise ForbiddenEndpoint("endpoint longer than 1000 bytes")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ForbiddenEndpoint(f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ForbiddenEndpoint("endpoint scheme must be http or https")
    host = parts.hostname
    if not host:
        raise ForbiddenEndpoint("endpoint has no host")
    if parts.username is not None or parts.password is not None:
        raise ForbiddenEndpoint("endpoint carries credentials")
    if not allow_private:
        _check_host(host)
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return Endpoint(url=url, scheme=parts.scheme, host=host, port=port, target=target)


def _check_host(host: str) -> None:
    """Refuse a host that names a forbidden address without resolution."""
    literal: IPAddress | None
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        name = host[:-1] if host.endswith(".") else host
        if name == "localhost" or name.endswith(".localhost"):
            raise ForbiddenEndpoint("endpoint host is localhost") from None
        literal = numeric_ipv4(name)
    if literal is not None:
        reason = forbidden_reason(literal)
        if reason is not None:
            raise ForbiddenEndpoint(f"endpoint address {host} is not public: {reason}")


class LookupStuck(OSError):
    """The host's previous lookup is still running (abandoned by its request): no second one is started."""


_NUMERIC = socket.AI_NUMERICHOST | getattr(socket, "AI_NUMERICSERV", 0)


class Lookups:
    """Host name lookups of push endpoints, each in a thread, under a limiter of their own.

    A lookup runs the system resolver in a thread; one abandoned at its request's deadline keeps its thread,
    and its limiter slot, until the resolver gives up. trio's ``getaddrinfo`` takes that slot from trio's
    default thread limiter, shared with every other thread of the program, so names served slowly could stall
    every other lookup. Here lookups hold ``limit`` slots of their own, and a host whose lookup is still
    running gets no second one (:class:`LookupStuck` at once): a slow host holds one thread at most. An IP
    address needs no thread.
    """

    def __init__(self, limit: int) -> None:
        self.limiter = trio.CapacityLimiter(limit)
        self._running: set[str] = set()
        """Hosts whose lookup thread has not returned yet."""

    async def getaddrinfo(self, host: str, port: int) -> list[tuple]:
        """``socket.getaddrinfo(host, port, type=SOCK_STREAM)``; raises :class:`OSError`."""
        await trio.lowlevel.checkpoint()
        if host.isascii():  # an IP address is read without a thread
            try:
                return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=_NUMERIC)
            except socket.gaierror as exc:
                if exc.errno != socket.EAI_NONAME:
                    raise
        if host in self._running:
            raise LookupStuck(f"the previous lookup of {host} is still running")
        try:
            name = host.encode("ascii") if host.isascii() else idna.encode(host, uts46=True)
        except idna.IDNAError as exc:
            raise OSError(f"bad host name {host!r}: {exc}") from None
        running = self._running
        started = False

        def lookup() -> list[tuple]:
            nonlocal started
            started = True
            try:
                return socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
            finally:
                running.discard(host)

        running.add(host)
        try:
            return await trio.to_thread.run_sync(lookup, abandon_on_cancel=True, limiter=self.limiter)
        except BaseException:
            if not started:  # cancelled while waiting for a slot: no thread will clear the mark
                running.discard(host)
            raise


async def resolve_endpoint(endpoint: Endpoint, lookups: Lookups | None = None) -> IPAddress:
    """Resolve the endpoint's host (through ``lookups``, or a limiter of one lookup); the first address, if
    every address is public.

    Raises :class:`ForbiddenEndpoint` if any address is not, and :class:`OSError` if resolution fails.
    """
    _check_host(endpoint.host)
    lookups = lookups if lookups is not None else Lookups(1)
    infos = await lookups.getaddrinfo(endpoint.host, endpoint.port)
    addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    if not addresses:
        raise OSError(f"{endpoint.host} resolves to nothing")
    for address in addresses:
        reason = forbidden_reason(address)
        if reason is not None:
            raise ForbiddenEndpoint(f"{endpoint.host} resolves to {address}, which is not public: {reason}")
    return addresses[0]
