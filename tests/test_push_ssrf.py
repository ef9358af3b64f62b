"""The SSRF guard on UnifiedPush endpoints."""

import ipaddress

import pytest

from trio_dht.push.ssrf import ForbiddenEndpoint, is_forbidden_address, parse_endpoint, resolve_endpoint


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
     "224.0.0.1", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1"],
)  # fmt: skip
def test_private_addresses_are_forbidden(address):
    assert is_forbidden_address(ipaddress.ip_address(address))


def test_public_addresses_are_allowed():
    for address in ("8.8.8.8", "2606:4700:4700::1111", "::ffff:1.1.1.1"):
        assert not is_forbidden_address(ipaddress.ip_address(address))


def test_endpoint_form():
    ep = parse_endpoint("https://push.example:8443/up/x?y=1")
    assert (ep.scheme, ep.host, ep.port, ep.target) == ("https", "push.example", 8443, "/up/x?y=1")
    assert (
        parse_endpoint("http://push.example").port == 80
        and parse_endpoint("http://push.example").target == "/"
    )
    for bad in ("ftp://push.example/", "https:///x", "https://u:p@push.example/", "http://push.example:99999/",
                "https://push.example/" + "x" * 1000, "not a url"):  # fmt: skip
        with pytest.raises(ForbiddenEndpoint):
            parse_endpoint(bad)


def test_literal_private_hosts_are_refused_unless_allowed():
    for url in ("http://127.0.0.1:8080/up", "http://[::1]/up", "http://localhost/up", "http://10.0.0.1/"):
        with pytest.raises(ForbiddenEndpoint):
            parse_endpoint(url)
        assert parse_endpoint(url, allow_private=True).url == url


async def test_resolution_checks_every_address():
    with pytest.raises(ForbiddenEndpoint):
        await resolve_endpoint(parse_endpoint("http://localhost/up", allow_private=True))
    with pytest.raises(ForbiddenEndpoint):
        await resolve_endpoint(parse_endpoint("http://127.0.0.1/up", allow_private=True))
