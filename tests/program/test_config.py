"""The command line parsed into AppConfig: durations, addresses, defaults, and flag errors."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_dht.cli import (
    DEFAULT_PROXY_PORT,
    AppConfig,
    format_host_port,
    parse_args,
    parse_duration,
    parse_host_port,
)
from trio_dht.node import DEFAULT_PORT
from trio_dht.proxy.settings import ProxyConfig, default_http_workers
from trio_dht.push.subscriptions import DEFAULT_LIFETIME


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("1.5", 1.5),
        ("90s", 90.0),
        ("30m", 1800.0),
        ("24h", 86400.0),
        ("2d", 172800.0),
        ("1h30m", 5400.0),
        ("1d2h3m4s", 93784.0),
        (" 24H ", 86400.0),
        ("0", 0.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "24x", "-5", "1h30", "30m1", "1.h", "24 h", "1e3", "forever"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@given(st.integers(0, 10**6), st.integers(0, 59), st.integers(0, 59))
def test_parse_duration_sums_its_parts(hours: int, minutes: int, seconds: int) -> None:
    assert parse_duration(f"{hours}h{minutes}m{seconds}s") == hours * 3600 + minutes * 60 + seconds


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bootstrap.jami.net", ("bootstrap.jami.net", DEFAULT_PORT)),
        ("bootstrap.jami.net:4223", ("bootstrap.jami.net", 4223)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        ("[::1]:4222", ("::1", 4222)),
        ("[::1]", ("::1", DEFAULT_PORT)),
        ("::1", ("::1", DEFAULT_PORT)),
        ("2001:db8::7", ("2001:db8::7", DEFAULT_PORT)),
    ],
)
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize(
    "text", [":4222", "host:", "host:0", "host:65536", "host:x", "[::1", "[::1]x", "[]:1", ""]
)
def test_parse_host_port_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text)


def test_parse_host_port_without_default_needs_a_port() -> None:
    with pytest.raises(ValueError, match="no port"):
        parse_host_port("gorush", default_port=None)


@given(st.sampled_from(["example.org", "10.0.0.1", "::1", "fe80::1"]), st.integers(1, 65535))
def test_format_host_port_round_trips(host: str, port: int) -> None:
    assert parse_host_port(format_host_port(host, port)) == (host, port)


def test_defaults_run_a_node_and_a_proxy_on_8000() -> None:
    config = parse_args([])
    assert config == AppConfig()
    assert config.port == DEFAULT_PORT == 4222
    assert config.bootstrap == ()
    assert config.network == 0
    assert config.proxy is not None
    assert (config.proxy.port, config.proxy.tls_port) == (DEFAULT_PROXY_PORT, None) == (8000, None)
    assert config.subscription_lifetime == DEFAULT_LIFETIME


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        parse_args([]).port = 1  # type: ignore[misc]


def test_dhtnode_flags() -> None:
    config = parse_args(
        [
            "-p",
            "0",
            "-b",
            "bootstrap.jami.net",
            "-b",
            "[::1]:4223",
            "--bootstrap",
            "10.0.0.1:5",
            "-n",
            "7",
            "-v",
        ]
    )
    assert config.port == 0
    assert config.bootstrap == (("bootstrap.jami.net", 4222), ("::1", 4223), ("10.0.0.1", 5))
    assert config.network == 7
    assert config.verbose == 1
    assert parse_args(["--net", "0x10", "-vv"]).network == 16
    assert parse_args(["-vv"]).verbose == 2


def test_identity_flags(tmp_path, capsys) -> None:
    assert parse_args(["-i"]).identity is True
    assert parse_args([]).identity is False and parse_args([]).certificate is None
    cert, key = tmp_path / "n.crt", tmp_path / "n.pem"
    cert.write_text("x")
    key.write_text("x")
    config = parse_args(["--certificate", str(cert), "--privkey", str(key), "--save-identity", "out"])
    assert (config.certificate, config.private_key, config.save_identity) == (cert, key, Path("out"))
    for argv, message in (
        (["--certificate", str(cert)], "--certificate and --privkey go together"),
        (["--privkey-password", "pw"], "--privkey-password is only used with --privkey"),
        (["--save-identity", "out"], "--save-identity needs an identity"),
        (["--certificate", str(tmp_path / "no"), "--privkey", str(key)], "no such file"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bind_addresses() -> None:
    assert (parse_args([]).bind, parse_args([]).bind6) == ("0.0.0.0", "::")
    config = parse_args(["--bind", "127.0.0.1", "--bind6", "::1"])
    assert (config.bind, config.bind6) == ("127.0.0.1", "::1")
    assert parse_args(["--no-ipv6"]).bind6 is None


@pytest.mark.parametrize("flags", [["--proxyserver", "0"], ["--no-proxy"]])
def test_proxy_can_be_turned_off(flags: list[str]) -> None:
    assert parse_args(flags).proxy is None


def test_proxy_flags(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("cert")
    key.write_text("key")
    config = parse_args(
        [
            *("--proxyserver", "8080", "--proxy-addr", "127.0.0.1", "--proxyserverssl", "8443"),
            *(
                "--proxy-certificate",
                str(cert),
                "--proxy-privkey",
                str(key),
                "--proxy-privkey-password",
                "pw",
            ),
        ]
    )
    assert config.proxy is not None
    assert (config.proxy.host, config.proxy.port, config.proxy.tls_port) == ("127.0.0.1", 8080, 8443)
    assert (config.proxy.certificate, config.proxy.private_key) == (str(cert), str(key))
    assert config.proxy.private_key_password == "pw"
    tls_only = parse_args(
        [
            "--no-proxy",
            "--proxyserverssl",
            "8443",
            "--proxy-certificate",
            str(cert),
            "--proxy-privkey",
            str(key),
        ]
    )
    assert tls_only.proxy is not None
    assert (tls_only.proxy.port, tls_only.proxy.tls_port) == (None, 8443)


def test_push_flags(tmp_path: Path) -> None:
    config = parse_args(
        [
            *("--pushserver", "localhost:8088", "--bundleid", "com.example.app"),
            *("--subscription-lifetime", "6h", "-f", str(tmp_path / "state")),
        ]
    )
    assert config.push_server == "localhost:8088"
    assert config.bundle_id == "com.example.app"
    assert config.subscription_lifetime == 6 * 3600
    assert config.persist_path == tmp_path / "state"
    assert parse_args(["--pushserver", "[::1]:8088"]).push_server == "[::1]:8088"
    assert parse_args(["--persist", "x"]).persist_path == Path("x")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-p", "65536"], "out of range"),
        (["-p", "http"], "not a port number"),
        (["-b", "host:0"], "out of range"),
        (["-b", "[::1"], "bad address"),
        (["-n", "-1"], "out of range"),
        (["-n", "public"], "not a network id"),
        (["--proxyserver", "-1"], "out of range"),
        (["--proxyserverssl", "8443"], "needs both a certificate and a private key"),
        (["--proxy-certificate", "cert.pem"], "only used with --proxyserverssl"),
        (["--proxyserverssl", "1", "--proxy-certificate", "nope", "--proxy-privkey", "nope"], "no such file"),
        (["--pushserver", "gorush"], "no port"),
        (["--subscription-lifetime", "0"], "must be positive"),
        (["--subscription-lifetime", "soon"], "not a duration"),
        (["--client"], "unrecognized arguments"),
    ],
)
def test_bad_flags_exit_2_with_a_reason(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: trio-dht")
    assert message in err


def test_no_rate_limit_and_private_endpoint_flags() -> None:
    default = parse_args([])
    assert default.rate_limit and not default.allow_private_endpoints
    config = parse_args(["-U", "--push-allow-private-endpoints"])
    assert not config.rate_limit and config.allow_private_endpoints


def test_http_workers() -> None:
    assert parse_args([]).proxy.http_workers == default_http_workers()
    assert default_http_workers() == (1 if sys.platform == "linux" and (os.cpu_count() or 1) >= 2 else 0)
    assert parse_args(["--http-workers", "0"]).proxy.http_workers == 0
    assert parse_args(["--http-workers", "3"]).proxy.http_workers == 3
    for bad in ("-1", "65", "two"):
        with pytest.raises(SystemExit):
            parse_args(["--http-workers", bad])
    with pytest.raises(ValueError, match="http_workers"):
        ProxyConfig(http_workers=-1)


def test_bootstrap_without_a_host_joins_the_public_network() -> None:
    public = ("bootstrap.jami.net", 4222)
    assert parse_args(["-b"]).bootstrap == (public,)
    assert parse_args(["-b", "-p", "4300"]).bootstrap == (public,)
    assert parse_args(["-b", "-b", "10.0.0.1"]).bootstrap == (public, ("10.0.0.1", 4222))
