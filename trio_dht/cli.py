"""The ``trio-dht`` command line: dhtnode's flags, parsed into one frozen :class:`AppConfig`, and the one line
that reports a failure.

:func:`parse_args` is the only place that reads ``argv``; everything downstream (``app.py``, the proxy,
push) takes the :class:`AppConfig`. Bad values are argparse errors (usage on stderr, exit code 2), found
before anything starts. ``--config FILE`` (:mod:`trio_dht.config_file`) fills in what no flag gives; its
problems are all reported, one ``trio-dht: config: FILE: WHERE: WHAT`` line each, before exit code 2.
A run that fails raises what its nursery tree raised, an exception group: :func:`leaf_exceptions` flattens
it, :func:`describe_failure` names every leaf in one line.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from trio_dht.limits import DEFAULT as DEFAULT_LIMITS
from trio_dht.limits import Limits
from trio_dht.logs import FORMATS
from trio_dht.node import DEFAULT_PORT
from trio_dht.proxy.settings import ProxyConfig, default_http_workers
from trio_dht.push.subscriptions import DEFAULT_LIFETIME as DEFAULT_SUBSCRIPTION_LIFETIME

if TYPE_CHECKING:
    from trio_dht.config_file import AppSpec

DEFAULT_PROXY = ProxyConfig(http_workers=default_http_workers())
"""Plain HTTP on port 8000, every interface, as dhtnode's proxy; an HTTP worker where there are 2 cores."""
DEFAULT_PROXY_PORT = DEFAULT_PROXY.port

T = TypeVar("T")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[dhms])+|\d+(?:\.\d+)?")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_DURATION_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


@dataclass(frozen=True, slots=True)
class AppConfig:
    """Everything the process is asked to run; durations are in seconds."""

    port: int = DEFAULT_PORT
    bootstrap: tuple[tuple[str, int], ...] = ()
    network: int = 0
    bind: str = "0.0.0.0"
    bind6: str | None = "::"  # None: IPv4 only
    rate_limit: bool = True  # OpenDHT's limits on incoming requests (1024/s per IP, 8192/s in all)
    verbose: int = 0
    log_file: Path | None = None  # -l FILE: log lines appended to FILE instead of stderr
    log_format: str = "text"  # --log-format: text, or json (one object a line)
    identity: bool = False  # -i: run with a new identity (an RSA key and its certificate)
    certificate: Path | None = None  # --certificate and --privkey: run with this identity
    private_key: Path | None = None
    private_key_password: str | None = None
    save_identity: Path | None = None  # --save-identity PATH: write the identity to PATH.pem and PATH.crt
    proxy: ProxyConfig | None = DEFAULT_PROXY  # None: no REST proxy
    push_server: str | None = None
    bundle_id: str = ""
    subscription_lifetime: float = DEFAULT_SUBSCRIPTION_LIFETIME
    persist_path: Path | None = None
    allow_private_endpoints: bool = False  # UnifiedPush endpoints on loopback/private addresses (tests, LANs)
    limits: Limits = DEFAULT_LIMITS  # --limit NAME=VALUE: the budget of every input (trio_dht.limits)
    apps: tuple[AppSpec, ...] = ()  # push apps: the config file's [apps], and --pushserver's gorush app
    interactive: bool = False  # --interactive: dhtnode's prompt on stdin and stdout


def parse_duration(text: str) -> float:
    """Seconds in ``text``: plain seconds (``90``, ``1.5``) or unit parts d/h/m/s (``24h``, ``1h30m``)."""
    text = text.strip().lower()
    if not _DURATION.fullmatch(text):
        raise ValueError(f"not a duration: {text!r} (use e.g. 90, 90s, 30m, 24h, 1h30m)")
    if text[-1].isdigit():
        return float(text)
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in _DURATION_PART.findall(text))


PUBLIC_BOOTSTRAP = ("bootstrap.jami.net", DEFAULT_PORT)
"""Where ``-b`` without a host joins: OpenDHT's default bootstrap for the public network (network id 0)."""


def parse_host_port(text: str, default_port: int | None = DEFAULT_PORT) -> tuple[str, int]:
    """``host[:port]``, ``[v6addr]:port``, ``[v6addr]`` or a bare IPv6 address, as ``(host, port)``.

    Host names are not resolved here. Without a port, ``default_port`` is used (an error when it is None).
    """
    text = text.strip()
    port_text: str | None = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {text!r}: expected [v6addr] or [v6addr]:port")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:  # a host name, an IPv4 address, or a bare IPv6 address
        host = text
    if not host:
        raise ValueError(f"bad address {text!r}: no host")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"bad address {text!r}: no port")
        return host, default_port
    return host, parse_port(port_text, low=1)


def format_host_port(host: str, port: int) -> str:
    """The inverse of :func:`parse_host_port`: ``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_port(text: str, *, low: int = 0) -> int:
    """A port number in ``low..65535`` (argparse ``type=``)."""
    try:
        port = int(text)
    except ValueError:
        raise ValueError(f"not a port number: {text!r}") from None
    if not low <= port <= 65535:
        raise ValueError(f"port {port} is out of range {low}..65535")
    return port


def _argparse_type(parse: Callable[[str], T], name: str) -> Callable[[str], T]:
    """Wrap a ``str -> value`` parser so that argparse reports its ValueError message verbatim."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name
    return convert


def parse_network_id(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise ValueError(f"not a network id: {text!r}") from None
    if not 0 <= value < 2**32:
        raise ValueError(f"network id {value} is out of range 0..4294967295")
    return value


def parse_push_server(text: str) -> str:
    """A gorush address, ``host:port`` (a port is required)."""
    return format_host_port(*parse_host_port(text, default_port=None))


def parse_lifetime(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"a lifetime must be positive, not {text!r}")
    return seconds


def _version() -> str:
    try:
        return metadata.version("trio-dht")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def parse_workers(text: str) -> int:
    if not text.isdecimal() or int(text) > 64:
        raise ValueError(f"not a count from 0 to 64: {text!r}")
    return int(text)


class _ListLimits(argparse.Action):
    """``--limits``: print every limit, its default and what it bounds, then exit."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        for name, default, doc in Limits().describe():
            print(f"{name}={default}\n    {doc}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The ``trio-dht`` argument parser (dhtnode's flag names where dhtnode has the flag)."""
    port = _argparse_type(parse_port, "port")
    parser = argparse.ArgumentParser(
        prog="trio-dht",
        description="Run a pure-Python OpenDHT node (and, by default, its REST proxy on port "
        f"{DEFAULT_PROXY_PORT}) until SIGINT or SIGTERM.",
        epilog="Durations take plain seconds or units: 90, 90s, 30m, 24h, 1h30m. "
        "`trio-dht client --help` describes the proxy client.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML file with any of these settings (keys as the long flags, with underscores), a [limits] "
        "table and the push apps ([apps.<id>]); flags given here override it",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more logging (by default trio-dht's INFO lines, other libraries' warnings): -v for every "
        "library's INFO lines and trio-dht's DEBUG ones, -vv for every DEBUG line (and no rate limit)",
    )
    parser.add_argument(
        "-l",
        "--logfile",
        dest="log_file",
        type=Path,
        metavar="FILE",
        help="append the log lines to FILE instead of stderr (reopened when moved, for log rotation)",
    )
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text",
        help="log lines as text, or as JSON objects (time, level, logger, message, exc), one a line",
    )
    parser.add_argument(
        "--limit",
        dest="limits",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="change one budget on what peers and clients may cost (repeatable; --limits lists them)",
    )
    parser.add_argument(
        "--limits", action=_ListLimits, nargs=0, help="list every limit with its default, and exit"
    )
    parser.add_argument(
        "--interactive",
        action="store_true",
        help="dhtnode's prompt on stdin and stdout over the running node (h lists its commands; x, q or "
        "Ctrl-D stops the program); not a config file setting",
    )

    node = parser.add_argument_group("DHT node")
    node.add_argument(
        "-p",
        "--port",
        type=port,
        default=DEFAULT_PORT,
        help=f"UDP port to bind (default {DEFAULT_PORT}; 0 picks a free one)",
    )
    node.add_argument(
        "-b",
        "--bootstrap",
        action="append",
        nargs="?",
        const=PUBLIC_BOOTSTRAP,
        default=[],
        metavar="HOST[:PORT]",
        type=_argparse_type(parse_host_port, "address"),
        help=f"a node to join through (repeatable); IPv6 as [::1]:4222; port {DEFAULT_PORT} if omitted; "
        f"without HOST, the public network's bootstrap ({format_host_port(*PUBLIC_BOOTSTRAP)}), as dhtnode",
    )
    node.add_argument(
        "-n",
        "--net",
        dest="network",
        type=_argparse_type(parse_network_id, "network id"),
        default=0,
        metavar="NETWORK_ID",
        help="network id; nodes only talk to nodes of the same network (default 0, public)",
    )
    node.add_argument("--bind", default="0.0.0.0", metavar="ADDR", help="IPv4 UDP address (default 0.0.0.0)")
    node.add_argument("--bind6", default="::", metavar="ADDR", help="IPv6 UDP address (default ::)")
    node.add_argument("--no-ipv6", dest="bind6", action="store_const", const=None, help="no IPv6 UDP socket")
    node.add_argument(
        "-U",
        "--no-rate-limit",
        dest="rate_limit",
        action="store_false",
        help="no limit on incoming UDP requests (as dhtnode -U; default 1024/s per IP, 8192/s in all)",
    )
    identity = parser.add_argument_group("identity (as dhtnode's flags; needs the cryptography package)")
    identity.add_argument(
        "-i",
        "--identity",
        action="store_true",
        help="run with a new identity: an RSA key and its certificate; the node id derives from the key, "
        "and the node announces its certificate",
    )
    identity.add_argument("--certificate", type=Path, metavar="FILE", help="run with this PEM certificate")
    identity.add_argument("--privkey", dest="private_key", type=Path, metavar="FILE", help="and this PEM key")
    identity.add_argument("--privkey-password", dest="private_key_password", metavar="PW")
    identity.add_argument(
        "--save-identity",
        type=Path,
        metavar="PATH",
        help="write the identity to PATH.pem (the key, mode 0600) and PATH.crt (the certificate)",
    )

    proxy = parser.add_argument_group("REST proxy")
    proxy.add_argument(
        "--proxyserver",
        dest="proxy_port",
        type=port,
        default=DEFAULT_PROXY_PORT,
        metavar="PORT",
        help=f"HTTP port of the REST proxy (default {DEFAULT_PROXY_PORT}; 0 turns it off)",
    )
    proxy.add_argument(
        "--no-proxy",
        dest="proxy_port",
        action="store_const",
        const=0,
        help="no HTTP proxy (same as --proxyserver 0)",
    )
    proxy.add_argument(
        "--proxy-addr",
        dest="proxy_address",
        default="",
        metavar="ADDR",
        help="address the proxy binds (default: every interface, IPv4 and IPv6)",
    )
    proxy.add_argument(
        "--proxyserverssl",
        dest="proxy_tls_port",
        type=port,
        default=0,
        metavar="PORT",
        help="HTTPS port of the proxy; needs --proxy-certificate and --proxy-privkey (default off)",
    )
    proxy.add_argument("--proxy-certificate", type=Path, metavar="FILE", help="TLS certificate chain (PEM)")
    proxy.add_argument(
        "--proxy-privkey", dest="proxy_private_key", type=Path, metavar="FILE", help="TLS private key (PEM)"
    )
    proxy.add_argument(
        "--proxy-privkey-password",
        dest="proxy_private_key_password",
        metavar="PASSWORD",
        help="of --proxy-privkey",
    )
    proxy.add_argument(
        "--http-workers",
        type=_argparse_type(parse_workers, "count"),
        default=None,
        metavar="N",
        help="processes that accept the plain-HTTP connections beside the node's and relay SUBSCRIBE to it "
        "(default: 1 on Linux with 2 cores or more, else 0; 0: the node's process serves them all)",
    )
    proxy.add_argument(
        "--health-isolated-after",
        type=_argparse_type(parse_lifetime, "duration"),
        default=DEFAULT_PROXY.health_isolated_after,
        metavar="DURATION",
        help="GET /healthz answers 503 once the node has had no good peers this long "
        f"(default {DEFAULT_PROXY.health_isolated_after:g} s)",
    )
    proxy.add_argument(
        "--health-gateway-after",
        type=_argparse_type(parse_lifetime, "duration"),
        default=DEFAULT_PROXY.health_gateway_after,
        metavar="DURATION",
        help="GET /healthz answers 503 once a push gateway has failed every push this long "
        f"(default {DEFAULT_PROXY.health_gateway_after:g} s)",
    )

    push = parser.add_argument_group("push notifications")
    push.add_argument(
        "--pushserver",
        dest="push_server",
        metavar="HOST:PORT",
        type=_argparse_type(parse_push_server, "address"),
        help="gorush gateway that delivers Android and iOS pushes",
    )
    push.add_argument("--bundleid", dest="bundle_id", default="", metavar="ID", help="default iOS topic")
    push.add_argument(
        "--subscription-lifetime",
        type=_argparse_type(parse_lifetime, "duration"),
        default=DEFAULT_SUBSCRIPTION_LIFETIME,
        metavar="DURATION",
        help="lifetime of a push subscription without a refresh "
        f"(default {DEFAULT_SUBSCRIPTION_LIFETIME:g} s; OpenDHT uses 24h)",
    )
    push.add_argument(
        "-f",
        "--persist",
        dest="persist_path",
        type=Path,
        metavar="PATH",
        help="file that keeps push subscriptions and permanent puts across restarts",
    )
    push.add_argument(
        "--push-allow-private-endpoints",
        dest="allow_private_endpoints",
        action="store_true",
        help="accept UnifiedPush endpoints on loopback and private addresses (tests, LANs; off by default "
        "because the subscriber chooses the URL the proxy POSTs to)",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> AppConfig:
    """Parse ``argv`` (default ``sys.argv[1:]``); exits with usage and code 2 on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        apps = _apply_config_file(args, argv)
    elif args.push_server is not None:
        from trio_dht.config_file import gorush_shorthand

        apps = (gorush_shorthand(args.push_server, args.bundle_id),)
    else:
        apps = ()
    tls_files = (args.proxy_certificate, args.proxy_private_key)
    if not args.proxy_tls_port and tls_files != (None, None):
        parser.error("--proxy-certificate and --proxy-privkey are only used with --proxyserverssl")
    for path in tls_files:
        if path is not None and not path.is_file():
            parser.error(f"no such file: {path}")
    if (args.certificate is None) != (args.private_key is None):
        parser.error("--certificate and --privkey go together")
    if args.private_key_password is not None and args.private_key is None:
        parser.error("--privkey-password is only used with --privkey")
    if args.save_identity is not None and not (args.identity or args.certificate):
        parser.error("--save-identity needs an identity: -i, or --certificate and --privkey")
    for path in (args.certificate, args.private_key):
        if path is not None and not path.is_file():
            parser.error(f"no such file: {path}")
    try:
        limits = Limits().replace(args.limits)
    except ValueError as exc:
        parser.error(f"--limit: {exc}")
    proxy = None
    if args.proxy_port or args.proxy_tls_port:
        try:
            proxy = ProxyConfig(
                host=args.proxy_address,
                port=args.proxy_port or None,
                tls_port=args.proxy_tls_port or None,
                certificate=str(args.proxy_certificate) if args.proxy_certificate else None,
                private_key=str(args.proxy_private_key) if args.proxy_private_key else None,
                private_key_password=args.proxy_private_key_password,
                http_workers=default_http_workers() if args.http_workers is None else args.http_workers,
                limits=limits,
                health_isolated_after=args.health_isolated_after,
                health_gateway_after=args.health_gateway_after,
            )
        except ValueError as exc:
            parser.error(str(exc))
    return AppConfig(
        port=args.port,
        bootstrap=tuple(args.bootstrap),
        network=args.network,
        bind=args.bind,
        bind6=args.bind6,
        rate_limit=args.rate_limit,
        verbose=args.verbose,
        log_file=args.log_file,
        log_format=args.log_format,
        identity=args.identity,
        certificate=args.certificate,
        private_key=args.private_key,
        private_key_password=args.private_key_password,
        save_identity=args.save_identity,
        proxy=proxy,
        push_server=args.push_server,
        bundle_id=args.bundle_id,
        subscription_lifetime=args.subscription_lifetime,
        persist_path=args.persist_path,
        allow_private_endpoints=args.allow_private_endpoints,
        limits=limits,
        apps=apps,
        interactive=args.interactive,
    )


def _apply_config_file(args: argparse.Namespace, argv: Sequence[str] | None) -> tuple[AppSpec, ...]:
    """Fill ``args`` from the ``--config`` file where no flag was given; the file's apps, plus the gorush app
    of ``--pushserver``. Every problem of the file is one line on stderr, then exit code 2."""
    from trio_dht import config_file

    loaded = config_file.load_config(args.config)
    given = _given_destinations(argv)
    for dest, value in loaded.settings.items():
        if dest not in given:
            setattr(args, dest, value)
    args.limits = [*loaded.limits, *args.limits]  # a --limit flag wins over the file's value
    apps = loaded.apps
    problems = list(loaded.problems)
    if args.push_server is not None:
        apps = (*apps, config_file.gorush_shorthand(args.push_server, args.bundle_id))
        if not problems:
            problems = config_file.conflicts(apps)
    for problem in problems:
        print(f"trio-dht: config: {args.config}: {problem}", file=sys.stderr)
    if problems:
        sys.exit(2)
    return apps


def _given_destinations(argv: Sequence[str] | None) -> set[str]:
    """The argparse destinations that ``argv`` sets explicitly (flags given, not defaults)."""
    parser = build_parser()
    for action in parser._actions:  # a destination without a default is left out of the namespace
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def leaf_exceptions(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc``, with every (nested) exception group flattened away."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaf_exceptions(inner)]
    return [exc]


def describe_failure(exc: BaseException) -> str:
    """One line naming every exception inside ``exc`` (ExceptionGroups unwrapped), e.g. ``OSError: ...``."""
    return "; ".join(
        f"{type(leaf).__name__}: {leaf}" if str(leaf) else type(leaf).__name__
        for leaf in leaf_exceptions(exc)
        if not isinstance(leaf, KeyboardInterrupt)
    )
