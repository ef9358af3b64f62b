"""The ``--config FILE`` file (TOML): the command line's settings, its limits and the push apps, all checked.

Top-level keys are the long flags with underscores (``port``, ``bootstrap``, ``proxyserver``,
``subscription_lifetime``, ``push_allow_private_endpoints``...); a ``[limits]`` table holds what
``--limit NAME=VALUE`` sets. Relative paths are relative to the file's folder. Each ``[apps.<id>]`` table is
one push app: its ``kind`` and credentials, and which subscriptions reach it: ``platform`` (a SUBSCRIBE
``platform`` value, or a list of them; by default the kind's usual one) and ``topics`` (an iOS bundle id,
an Android package...; none: the app is its platforms' default). :func:`route` picks a subscription's app.

=========  ==============================================================  ===========================
kind       keys                                                            platforms (default first)
=========  ==============================================================  ===========================
gorush     ``url``, ``bundleid`` (default iOS topic)                        android + ios; android, ios
fcm        ``service_account`` (the service account's JSON file),           android; ios
           ``url``, ``token_uri``
apns       ``key_file`` (.p8), ``key_id``, ``team_id``, ``sandbox``,        ios
           ``url``, ``ca_file``
webpush    ``vapid_private_key`` (PEM), ``vapid_subject`` (mailto:/https:)  unifiedpush
=========  ==============================================================  ===========================

Sans-IO apart from reading the files it names (through ``read``): :func:`parse_config` turns the text into
a :class:`ConfigFile`, whose ``problems`` list every fault found, one line each. Keys are loaded to be
checked (this needs the ``cryptography`` package): a service account's ``private_key`` must be an RSA key,
a .p8 an EC P-256 PKCS#8 key, a VAPID key an EC P-256 key.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trio_dht import cli
from trio_dht.limits import Limits
from trio_dht.logs import FORMATS
from trio_dht.small_files import FileTooLarge, read_small_file

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from trio_dht.push.fcm import ServiceAccount

MAX_FILE_BYTES = 1024 * 1024
"""The largest config file, and key or credential file it names, that is read."""
PLATFORMS = ("android", "ios", "unifiedpush")
"""SUBSCRIBE ``platform`` values an app can serve; a subscription with none or another is routed as iOS."""


class AppKind(enum.Enum):
    GORUSH = "gorush"
    FCM = "fcm"
    APNS = "apns"
    WEBPUSH = "webpush"


@dataclass(frozen=True, slots=True)
class GorushCredentials:
    url: str
    bundle_id: str = ""
    """Topic of iOS pushes whose subscription has none."""


@dataclass(frozen=True, slots=True)
class FcmCredentials:
    service_account: Path
    account: ServiceAccount = field(repr=False)
    """The file's account, checked and its key loaded (once: the gateway uses this one)."""
    url: str | None = None
    """Instead of FCM's endpoint (tests)."""
    token_uri: str | None = None
    """Instead of the service account's token URI (tests)."""


@dataclass(frozen=True, slots=True)
class ApnsCredentials:
    key_file: Path
    key_id: str
    team_id: str
    sandbox: bool = False
    url: str | None = None
    """Instead of Apple's production or sandbox host (tests)."""
    ca_file: Path | None = None
    """CA certificates to trust for ``url`` (tests)."""
    private_key: ec.EllipticCurvePrivateKey = field(kw_only=True, repr=False, compare=False)
    """The ``.p8`` key, checked and loaded (once: the gateway uses this one)."""


@dataclass(frozen=True, slots=True)
class WebPushCredentials:
    vapid_private_key: Path
    vapid_subject: str
    private_key: ec.EllipticCurvePrivateKey = field(kw_only=True, repr=False, compare=False)
    """The VAPID key, checked and loaded (once: the gateway uses this one)."""


Credentials = GorushCredentials | FcmCredentials | ApnsCredentials | WebPushCredentials


@dataclass(frozen=True, slots=True)
class AppSpec:
    """One push app: where its pushes go, with what credentials, and which subscriptions reach it."""

    id: str
    kind: AppKind
    platforms: tuple[str, ...]
    topics: tuple[str, ...]
    """Empty: the default app of its platforms."""
    credentials: Credentials


_KIND_PLATFORMS = {
    AppKind.GORUSH: (("android", "ios"), {"android", "ios"}),
    AppKind.FCM: (("android",), {"android", "ios"}),
    AppKind.APNS: (("ios",), {"ios"}),
    AppKind.WEBPUSH: (("unifiedpush",), {"unifiedpush"}),
}
_KIND_KEYS = {
    AppKind.GORUSH: {"url", "bundleid"},
    AppKind.FCM: {"service_account", "url", "token_uri"},
    AppKind.APNS: {"key_file", "key_id", "team_id", "sandbox", "url", "ca_file"},
    AppKind.WEBPUSH: {"vapid_private_key", "vapid_subject"},
}
_APPLE_ID = re.compile(r"[A-Z0-9]{10}")


def route(apps: Iterable[AppSpec], platform: str, topic: str) -> AppSpec | None:
    """The app for a subscription: the one of its platform that lists its topic, else the one of its platform
    without topics; None if neither. A platform outside :data:`PLATFORMS` (none, unknown) is iOS's."""
    if platform not in PLATFORMS:
        platform = "ios"
    default = None
    for app in apps:
        if platform in app.platforms:
            if topic and topic in app.topics:
                return app
            if not app.topics and default is None:
                default = app
    return default


def gorush_shorthand(push_server: str, bundle_id: str) -> AppSpec:
    """The app ``--pushserver HOST:PORT [--bundleid ID]`` stands for."""
    return AppSpec(
        "pushserver",
        AppKind.GORUSH,
        ("android", "ios"),
        (),
        GorushCredentials(f"http://{push_server}", bundle_id),
    )


def conflicts(apps: Iterable[AppSpec]) -> list[str]:
    """Problems of apps claiming the same (platform, topic), or the same platform's default."""
    claimed: dict[tuple[str, str | None], str] = {}
    problems = []
    for app in apps:
        for platform in app.platforms:
            for topic in app.topics or (None,):
                other = claimed.setdefault((platform, topic), app.id)
                if other != app.id:
                    what = f"topic {topic!r}" if topic is not None else "the default (no topics)"
                    problems.append(f"apps.{app.id}: {platform} {what} is already apps.{other}'s")
    return problems


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """What a config file says: ``settings`` by argparse destination (typed as the flags' values), ``limits``
    as ``--limit`` assignments, the apps, and every problem found (``where: what`` each)."""

    path: Path
    settings: dict[str, Any] = field(default_factory=dict)
    limits: tuple[str, ...] = ()
    apps: tuple[AppSpec, ...] = ()
    problems: tuple[str, ...] = ()


def load_config(path: Path) -> ConfigFile:
    """Read and check the file at ``path``."""
    try:
        text = read_small_file(path, MAX_FILE_BYTES)
    except OSError as exc:
        return ConfigFile(path, problems=(f"file: cannot read it: {exc.strerror or exc}",))
    except FileTooLarge as exc:
        return ConfigFile(path, problems=(f"file: {exc}",))
    return parse_config(text, path=path)


def _read_key_file(path: Path) -> bytes:
    return read_small_file(path, MAX_FILE_BYTES)


def parse_config(
    text: bytes | str, *, path: Path, read: Callable[[Path], bytes] = _read_key_file
) -> ConfigFile:
    """Check a config file's ``text``; ``path`` names it and anchors relative paths; ``read`` reads keys."""
    try:
        doc = tomllib.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return ConfigFile(path, problems=(f"syntax: {exc}",))
    checker = _Checker(path.parent, read)
    settings: dict[str, Any] = {}
    limits: list[str] = []
    apps: list[AppSpec] = []
    for key, value in doc.items():  # in the file's order, so that the problems are too
        if key == "limits":
            limits = checker.limits(value)
        elif key == "apps":
            apps = checker.apps(value)
        elif key in _SETTINGS:
            checker.setting(key, value, settings)
        elif key.replace("-", "_") in _SETTINGS:
            checker.problem(key, f"unknown key (keys are written with underscores: {key.replace('-', '_')})")
        else:
            checker.problem(key, "unknown key")
    problems = checker.problems + conflicts(apps)
    return ConfigFile(path, settings, tuple(limits), tuple(apps), tuple(problems))


class _Bad(ValueError):
    """One problem with one value."""


_TOML_TYPES = {str: "a string", bool: "a boolean", int: "an integer", float: "a float", list: "an array"}


def _type_name(value: Any) -> str:
    return "a table" if isinstance(value, dict) else _TOML_TYPES.get(type(value), "a date or time")


def _expect(value: Any, *types: type) -> Any:
    if type(value) not in types:
        wanted = " or ".join(_TOML_TYPES[t] for t in types)
        raise _Bad(f"expected {wanted}, not {_type_name(value)}")
    return value


def _converted(parse: Callable[[str], Any], value: Any) -> Any:
    try:
        return parse(value)
    except ValueError as exc:
        raise _Bad(str(exc)) from None


class _Checker:
    """Collects the problems while checking one file's tables."""

    def __init__(self, base: Path, read: Callable[[Path], bytes]) -> None:
        self.base = base
        self.read = read
        self.problems: list[str] = []

    def problem(self, where: str, what: str) -> None:
        self.problems.append(f"{where}: {what}")

    # -- values --
    def path(self, value: Any) -> Path:
        path = Path(_expect(value, str)).expanduser()
        return path if path.is_absolute() else self.base / path

    def file(self, value: Any) -> tuple[Path, bytes]:
        path = self.path(value)
        try:
            return path, self.read(path)
        except FileNotFoundError:
            raise _Bad(f"no such file: {path}") from None
        except OSError as exc:
            raise _Bad(f"cannot read {path}: {exc.strerror or exc}") from None
        except FileTooLarge as exc:
            raise _Bad(f"{path}: {exc}") from None

    def existing_file(self, value: Any) -> Path:
        return self.file(value)[0]

    # -- top level --
    def setting(self, key: str, value: Any, settings: dict[str, Any]) -> None:
        dest, convert = _SETTINGS[key]
        try:
            converted = convert(self, value)
        except _Bad as exc:
            self.problem(key, str(exc))
            return
        if converted is _UNSET:
            return
        if dest in settings:
            other = next(k for k, (d, _) in _SETTINGS.items() if d == dest and k != key)
            self.problem(key, f"contradicts {other}")
            return
        settings[dest] = converted

    def limits(self, table: Any) -> list[str]:
        if not isinstance(table, dict):
            self.problem("limits", f"expected a table, not {_type_name(table)}")
            return []
        names = {f.name for f in dataclasses.fields(Limits)}
        assignments = []
        for name, value in table.items():
            where = f"limits.{name}"
            if name not in names:
                self.problem(where, "unknown limit (trio-dht --limits lists them)")
                continue
            try:
                text = str(_expect(value, str, int, float))
                Limits().replace([f"{name}={text}"])
            except (_Bad, ValueError) as exc:
                self.problem(where, str(exc))
                continue
            assignments.append(f"{name}={text}")
        return assignments

    # -- apps --
    def apps(self, table: Any) -> list[AppSpec]:
        if not isinstance(table, dict):
            self.problem("apps", f"expected a table of [apps.<id>] tables, not {_type_name(table)}")
            return []
        apps = []
        for app_id, body in table.items():
            if not isinstance(body, dict):
                self.problem(f"apps.{app_id}", f"expected a table, not {_type_name(body)}")
                continue
            app = self.app(app_id, dict(body))
            if app is not None:
                apps.append(app)
        return apps

    def app(self, app_id: str, body: dict[str, Any]) -> AppSpec | None:
        where = f"apps.{app_id}"
        try:
            kind = AppKind(_expect(body.pop("kind"), str))
        except KeyError:
            self.problem(f"{where}.kind", "missing (gorush, fcm, apns or webpush)")
            return None
        except (_Bad, ValueError) as exc:
            what = str(exc) if isinstance(exc, _Bad) else "unknown kind"
            self.problem(f"{where}.kind", f"{what} (use gorush, fcm, apns or webpush)")
            return None
        before = len(self.problems)
        platforms, topics = self.routing(where, kind, body)
        for key in sorted(set(body) - _KIND_KEYS[kind]):
            self.problem(f"{where}.{key}", f"unknown key for kind {kind.value}")
            del body[key]
        credentials = self.credentials(where, kind, body)
        if credentials is None or len(self.problems) > before:
            return None
        return AppSpec(app_id, kind, platforms, topics, credentials)

    def routing(
        self, where: str, kind: AppKind, body: dict[str, Any]
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        default, allowed = _KIND_PLATFORMS[kind]
        platforms: tuple[str, ...] = default
        topics: tuple[str, ...] = ()
        if "platform" in body:
            value = body.pop("platform")
            try:
                listed = [value] if isinstance(value, str) else _expect(value, str, list)
                platforms = tuple(_expect(p, str) for p in listed)
                for platform in platforms:
                    if platform not in allowed:
                        raise _Bad(f"{platform!r} is not one of {kind.value}'s: {', '.join(sorted(allowed))}")
                if not platforms:
                    raise _Bad("no platform")
            except _Bad as exc:
                self.problem(f"{where}.platform", str(exc))
        if "topics" in body:
            try:
                topics = tuple(_expect(t, str) for t in _expect(body.pop("topics"), list))
                if "" in topics:
                    raise _Bad("an empty topic (leave topics out to make the app its platforms' default)")
            except _Bad as exc:
                self.problem(f"{where}.topics", str(exc))
        return platforms, topics

    def credentials(self, where: str, kind: AppKind, body: dict[str, Any]) -> Credentials | None:
        before = len(self.problems)
        values: dict[str, Any] = {}

        def take(key: str, convert: Callable[[Any], Any], *, required: bool = True) -> None:
            if key in body:
                try:
                    values[key] = convert(body[key])
                except _Bad as exc:
                    self.problem(f"{where}.{key}", str(exc))
            elif required:
                self.problem(f"{where}.{key}", "missing")

        if kind is AppKind.GORUSH:
            take("url", _http_url)
            take("bundleid", _string, required=False)
        elif kind is AppKind.FCM:
            take("service_account", self.service_account)
            take("url", _http_url, required=False)
            take("token_uri", _http_url, required=False)
        elif kind is AppKind.APNS:
            take("key_file", self.apns_key)
            take("key_id", _apple_id)
            take("team_id", _apple_id)
            take("sandbox", _bool, required=False)
            take("url", _http_url, required=False)
            take("ca_file", self.existing_file, required=False)
        else:
            take("vapid_private_key", self.vapid_key)
            take("vapid_subject", _vapid_subject)
        if len(self.problems) > before:
            return None
        if kind is AppKind.GORUSH:
            return GorushCredentials(values["url"], values.get("bundleid", ""))
        if kind is AppKind.FCM:
            path, account = values["service_account"]
            return FcmCredentials(path, account, values.get("url"), values.get("token_uri"))
        if kind is AppKind.APNS:
            key_file, private_key = values.pop("key_file")
            return ApnsCredentials(key_file, private_key=private_key, **values)
        key_file, private_key = values["vapid_private_key"]
        return WebPushCredentials(key_file, values["vapid_subject"], private_key=private_key)

    def service_account(self, value: Any) -> tuple[Path, ServiceAccount]:
        path, data = self.file(value)
        try:
            from trio_dht.push.fcm import FcmCredentialsError, parse_service_account
        except ImportError:  # pragma: no cover (httpx and trio come with the package)
            raise _Bad("FCM needs the httpx package") from None
        try:
            info = json.loads(data)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _Bad(f"{path} is not JSON: {exc}") from None
        try:
            return path, parse_service_account(info, str(path))
        except FcmCredentialsError as exc:
            raise _Bad(str(exc)) from None

    def apns_key(self, value: Any) -> tuple[Path, ec.EllipticCurvePrivateKey]:
        path, pem = self.file(value)
        try:
            from trio_dht.push.apns import ApnsKeyError, load_p8_key
        except ImportError:  # pragma: no cover (trio comes with the package)
            raise _Bad("APNs needs the trio package") from None
        try:
            return path, load_p8_key(pem, str(path))
        except ApnsKeyError as exc:
            raise _Bad(str(exc)) from None

    def vapid_key(self, value: Any) -> tuple[Path, ec.EllipticCurvePrivateKey]:
        path, pem = self.file(value)
        from trio_dht.push.vapid import MISSING, VapidKeyError, load_private_key

        if MISSING is not None:
            raise _Bad(MISSING)
        try:
            return path, load_private_key(pem)
        except VapidKeyError as exc:
            raise _Bad(f"{path} is {exc}") from None


def _http_url(value: Any) -> str:
    parts = urllib.parse.urlsplit(_expect(value, str))
    try:
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError as exc:
        raise _Bad(f"bad URL {value!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Bad(f"not an http:// or https:// URL: {value!r}")
    return value


def _apple_id(value: Any) -> str:
    if not _APPLE_ID.fullmatch(_expect(value, str)):
        raise _Bad(f"not an Apple key or team id (10 capital letters and digits): {value!r}")
    return value


def _vapid_subject(value: Any) -> str:
    text = _expect(value, str)
    parts = urllib.parse.urlsplit(text)
    if not ((parts.scheme == "mailto" and "@" in parts.path) or (parts.scheme == "https" and parts.hostname)):
        raise _Bad(f"not a mailto: or https: URL: {text!r}")
    return text


_UNSET = object()
"""A setting that leaves its destination as the flags' default (``no_ipv6 = false``)."""


def _flag(then: Any) -> Callable[[_Checker, Any], Any]:
    """A boolean key that, when true, sets its destination to ``then``."""
    return lambda _, value: then if _expect(value, bool) else _UNSET


def _string(value: Any) -> str:
    return _expect(value, str)


def _bool(value: Any) -> bool:
    return _expect(value, bool)


def _boolean(_: _Checker, value: Any) -> bool:
    return _expect(value, bool)


def _text(_: _Checker, value: Any) -> str:
    return _expect(value, str)


def _parsed(parse: Callable[[str], Any], *types: type) -> Callable[[_Checker, Any], Any]:
    """A key whose value is parsed as its flag's text would be (numbers as their text)."""
    return lambda _, value: _converted(parse, str(_expect(value, str, *types)))


def _bootstrap(_: _Checker, value: Any) -> list[tuple[str, int]]:
    return [_converted(cli.parse_host_port, _expect(item, str)) for item in _expect(value, list)]


def _verbose(_: _Checker, value: Any) -> int:
    if _expect(value, int) < 0:
        raise _Bad("must be 0 or more")
    return value


def _log_format(_: _Checker, value: Any) -> str:
    if _expect(value, str) not in FORMATS:
        raise _Bad(f"not a log format: {value!r} (use {' or '.join(FORMATS)})")
    return value


_SETTINGS: dict[str, tuple[str, Callable[[_Checker, Any], Any]]] = {
    "port": ("port", _parsed(cli.parse_port, int)),
    "bootstrap": ("bootstrap", _bootstrap),
    "net": ("network", lambda _, value: _converted(cli.parse_network_id, str(_expect(value, int)))),
    "bind": ("bind", _text),
    "bind6": ("bind6", _text),
    "no_ipv6": ("bind6", _flag(None)),
    "no_rate_limit": ("rate_limit", _flag(False)),
    "verbose": ("verbose", _verbose),
    "logfile": ("log_file", _Checker.path),
    "log_format": ("log_format", _log_format),
    "identity": ("identity", _boolean),
    "certificate": ("certificate", _Checker.existing_file),
    "privkey": ("private_key", _Checker.existing_file),
    "privkey_password": ("private_key_password", _text),
    "save_identity": ("save_identity", _Checker.path),
    "proxyserver": ("proxy_port", _parsed(cli.parse_port, int)),
    "no_proxy": ("proxy_port", _flag(0)),
    "proxy_addr": ("proxy_address", _text),
    "proxyserverssl": ("proxy_tls_port", _parsed(cli.parse_port, int)),
    "proxy_certificate": ("proxy_certificate", _Checker.existing_file),
    "proxy_privkey": ("proxy_private_key", _Checker.existing_file),
    "proxy_privkey_password": ("proxy_private_key_password", _text),
    "http_workers": ("http_workers", _parsed(cli.parse_workers, int)),
    "health_isolated_after": ("health_isolated_after", _parsed(cli.parse_lifetime, int, float)),
    "health_gateway_after": ("health_gateway_after", _parsed(cli.parse_lifetime, int, float)),
    "pushserver": ("push_server", _parsed(cli.parse_push_server)),
    "bundleid": ("bundle_id", _text),
    "subscription_lifetime": ("subscription_lifetime", _parsed(cli.parse_lifetime, int, float)),
    "persist": ("persist_path", _Checker.path),
    "push_allow_private_endpoints": ("allow_private_endpoints", _boolean),
}
"""Top-level key -> (argparse destination, check and convert)."""
