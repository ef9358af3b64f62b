"""Settings of the REST proxy server (OpenDHT's ``ProxyServerConfig`` plus the limits OpenDHT lacks)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from trio_dht.limits import DEFAULT as DEFAULT_LIMITS
from trio_dht.limits import Limits


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A per-client-IP token bucket: ``per_second`` sustained, ``burst`` at once (IPv6 clients per /64)."""

    per_second: float = 100.0
    burst: int = 200
    loopback: bool = False
    """Also limit loopback clients (off by default: local tools and tests are trusted)."""

    def __post_init__(self) -> None:
        if self.per_second <= 0 or self.burst < 1:
            raise ValueError("a rate limit needs per_second > 0 and burst >= 1")


def default_http_workers() -> int:
    """The command line's default for :attr:`ProxyConfig.http_workers`: 1 on Linux with 2 cores or more."""
    return 1 if sys.platform == "linux" and (os.cpu_count() or 1) >= 2 else 0


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Where and how the proxy listens (``dhtnode`` flags in brackets).

    ``host`` "" means every interface on one dual-stack IPv6 socket, as OpenDHT (IPv4 clients then appear as
    ``::ffff:a.b.c.d``). A TLS listener on ``tls_port`` needs both ``certificate`` and ``private_key`` (PEM
    files); it may run beside the plain one. ``port=None`` disables the plain listener.
    """

    host: str = ""  # --proxy-addr
    port: int | None = 8000  # --proxyserver
    tls_port: int | None = None  # --proxyserverssl
    certificate: str | None = None  # --proxy-certificate
    private_key: str | None = None  # --proxy-privkey
    private_key_password: str | None = field(default=None, repr=False)  # --proxy-privkey-password
    max_body: int = 256 * 1024
    """Largest request body accepted (413 beyond). A 64 KiB value is about 90 KB of JSON."""
    rate_limit: RateLimit | None = RateLimit()
    """Per-IP request limit (429 beyond); None turns it off."""
    backlog: int = 1024
    graceful_timeout: float = 3.0
    """On shutdown, how long open requests get to finish before their connections are cut."""
    node_info_cache: float = 1.0
    """``GET /node/info`` is rebuilt at most this often, in seconds (OpenDHT: 120; 0 rebuilds every time)."""
    http_workers: int = 0
    """Worker processes that accept the plain-HTTP connections, relay SUBSCRIBE and UNSUBSCRIBE to this
    process and hand every other connection over to it (:mod:`~trio_dht.proxy.http_worker`): the bytes of
    the hot push routes move on other cores. Used only with push hooks and on Linux; 0: none."""
    limits: Limits = DEFAULT_LIMITS
    """The budgets of what clients may cost (``--limit NAME=VALUE``; see :mod:`trio_dht.limits`)."""
    health_isolated_after: float = 60.0  # --health-isolated-after
    """``GET /healthz`` answers 503 once the node has had no good peers for this many seconds."""
    health_gateway_after: float = 300.0  # --health-gateway-after
    """``GET /healthz`` answers 503 once a push gateway has failed every push for this many seconds."""

    def __post_init__(self) -> None:
        if self.http_workers < 0:
            raise ValueError("http_workers must not be negative")
        if self.port is None and self.tls_port is None:
            raise ValueError("the proxy needs a port or a TLS port")
        if self.tls_port is not None and (self.certificate is None or self.private_key is None):
            raise ValueError("a TLS port needs both a certificate and a private key")
        if self.max_body < 1:
            raise ValueError("max_body must be positive")
        if self.health_isolated_after <= 0 or self.health_gateway_after <= 0:
            raise ValueError("the health thresholds must be positive")

    def binds(self) -> tuple[list[str], list[str]]:
        """hypercorn bind strings: (plain, TLS)."""
        host = self.host or "::"
        host = f"[{host}]" if ":" in host else host
        plain = [f"{host}:{self.port}"] if self.port is not None else []
        tls = [f"{host}:{self.tls_port}"] if self.tls_port is not None else []
        return plain, tls
