"""The guard on UnifiedPush endpoints: a subscriber chooses the URL we POST to, so it must not reach us.

Only ``http``/``https`` URLs of at most :data:`MAX_ENDPOINT_LEN` bytes are accepted. Unless private addresses
are allowed (tests and self-hosted setups on a LAN), every address the host resolves to must be global:
loopback, private, link-local, CGNAT, multicast, reserved and unspecified ranges are refused, including IPv4
addresses mapped into IPv6. The request then goes to the address that was checked (see
:func:`resolve_endpoint`), so a second DNS answer cannot swap in a private one. Redirects are never followed
(the HTTP client is built so).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

MAX_ENDPOINT_LEN = 1000
"""UnifiedPush AND_3: endpoints are at most 1000 bytes."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


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


def is_forbidden_address(address: IPAddress) -> bool:
    """True for any address that is not globally routable unicast."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_global or address.is_multicast


def parse_endpoint(url: str, *, allow_private: bool = False) -> Endpoint:
    """Check the form of ``url`` (and a literal IP host against the policy); raises
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
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None and is_forbidden_address(literal):
            raise ForbiddenEndpoint(f"endpoint address {host} is not public")
        if literal is None and (host == "localhost" or host.endswith(".localhost")):
            raise ForbiddenEndpoint("endpoint host is localhost")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return Endpoint(url=url, scheme=parts.scheme, host=host, port=port, target=target)


async def resolve_endpoint(endpoint: Endpoint) -> IPAddress:
    """Resolve the endpoint's host; the first address, if every address is public.

    Raises :class:`ForbiddenEndpoint` if any address is not, and :class:`OSError` if resolution fails.
    """
    infos = await trio.socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
    addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    if not addresses:
        raise OSError(f"{endpoint.host} resolves to nothing")
    for address in addresses:
        if is_forbidden_address(address):
            raise ForbiddenEndpoint(f"{endpoint.host} resolves to {address}, which is not public")
    return addresses[0]
