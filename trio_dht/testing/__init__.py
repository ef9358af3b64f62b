"""Test doubles for code built on trio_dht (an in-memory :class:`~trio_dht.api.Dht`, gateway fakes, ...)."""
