"""What a node hands its callers of the values peers send, as OpenDHT's ``SecureDht`` filters them.

- A signed value whose signature does not check is dropped (and counted) before it can take its id's place in
  a get's results, so a forged copy cannot hide the real one.
- An encrypted value is decrypted when the node has an identity and the value is for it: its ``to`` is our key
  id and its signature checks. Every other encrypted value is handed over as it came, opaque, since a node (or
  a proxy) with an identity still serves the values encrypted for others.
- Anything else passes unchanged.

Each decryption costs an RSA private-key operation (about 1.2 ms for a 4096-bit key), which a stranger can
make us spend with any bytes of the key's length, under a key we get or listen to. So decryptions have a
budget, ``Limits.decrypts_per_second`` (a token bucket holding a second's worth): past it a value is handed
over opaque and counted, and decrypted when it is seen again with budget (so a stranger spending the budget
can delay, but not forge or hide, what is sent to us: a get or listen that sees it again decrypts it).
The outcome for a cypher (its value, or "not for us") is kept for the last :data:`DECRYPT_CACHE` cyphers,
known by their SHA-256, and at most ``Limits.decrypt_cache_bytes`` of decrypted values.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from trio_dht.limits import DEFAULT, Limits
from trio_dht.signature import Verifier
from trio_dht.token_bucket import TokenBucket
from trio_dht.value import Value

if TYPE_CHECKING:
    from trio_dht.crypto import Identity

DECRYPT_CACHE = 4096
"""Cyphers whose decryption outcome is kept (a digest and a value each)."""


class ValueScreen:
    """Screens batches of values from peers: :meth:`screen`. ``identity`` is the node's, or None; ``clock``
    gives the seconds the decryption budget refills by."""

    def __init__(
        self,
        verifier: Verifier,
        identity: Identity | None = None,
        limits: Limits = DEFAULT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.verifier = verifier
        self.identity = identity
        self._decrypted: OrderedDict[bytes, Value | None] = OrderedDict()
        self._cache_bytes = 0
        self._max_cache_bytes = limits.decrypt_cache_bytes
        self._budget = TokenBucket(limits.decrypts_per_second, limits.decrypts_per_second, clock())
        self._clock = clock
        self.over_budget = 0
        """Encrypted values handed over opaque because the decryption budget was spent."""
        self.bad_signatures = 0
        """Signed values dropped because their signature does not check."""
        self.decrypted = 0
        """Encrypted values decrypted for us (each cypher once)."""
        self.not_for_us = 0
        """Encrypted values we could not decrypt (each cypher once): for another key, or altered."""

    def screen(self, values: Iterable[Value]) -> list[Value]:
        """``values`` without the badly signed ones, those encrypted for us decrypted."""
        out = []
        for value in values:
            if value.cypher or value.signature:
                screened = self.one(value)
                if screened is None:
                    continue
                value = screened
            out.append(value)
        return out

    def one(self, value: Value) -> Value | None:
        """``value`` as :meth:`screen` hands it over, or None if it is dropped."""
        if value.cypher:
            return self._decrypt(value) if self.identity is not None else value
        if value.signature and value.owner is not None and not self.verifier.verify(value):
            self.bad_signatures += 1
            return None
        return value

    def _decrypt(self, value: Value) -> Value:
        from trio_dht.crypto import CryptoError

        assert self.identity is not None
        digest = hashlib.sha256(value.cypher).digest()
        cache = self._decrypted
        if digest in cache:
            cache.move_to_end(digest)
            known = cache[digest]
        elif not self._budget.take(self._clock()):
            self.over_budget += 1
            return value
        else:
            try:
                known = self.identity.decrypt_value(value, self.verifier.verify)
                self.decrypted += 1
            except CryptoError:
                known = None
                self.not_for_us += 1
            cache[digest] = known
            self._cache_bytes += _cost(known)
            while len(cache) > DECRYPT_CACHE or self._cache_bytes > self._max_cache_bytes:
                self._cache_bytes -= _cost(cache.popitem(last=False)[1])
        if known is None:
            return value
        if (known.id, known.prio, known.push_type) != (value.id, value.prio, value.push_type):
            # The same cypher under another id, or other push hints (which travel outside the cypher).
            known = replace(known, id=value.id, prio=value.prio, push_type=value.push_type, _packed=None)
        return known


def _cost(value: Value | None) -> int:
    """Bytes a cached outcome holds (a digest and an entry for a refusal)."""
    if value is None:
        return 100
    return 100 + value.size + len(value.owner or b"") + len(value.recipient or b"")
