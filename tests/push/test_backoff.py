"""The one exponential backoff (the proxy client's streams and SUBSCRIBE retries, the push dispatcher)."""

import pytest

from trio_dht.backoff import Backoff


def test_backoff_grows_caps_and_resets():
    backoff = Backoff(1.0, 8.0, jitter=0.0, stable_after=10.0)
    assert [backoff.failed() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert backoff.ended(lasted=2.0) == 8.0  # a stream that died at once does not reset
    assert backoff.ended(lasted=30.0) == 1.0  # one that stayed up does
    jittered = Backoff(1.0, 8.0, jitter=0.5, rng=lambda: 0.0)
    assert jittered.failed() == 0.5
    with pytest.raises(ValueError):
        Backoff(0, 1)
    assert Backoff(10.0, 5.0, jitter=0.0).failed() == 5.0  # a first wait above the cap is the cap


def test_delay_takes_up_to_jitter_off_and_never_exceeds_the_maximum():
    for r in (0.0, 0.3, 0.999):
        backoff = Backoff(1.0, 300.0, jitter=0.5, rng=lambda r=r: r)
        assert [backoff.delay(n) for n in (1, 2, 3)] == [(1 - 0.5 * (1 - r)) * 2**i for i in range(3)]
        assert 150.0 <= backoff.delay(20) <= 300.0
    assert Backoff(1.0, 300.0, jitter=0.5, rng=lambda: 1.0).delay(9) == 256.0
    assert backoff.failures == 0  # delay() keeps no count


def test_a_long_outage_does_not_overflow():
    backoff = Backoff(0.25, 60.0, jitter=0.0)
    assert backoff.delay(10**6) == 60.0
    for _ in range(2000):
        backoff.failed()
    assert backoff.failed() == 60.0
