"""The SSRF guard on UnifiedPush endpoints."""

import ipaddress
import socket
import threading

import pytest
import trio

from trio_dht.push.ssrf import (
    ForbiddenEndpoint,
    Lookups,
    LookupStuck,
    is_forbidden_address,
    numeric_ipv4,
    parse_endpoint,
    resolve_endpoint,
)


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


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "64:ff9b::c0a8:101",  # NAT64 of 192.168.1.1
        "64:ff9b:1::a00:1",  # local-use NAT64: refused whole
        "64:ff9b:1:ffff::808:808",
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
        "::127.0.0.1",  # IPv4-compatible
        "::10.0.0.1",
        "::",
        "::ffff:0:127.0.0.1",  # IPv4-translated (SIIT)
        "::ffff:169.254.169.254",
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
        "2001:0:7f00:1::",
        "2001:db8::1",
        "3fff::1",
        "2607:f8b0::5efe:c0a8:101",  # ISATAP interface id carrying 192.168.1.1
        "2607:f8b0::200:5efe:a00:1",  # ISATAP, universal bit set, 10.0.0.1
        "100::1",  # discard-only
        "ff02::1",
        "fec0::1",  # site-local
        "5f00::1",  # SRv6 SIDs: not global unicast
        "192.0.0.8",  # IETF protocol assignments
        "192.88.99.1",  # 6to4 relay anycast
        "198.18.0.1",
        "255.255.255.255",
        "fe80::1%eth0",
    ],
)
def test_embedded_and_special_addresses_are_forbidden(address):
    assert is_forbidden_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address",
    ["64:ff9b::808:808", "2002:808:808::1", "::ffff:0:8.8.8.8", "2607:f8b0::5efe:808:808", "1.1.1.1"],
)
def test_embedded_public_addresses_are_allowed(address):
    assert not is_forbidden_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("00000127.0.0.1", "87.0.0.1"),  # octal, as inet_aton reads it
        ("10.0x10.1", "10.16.0.1"),
        ("134744072", "8.8.8.8"),
    ],
)
def test_numeric_hosts_decode_as_inet_aton_does(host, address):
    import socket

    assert numeric_ipv4(host) == ipaddress.IPv4Address(address)
    assert socket.inet_aton(host) == ipaddress.IPv4Address(address).packed  # the system agrees


def test_numeric_hosts_that_do_not_decode_are_refused():
    for host in ("1.2.3.4.5", "08.1", "256.1.1.1", "1.16777216"):
        with pytest.raises(ForbiddenEndpoint):
            numeric_ipv4(host)
    assert numeric_ipv4("push.example") is None
    assert numeric_ipv4("123.example") is None


@pytest.mark.parametrize(
    "url",
    [
        "http://2130706433/up",
        "http://0x7f.1/up",
        "http://017700000001:8080/up",
        "http://127.1/",
        "http://127.0.0.1./",
        "http://0x7f.0.0.1./",
        "http://localhost./up",
        "http://a.localhost/up",
        "http://[64:ff9b::7f00:1]/up",
        "http://[64:ff9b::a9fe:a9fe]/latest/meta-data",
        "http://[2002:7f00:1::1]/up",
        "http://[::127.0.0.1]/up",
        "http://[::ffff:127.0.0.1]/up",
        "http://[::ffff:7f00:1]/up",
        "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/up",
        "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]:8080/up",  # Teredo
        "http://[64:ff9b:1::7f00:1]:8080/up",  # local-use NAT64
        "http://[2002:7f00:1::1]:8080/up",  # 6to4
        "http://0177.0.0.1:8080/up",
        "http://[fe80::1%25eth0]/up",
        "https://1.2.3.4.5/up",
    ],
)
def test_odd_spellings_of_private_hosts_are_refused(url):
    with pytest.raises(ForbiddenEndpoint):
        parse_endpoint(url)


def test_public_numeric_and_embedded_hosts_are_accepted():
    assert parse_endpoint("http://134744072/up").host == "134744072"
    assert parse_endpoint("https://[64:ff9b::808:808]/up").port == 443


async def test_resolution_refuses_numeric_spellings_and_embedded_addresses():
    for url in ("http://2130706433/up", "http://0x7f.1/up", "http://[64:ff9b::7f00:1]/up"):
        with pytest.raises(ForbiddenEndpoint):
            await resolve_endpoint(parse_endpoint(url, allow_private=True))


async def test_resolution_checks_what_the_resolver_answers(monkeypatch):
    """A name whose DNS answer holds any private address is refused; the address returned is one checked."""

    answers = {
        "mixed.example": ["93.184.216.34", "64:ff9b::a00:1"],
        "public.example": ["93.184.216.34", "2606:4700::1"],
    }

    def fake_getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        if flags & socket.AI_NUMERICHOST:
            raise socket.gaierror(socket.EAI_NONAME, "not numeric")
        return [(0, 0, 0, "", (a, port)) for a in answers[host.decode()]]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(ForbiddenEndpoint, match="64:ff9b::a00:1"):
        await resolve_endpoint(parse_endpoint("https://mixed.example/up"))
    assert await resolve_endpoint(parse_endpoint("https://public.example/up")) == ipaddress.ip_address(
        "93.184.216.34"
    )


async def test_abandoned_slow_lookups_hold_only_their_own_slots_one_per_host(monkeypatch):
    """Lookups abandoned at their deadline keep their threads until the resolver answers: they hold slots
    of the lookups' own limiter (never trio's default one), one per host, and other hosts still resolve."""
    release = threading.Event()

    def fake_getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        if flags & socket.AI_NUMERICHOST:
            raise socket.gaierror(socket.EAI_NONAME, "not numeric")
        if host.startswith(b"slow"):
            release.wait(10)
        return [(0, 0, 0, "", ("93.184.216.34", port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    lookups = Lookups(4)
    try:
        for i in range(3):
            with trio.move_on_after(0.05) as scope:
                await resolve_endpoint(parse_endpoint(f"https://slow{i}.example/up"), lookups)
            assert scope.cancelled_caught
        assert lookups.limiter.borrowed_tokens == 3
        assert trio.to_thread.current_default_thread_limiter().borrowed_tokens == 0
        with trio.fail_after(5):
            with pytest.raises(LookupStuck):  # at once: no second thread for a host still being looked up
                await resolve_endpoint(parse_endpoint("https://slow0.example/other"), lookups)
            address = await resolve_endpoint(parse_endpoint("https://fast.example/up"), lookups)
        assert address == ipaddress.ip_address("93.184.216.34") and lookups.limiter.borrowed_tokens == 3
        # The last slot taken: a lookup waiting for one gives up at its deadline, leaving no mark behind.
        with trio.move_on_after(0.05):
            await resolve_endpoint(parse_endpoint("https://slow3.example/up"), lookups)
        with trio.move_on_after(0.05):
            await resolve_endpoint(parse_endpoint("https://slow4.example/up"), lookups)
        assert lookups.limiter.borrowed_tokens == 4
    finally:
        release.set()
    with trio.fail_after(10):
        while lookups.limiter.borrowed_tokens:  # the abandoned threads end, and give their slots back
            await trio.sleep(0.01)
        for host in ("slow0", "slow4"):
            await resolve_endpoint(parse_endpoint(f"https://{host}.example/up"), lookups)


async def test_ip_addresses_need_no_lookup_thread(monkeypatch):
    lookups = Lookups(1)
    monkeypatch.setattr(trio.to_thread, "run_sync", None)  # any thread would fail
    for url in ("https://93.184.216.34/up", "https://[2606:4700::1]:8443/up", "http://134744072/up"):
        assert await resolve_endpoint(parse_endpoint(url), lookups)


async def test_names_are_looked_up_in_idna_2008(monkeypatch):
    asked = []

    def fake_getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        assert not flags & socket.AI_NUMERICHOST, "a non-ASCII name is not an address"
        asked.append(host)
        return [(0, 0, 0, "", ("93.184.216.34", port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    await resolve_endpoint(parse_endpoint("https://faß.example/up"), Lookups(1))
    assert asked == [b"xn--fa-hia.example"]  # IDNA 2003 would ask for fass.example
