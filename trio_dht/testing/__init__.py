"""Test doubles for code built on trio_dht (an in-memory :class:`~trio_dht.api.Dht`, gateway fakes, ...).

The names below are imported when first used (the FCM and APNs doubles need the ``cryptography`` package,
the APNs one hypercorn too).
"""

from __future__ import annotations

from trio_dht._lazy import lazy_exports

_EXPORTS = {
    "MemoryDht": "trio_dht.testing.memory_dht",
    "open_gorush_double": "trio_dht.testing.gorush",
    "open_unifiedpush_double": "trio_dht.testing.unifiedpush",
    "open_fcm_double": "trio_dht.testing.fcm",
    "new_service_account": "trio_dht.testing.fcm",
    "ApnsDouble": "trio_dht.testing.apns",
    "ApnsNotification": "trio_dht.testing.apns",
    "ApnsTestKey": "trio_dht.testing.apns",
    "generate_test_key": "trio_dht.testing.apns",
    "open_apns_double": "trio_dht.testing.apns",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
