"""Write tokens (trio_dht.node.tokens) and the rate limiter (trio_dht.node.ratelimit), with explicit times."""

from __future__ import annotations

import hashlib

from trio_dht.limits import Limits
from trio_dht.node.ratelimit import UdpRateLimiter, source_key
from trio_dht.node.tokens import MAX_CACHED, ROTATE_MAX, ROTATE_MIN, TOKEN_LEN, TokenIssuer

A = ("192.0.2.1", 4222)


def test_token_is_sha256_of_secret_ip_port():
    issuer = TokenIssuer(0.0)
    token = issuer.issue(A)
    assert len(token) == TOKEN_LEN == 32
    secret = issuer._current
    assert token == hashlib.sha256(secret + bytes([192, 0, 2, 1]) + (4222).to_bytes(2, "big")).digest()
    assert issuer.issue(A) == token  # stable until rotation
    assert issuer.check(token, A)


def test_token_bound_to_exact_address():
    issuer = TokenIssuer(0.0)
    token = issuer.issue(A)
    assert not issuer.check(token, ("192.0.2.1", 4223))
    assert not issuer.check(token, ("192.0.2.2", 4222))
    assert issuer.check(issuer.issue(("2001:db8::1", 4222)), ("2001:db8::1", 4222))
    assert not issuer.check(None, A)
    assert not issuer.check(b"", A)
    assert not issuer.check(bytes(32), A)
    assert not issuer.check(token[:31], A)
    assert not issuer.check(token + b"x", A)


def test_rotation_keeps_the_previous_secret():
    issuer = TokenIssuer(0.0)
    first = issuer.issue(A)
    assert not issuer.maybe_rotate(ROTATE_MIN - 1)  # never before 15 min
    assert issuer.maybe_rotate(ROTATE_MAX + 1)  # always by 45 min
    second = issuer.issue(A)
    assert second != first
    assert issuer.check(first, A) and issuer.check(second, A)
    assert not issuer.maybe_rotate(ROTATE_MAX + 2)
    assert issuer.maybe_rotate(2 * ROTATE_MAX + 2)
    assert not issuer.check(first, A)  # two rotations later
    assert issuer.check(second, A) and issuer.check(issuer.issue(A), A)


def test_remembered_tokens_stay_exact_past_the_memo_size():
    issuer = TokenIssuer(0.0)
    addrs = [("192.0.2.1", port) for port in range(1000, 1000 + MAX_CACHED + 10)]
    tokens = [issuer.issue(a) for a in addrs]
    secret = issuer._current
    for a, token in [*zip(addrs, tokens, strict=True)][:: MAX_CACHED // 4]:
        assert token == hashlib.sha256(secret + bytes([192, 0, 2, 1]) + a[1].to_bytes(2, "big")).digest()
        assert issuer.check(token, a) and issuer.issue(a) == token
    assert issuer.maybe_rotate(ROTATE_MAX + 1)
    assert all(issuer.check(token, a) for a, token in zip(addrs, tokens, strict=True))  # previous secret
    assert not issuer.check(tokens[0], addrs[1])


def test_per_ip_limit_over_a_sliding_second():
    limiter = UdpRateLimiter(per_ip=10, total=-1)
    assert all(limiter.allow(A, 0.0 + i * 0.01) for i in range(10))
    assert not limiter.allow(A, 0.5)
    assert not limiter.allow(("192.0.2.1", 9999), 0.5)  # same IP, another port
    assert limiter.allow(("192.0.2.2", 4222), 0.5)  # another IP
    assert limiter.allow(A, 1.0)  # the first request left the window
    assert not limiter.allow(A, 1.005)
    assert limiter.dropped == 3


def test_ipv6_grouped_by_64():
    limiter = UdpRateLimiter(per_ip=2, total=-1)
    assert limiter.allow(("2001:db8:1:2::1", 1), 0.0)
    assert limiter.allow(("2001:db8:1:2:ffff::9", 1), 0.0)
    assert not limiter.allow(("2001:db8:1:2::3", 1), 0.0)
    assert limiter.allow(("2001:db8:1:3::1", 1), 0.0)  # another /64


def test_loopback_limited_per_port():
    limiter = UdpRateLimiter(per_ip=1, total=-1)
    assert limiter.allow(("127.0.0.1", 1), 0.0)
    assert limiter.allow(("127.0.0.1", 2), 0.0)
    assert not limiter.allow(("127.0.0.1", 1), 0.0)
    assert limiter.allow(("::1", 1), 0.0) and not limiter.allow(("::1", 1), 0.0)


def test_global_limit():
    limiter = UdpRateLimiter(per_ip=-1, total=5)
    assert all(limiter.allow((f"192.0.2.{i}", 1), 0.0) for i in range(5))
    assert not limiter.allow(("198.51.100.1", 1), 0.2)
    assert limiter.allow(("198.51.100.1", 1), 1.0)


def test_defaults_match_opendht():
    limiter = UdpRateLimiter()
    assert sum(limiter.allow(A, 0.0) for _ in range(1100)) == 1024
    assert sum(limiter.allow((f"10.0.{i // 250}.{i % 250 + 1}", 1), 0.5) for i in range(8000)) == 8192 - 1024


def test_a_flooding_source_does_not_starve_the_others():
    """Requests refused per source do not use up the global budget (OpenDHT checks per IP first)."""
    limiter = UdpRateLimiter(per_ip=100, total=800)
    assert sum(limiter.allow(A, 0.0) for _ in range(10_000)) == 100
    assert all(limiter.allow((f"198.51.100.{i}", 1), 0.1) for i in range(1, 8))


def test_disabled():
    limiter = UdpRateLimiter(per_ip=-1, total=-1)
    assert all(limiter.allow(A, 0.0) for _ in range(5000))


def test_many_sources_are_pruned():
    limiter = UdpRateLimiter(per_ip=1, total=-1)
    for i in range(70_000):
        limiter.allow((f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 1), i * 0.0001)
    assert len(limiter._sources) <= 65_536
    assert limiter.allow(("10.0.0.0", 1), 100.0)  # pruned sources start afresh


def test_a_full_table_is_pruned_in_bulk():
    """Sources all active within the window: the table is cut by a quarter at once, so a flood of new sources
    costs one pass per quarter-table of them, not one scan per packet; a busy source keeps its window."""
    limiter = UdpRateLimiter(per_ip=100, total=-1, limits=Limits(udp_rate_sources=1000))
    scans = 0
    prune = limiter._prune

    def counting_prune(now: float) -> None:
        nonlocal scans
        scans += 1
        prune(now)

    limiter._prune = counting_prune  # type: ignore[method-assign]
    busy = ("10.0.0.1", 1)
    assert sum(limiter.allow(busy, 0.1) for _ in range(100)) == 100  # the oldest source, at its limit
    for i in range(10_000):  # every source within one window: none is idle
        assert limiter.allow((f"10.1.{i >> 8}.{i & 255}", 1), 0.5)
    assert len(limiter) <= 1000
    assert scans <= (10_000 - 1000) // 250 + 1
    assert limiter.evicted >= 10_000 - 1000
    assert not limiter.allow(busy, 0.5)  # never evicted: its window still holds its 100 requests


def test_oldest_idle_or_light_sources_go_first():
    limiter = UdpRateLimiter(per_ip=4, total=-1, limits=Limits(udp_rate_sources=8))
    for _ in range(4):
        limiter.allow(("10.0.0.0", 1), 0.0)  # the oldest, but busy (and not idle at t=0.5)
    for i in range(1, 8):
        limiter.allow((f"10.0.0.{i}", 1), 0.1 * i)
    limiter.allow(("10.0.1.1", 1), 0.5)  # full: 2 go, the oldest light ones
    assert len(limiter) == 7 and limiter.evicted == 2
    assert "10.0.0.0" in limiter._sources
    assert "10.0.0.1" not in limiter._sources and "10.0.0.2" not in limiter._sources


def test_source_key_groups_ipv4_by_address_ipv6_by_64_and_loopback_by_port():
    assert source_key(("192.0.2.1", 1)) == source_key(("192.0.2.1", 2)) == "192.0.2.1"
    assert source_key(("127.0.0.1", 1)) == ("127.0.0.1", 1)
    assert source_key(("127.1.2.3", 1)) == ("127.1.2.3", 1)  # all of 127/8 is loopback
    assert source_key(("::1", 1)) == ("::1", 1) != source_key(("::1", 2))
    a = source_key(("2001:db8:1:2::1", 1))
    assert a == source_key(("2001:db8:1:2:ffff::9", 7)) == "2001:db8:1:2::"
    assert a != source_key(("2001:db8:1:3::1", 1))
