"""``--config FILE``: a TOML file with the flags' settings, [limits] and push apps; flags override it; every
problem is one line and exit code 2; ``route`` picks a subscription's app."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cli_process import LOOPBACK_NODE, trio_dht_process
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from trio_dht.cli import AppConfig, parse_args
from trio_dht.config_file import (
    ApnsCredentials,
    AppKind,
    AppSpec,
    FcmCredentials,
    GorushCredentials,
    WebPushCredentials,
    parse_config,
    route,
)
from trio_dht.limits import Limits
from trio_dht.proxy.settings import ProxyConfig, default_http_workers
from trio_dht.push.vapid import load_private_key, public_key_b64

P8_PKCS8 = serialization.PrivateFormat.PKCS8
SEC1 = serialization.PrivateFormat.TraditionalOpenSSL


def pem(key, fmt=P8_PKCS8) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of key files, good and bad."""
    folder = tmp_path_factory.mktemp("keys")
    rsa_key = rsa.generate_private_key(65537, 2048)
    account = {
        "type": "service_account",
        "project_id": "my-project",
        "client_email": "push@my-project.iam.gserviceaccount.com",
        "private_key": pem(rsa_key).decode(),
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    (folder / "account.json").write_text(json.dumps(account))
    (folder / "account-no-key.json").write_text(json.dumps({"project_id": "p"}))
    (folder / "account-ec.json").write_text(
        json.dumps(account | {"private_key": pem(ec.generate_private_key(ec.SECP256R1())).decode()})
    )
    (folder / "not-json.json").write_text("{project_id")
    p256 = ec.generate_private_key(ec.SECP256R1())
    (folder / "AuthKey.p8").write_bytes(pem(p256))
    (folder / "sec1.pem").write_bytes(pem(p256, SEC1))
    (folder / "p384.p8").write_bytes(pem(ec.generate_private_key(ec.SECP384R1())))
    (folder / "rsa.pem").write_bytes(pem(rsa_key))
    (folder / "garbage.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    (folder / "ca.pem").write_text("ca")
    (folder / "cert.pem").write_text("cert")
    return folder


GOOD = """
port = 4300
bootstrap = ["bootstrap.jami.net", "[::1]:4223"]
net = 7
bind = "127.0.0.1"
no_ipv6 = true
no_rate_limit = true
verbose = 1
logfile = "trio-dht.log"
log_format = "json"
proxyserver = 8080
proxy_addr = "127.0.0.1"
http_workers = 0
subscription_lifetime = "6h"
persist = "state.sqlite"
push_allow_private_endpoints = true

[limits]
udp_listeners = 5000
http_send_buffer = "8M"
push_request_timeout = 2.5

[apps.android]
kind = "fcm"
service_account = "{keys}/account.json"
topics = ["org.example.app"]

[apps.ios]
kind = "apns"
key_file = "{keys}/AuthKey.p8"
key_id = "ABC123DEFG"
team_id = "TEAM123456"
sandbox = true
url = "https://127.0.0.1:8443"
ca_file = "{keys}/ca.pem"
topics = ["org.example.app", "org.example.app.voip"]

[apps.up]
kind = "webpush"
vapid_private_key = "{keys}/sec1.pem"
vapid_subject = "mailto:ops@example.org"

[apps.legacy]
kind = "gorush"
url = "http://gorush.internal:8088"
bundleid = "org.example.old"
platform = ["android", "ios"]
"""


def write(folder: Path, text: str, name: str = "trio-dht.toml", **values: object) -> Path:
    path = folder / name
    path.write_text(text.format(**values) if values else text)
    return path


def test_a_good_file_is_the_app_config(tmp_path: Path, keys: Path) -> None:
    path = write(tmp_path, GOOD, keys=keys)
    config = parse_args(["--config", str(path)])
    assert config == AppConfig(
        port=4300,
        bootstrap=(("bootstrap.jami.net", 4222), ("::1", 4223)),
        network=7,
        bind="127.0.0.1",
        bind6=None,
        rate_limit=False,
        verbose=1,
        log_file=tmp_path / "trio-dht.log",  # relative to the file's folder
        log_format="json",
        proxy=ProxyConfig(
            host="127.0.0.1",
            port=8080,
            http_workers=0,
            limits=config.limits,
        ),
        subscription_lifetime=6 * 3600,
        persist_path=tmp_path / "state.sqlite",  # relative to the file's folder
        allow_private_endpoints=True,
        limits=Limits().replace(["udp_listeners=5000", "http_send_buffer=8M", "push_request_timeout=2.5"]),
        apps=config.apps,
    )
    android, ios, up, legacy = config.apps
    assert android == AppSpec("android", AppKind.FCM, ("android",), ("org.example.app",), android.credentials)
    assert isinstance(android.credentials, FcmCredentials)
    account = android.credentials.account
    assert (account.project_id, account.client_email) == (
        "my-project",
        "push@my-project.iam.gserviceaccount.com",
    )
    assert account.private_key.key_size == 2048  # loaded, once, for the gateway
    assert "private_key" not in repr(android.credentials) and "ServiceAccount" not in repr(
        android.credentials
    )
    assert ios.platforms == ("ios",) and ios.topics == ("org.example.app", "org.example.app.voip")
    assert ios.credentials == ApnsCredentials(
        keys / "AuthKey.p8",
        "ABC123DEFG",
        "TEAM123456",
        sandbox=True,
        url="https://127.0.0.1:8443",
        ca_file=keys / "ca.pem",
        private_key=ios.credentials.private_key,
    )
    assert_same_key(ios.credentials.private_key, keys / "AuthKey.p8")  # loaded, once, for the gateway
    assert up == AppSpec(
        "up",
        AppKind.WEBPUSH,
        ("unifiedpush",),
        (),
        WebPushCredentials(
            keys / "sec1.pem", "mailto:ops@example.org", private_key=up.credentials.private_key
        ),
    )
    assert_same_key(up.credentials.private_key, keys / "sec1.pem")
    assert legacy.credentials == GorushCredentials("http://gorush.internal:8088", "org.example.old")
    assert legacy.platforms == ("android", "ios") and legacy.topics == ()


def test_flags_given_override_the_file(tmp_path: Path, keys: Path) -> None:
    path = write(tmp_path, GOOD, keys=keys)
    config = parse_args(
        [
            *("--config", str(path), "-p", "0", "-b", "10.0.0.1", "--bind6", "::1", "-vv"),
            *("--proxyserver", "0", "--limit", "udp_listeners=7", "--subscription-lifetime", "90"),
        ]
    )
    assert config.port == 0
    assert config.bootstrap == (("10.0.0.1", 4222),)  # replaces the file's list
    assert config.bind6 == "::1" and config.verbose == 2
    assert config.proxy is None
    assert config.limits.udp_listeners == 7  # the flag wins...
    assert config.limits.http_send_buffer == 8 * 1024 * 1024  # ...and the file's other limits stay
    assert config.subscription_lifetime == 90
    assert config.network == 7 and config.persist_path == tmp_path / "state.sqlite"  # not given: the file's
    # A flag equal to its default still counts as given.
    assert parse_args(["--config", str(path), "--net", "0"]).network == 0


def test_a_file_setting_a_flag_off(tmp_path: Path) -> None:
    path = write(tmp_path, "no_proxy = true\nno_ipv6 = false\nidentity = false\n")
    config = parse_args(["--config", str(path)])
    assert config.proxy is None and config.bind6 == "::" and not config.identity
    assert parse_args(["--config", str(path), "--proxyserver", "8001"]).proxy.port == 8001
    assert parse_args(["--config", str(write(tmp_path, ""))]) == AppConfig()


def test_pushserver_shorthand_is_one_gorush_app() -> None:
    assert parse_args([]).apps == ()
    config = parse_args(["--pushserver", "localhost:8088", "--bundleid", "com.example.app"])
    assert (config.push_server, config.bundle_id) == ("localhost:8088", "com.example.app")
    (app,) = config.apps
    assert app == AppSpec(
        "pushserver",
        AppKind.GORUSH,
        ("android", "ios"),
        (),
        GorushCredentials("http://localhost:8088", "com.example.app"),
    )
    assert route(config.apps, "android", "") is app
    assert route(config.apps, "", "") is app  # a subscription without a platform is sent as iOS
    assert route(config.apps, "unifiedpush", "") is None


def test_pushserver_in_the_file_and_its_conflicts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, 'pushserver = "[::1]:8088"\nbundleid = "b.id"\n')
    config = parse_args(["--config", str(path)])
    assert config.push_server == "[::1]:8088"
    assert config.apps[0].credentials == GorushCredentials("http://[::1]:8088", "b.id")
    clash = write(tmp_path, '[apps.g]\nkind = "gorush"\nurl = "http://g:1"\nplatform = "android"\n', "c.toml")
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config", str(clash), "--pushserver", "h:2"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"trio-dht: config: {clash}: apps.pushserver: android the default (no topics) is already apps.g's\n"
    )


BAD = """
port = "http"
proxyserver = 70000
bootstrap = "one.example"
net = -1
verbose = true
subscription_lifetime = "soon"
certificate = "missing.crt"
bind6 = "::1"
no_ipv6 = true
surprise = 1

[limits]
udp_listeners = "lots"
udp_nonsense = 3

[apps.a]
kind = "fcm"
service_account = "{keys}/nowhere.json"

[apps.b]
kind = "fcm"
service_account = "{keys}/account-no-key.json"

[apps.c]
kind = "apns"
key_file = "{keys}/sec1.pem"
key_id = "short"
team_id = "TEAM123456"
sandbox = "yes"

[apps.d]
kind = "apns"
key_file = "{keys}/p384.p8"
key_id = "ABC123DEFG"
team_id = "TEAM123456"

[apps.e]
kind = "webpush"
vapid_private_key = "{keys}/rsa.pem"
vapid_subject = "ops@example.org"

[apps.f]
kind = "carrier-pigeon"

[apps.g]
kind = "gorush"
url = "http://g:1"
colour = "blue"
platform = "unifiedpush"

[apps.h]
kind = "webpush"
vapid_private_key = "{keys}/garbage.pem"
vapid_subject = "https://example.org/contact"

[apps.i]
kind = "fcm"
service_account = "{keys}/not-json.json"

[apps.j]
kind = "fcm"
service_account = "{keys}/account-ec.json"
topics = "org.example"

[apps.ios1]
kind = "apns"
key_file = "{keys}/AuthKey.p8"
key_id = "ABC123DEFG"
team_id = "TEAM123456"
topics = ["org.example.app"]

[apps.ios2]
kind = "apns"
key_file = "{keys}/AuthKey.p8"
key_id = "ABC123DEFG"
team_id = "TEAM123456"
topics = ["org.example.app"]

[apps.up1]
kind = "webpush"
vapid_private_key = "{keys}/AuthKey.p8"
vapid_subject = "mailto:a@example.org"

[apps.up2]
kind = "webpush"
vapid_private_key = "{keys}/AuthKey.p8"
vapid_subject = "mailto:b@example.org"
"""

EXPECTED = [
    "port: not a port number: 'http'",
    "proxyserver: port 70000 is out of range 0..65535",
    "bootstrap: expected an array, not a string",
    "net: network id -1 is out of range 0..4294967295",
    "verbose: expected an integer, not a boolean",
    "subscription_lifetime: not a duration: 'soon' (use e.g. 90, 90s, 30m, 24h, 1h30m)",
    "certificate: no such file: {dir}/missing.crt",
    "no_ipv6: contradicts bind6",
    "surprise: unknown key",
    "limits.udp_listeners: not a size: 'lots' (use e.g. 1000, 64K, 4M)",
    "limits.udp_nonsense: unknown limit (trio-dht --limits lists them)",
    "apps.a.service_account: no such file: {keys}/nowhere.json",
    "apps.b.service_account: {keys}/account-no-key.json: 'client_email' is missing or not a non-empty string",
    "apps.c.key_file: {keys}/sec1.pem is not a PEM PKCS#8 private key (a .p8 file)",
    "apps.c.key_id: not an Apple key or team id (10 capital letters and digits): 'short'",
    "apps.c.sandbox: expected a boolean, not a string",
    "apps.d.key_file: {keys}/p384.p8 is a secp384r1 key; APNs keys are P-256 (secp256r1)",
    "apps.e.vapid_private_key: {keys}/rsa.pem is not an EC P-256 private key",
    "apps.e.vapid_subject: not a mailto: or https: URL: 'ops@example.org'",
    "apps.f.kind: unknown kind (use gorush, fcm, apns or webpush)",
    "apps.g.platform: 'unifiedpush' is not one of gorush's: android, ios",
    "apps.g.colour: unknown key for kind gorush",
    "apps.h.vapid_private_key: {keys}/garbage.pem is not an unencrypted PEM private key",
    "apps.i.service_account: {keys}/not-json.json is not JSON",
    "apps.j.topics: expected an array, not a string",
    "apps.j.service_account: {keys}/account-ec.json: private_key: private key: not an RSA key (ECPrivateKey)",
    "apps.ios2: ios topic 'org.example.app' is already apps.ios1's",
    "apps.up2: unifiedpush the default (no topics) is already apps.up1's",
]


def test_every_problem_is_reported_at_once_one_line_each_exit_2(tmp_path: Path, keys: Path) -> None:
    path = write(tmp_path, BAD, "bad.toml", keys=keys)
    done = subprocess.run(
        [sys.executable, "-m", "trio_dht", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == len(EXPECTED), done.stderr
    prefix = f"trio-dht: config: {path}: "
    for line, expected in zip(lines, EXPECTED, strict=True):
        assert line.startswith(prefix + expected.format(dir=tmp_path, keys=keys)), line
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("port = ]\nbind = 1", "syntax: Invalid value (at line 1, column 8)"),
        ("apps = 3", "apps: expected a table of [apps.<id>] tables, not an integer"),
        ("[apps]\nx = 1", "apps.x: expected a table, not an integer"),
        ("limits = []", "limits: expected a table, not an array"),
        (
            "[apps.x]\nurl = 'http://a:1'",
            "apps.x.kind: missing (gorush, fcm, apps or webpush)".replace("apps or", "apns or"),
        ),
        ("[apps.x]\nkind = 'gorush'", "apps.x.url: missing"),
        (
            "[apps.x]\nkind = 'gorush'\nurl = 'gorush:8088'",
            "apps.x.url: not an http:// or https:// URL: 'gorush:8088'",
        ),
        ("[apps.x]\nkind = 'apns'\ntopics = ['']", "apps.x.topics: an empty topic"),
        ("[apps.x]\nkind = 'webpush'\nplatform = []", "apps.x.platform: no platform"),
        ("pushserver = 'gorush'", "pushserver: bad address 'gorush': no port"),
        ("http_workers = 65", "http_workers: not a count from 0 to 64: '65'"),
        ("config = 'other.toml'", "config: unknown key"),
        ("log_format = 'xml'", "log_format: not a log format: 'xml' (use text or json)"),
        ("logfile = 3", "logfile: expected a string, not an integer"),
        ("proxy-addr = '::1'", "proxy-addr: unknown key (keys are written with underscores: proxy_addr)"),
    ],
)
def test_one_problem(tmp_path: Path, text: str, problem: str) -> None:
    loaded = parse_config(text, path=tmp_path / "x.toml")
    assert [p for p in loaded.problems if p.startswith(problem)] == [loaded.problems[0]], loaded.problems


def assert_same_key(private_key: Any, pem_file: Path) -> None:
    """``private_key`` is the key in ``pem_file``."""
    assert private_key.private_numbers() == load_private_key(pem_file.read_bytes()).private_numbers()


def test_an_unreadable_file_is_a_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config", str(tmp_path / "nope.toml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"trio-dht: config: {tmp_path / 'nope.toml'}: file: cannot read it: No such file or directory\n"
    )


def test_key_files_are_read_through_read(tmp_path: Path, keys: Path) -> None:
    """The checker is sans-IO apart from ``read``: a key file can come from anywhere."""
    key = (keys / "AuthKey.p8").read_bytes()
    text = "[apps.w]\nkind = 'webpush'\nvapid_private_key = 'k.pem'\nvapid_subject = 'mailto:a@b.c'\n"
    read_paths: list[Path] = []

    def read(path: Path) -> bytes:
        read_paths.append(path)
        return key

    loaded = parse_config(text, path=Path("/etc/trio-dht/config.toml"), read=read)
    assert loaded.problems == ()
    assert read_paths == [Path("/etc/trio-dht/k.pem")]
    assert_same_key(loaded.apps[0].credentials.private_key, keys / "AuthKey.p8")


def test_every_long_flag_is_a_key() -> None:
    """The file maps every flag but --config (and --limit/--limits, its [limits] table), by its long name;
    --interactive is not a setting: the prompt needs the terminal of whoever started the program."""
    from trio_dht.cli import build_parser
    from trio_dht.config_file import _SETTINGS

    longs = {
        option[2:].replace("-", "_")
        for action in build_parser()._actions
        for option in action.option_strings
        if option.startswith("--")
    }
    assert longs - set(_SETTINGS) == {"help", "version", "config", "limit", "limits", "interactive"}


def test_defaults_are_untouched_without_a_file() -> None:
    assert parse_args([]).proxy == ProxyConfig(http_workers=default_http_workers())


# -- route ---


def app(app_id: str, platforms: tuple[str, ...], topics: tuple[str, ...] = ()) -> AppSpec:
    return AppSpec(app_id, AppKind.GORUSH, platforms, topics, GorushCredentials(f"http://{app_id}:1"))


APPS = (
    app("voip", ("ios",), ("org.example.voip",)),
    app("ios-default", ("ios",)),
    app("android-a", ("android",), ("org.example.a", "org.example.voip")),
    app("android-default", ("android",)),
    app("up", ("unifiedpush",)),
)


@pytest.mark.parametrize(
    ("platform", "topic", "expected"),
    [
        ("ios", "org.example.voip", "voip"),  # exact topic first...
        ("ios", "org.example.other", "ios-default"),  # ...then the platform's app without topics
        ("ios", "", "ios-default"),
        ("android", "org.example.voip", "android-a"),  # a topic is matched within its platform
        ("android", "org.example.a", "android-a"),
        ("android", "org.example.b", "android-default"),
        ("unifiedpush", "p256dh|auth", "up"),
        ("", "org.example.voip", "voip"),  # no platform, or an unknown one: as iOS
        ("foo", "", "ios-default"),
        ("web", "", "ios-default"),  # not an OpenDHT platform: as iOS
    ],
)
def test_route(platform: str, topic: str, expected: str | None) -> None:
    found = route(APPS, platform, topic)
    assert (found.id if found else None) == expected


def test_route_without_a_default() -> None:
    only_topics = (app("voip", ("ios",), ("org.example.voip",)),)
    assert route(only_topics, "ios", "org.example.voip") is only_topics[0]
    assert route(only_topics, "ios", "org.example.app") is None
    assert route((), "android", "") is None


async def test_the_program_runs_with_a_file_and_uses_its_apps(tmp_path: Path, keys: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = write(
        tmp_path,
        f"""
proxyserver = {port}
proxy_addr = "127.0.0.1"
http_workers = 0
[apps.up]
kind = "webpush"
vapid_private_key = "{keys}/AuthKey.p8"
vapid_subject = "mailto:ops@example.org"
[apps.gorush]
kind = "gorush"
url = "http://127.0.0.1:9"
""",
    )
    command = [sys.executable, "-m", "trio_dht", *LOOPBACK_NODE, "--config", str(path)]
    async with trio_dht_process(command) as node:
        assert node.process.returncode is None, node.output
        assert await node.stop() == 0
    public = public_key_b64(load_private_key((keys / "AuthKey.p8").read_bytes()))
    assert f"UnifiedPush requests signed with VAPID key {public}" in node.output
    assert "android and ios pushes through gorush at http://127.0.0.1:9" in node.output
    assert f"proxy on http://127.0.0.1:{port}" in node.output


def test_files_past_their_size_are_refused_unread(tmp_path: Path) -> None:
    from trio_dht.config_file import MAX_FILE_BYTES, load_config

    huge = tmp_path / "huge.json"
    huge.write_bytes(b" " * (MAX_FILE_BYTES + 1))
    config = tmp_path / "c.toml"
    config.write_text(f'[apps.a]\nkind = "fcm"\nservice_account = "{huge}"\n')
    assert load_config(config).problems == (
        f"apps.a.service_account: {huge}: more than {MAX_FILE_BYTES} bytes",
    )
    config.write_bytes(b"#" * (MAX_FILE_BYTES + 1))
    assert load_config(config).problems == (f"file: more than {MAX_FILE_BYTES} bytes",)
