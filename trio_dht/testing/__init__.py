"""Test doubles for code built on trio_dht (an in-memory :class:`~trio_dht.api.Dht`, gateway fakes, ...).

The APNs double's names are importable from here too (loaded on first use: it needs hypercorn and
cryptography).
"""

from typing import Any

_APNS = ("ApnsDouble", "ApnsNotification", "ApnsTestKey", "generate_test_key", "open_apns_double")


def __getattr__(name: str) -> Any:
    if name in _APNS:
        from trio_dht.testing import apns

        return getattr(apns, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
