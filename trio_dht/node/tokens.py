"""Write tokens (OpenDHT's scheme): SHA-256(secret || IP || port), bound to the requester's exact address.

The secret is replaced every 15-45 min and the previous one stays valid, so a token lives 15-90 min. Tokens
are remembered per address for each of the two secrets (every get, find and listen reply carries one, every
put checks one), so an address costs one hash per secret.
"""

from __future__ import annotations

import hashlib
import random
import secrets

from trio_dht.wire.compact import Address, pack_ip

TOKEN_LEN = 32
ROTATE_MIN = 15 * 60.0
ROTATE_MAX = 45 * 60.0
MAX_CACHED = 8192
"""Addresses whose tokens are remembered per secret (past this the memo starts over)."""


class TokenIssuer:
    """Issues and checks tokens; sans-IO (call :meth:`maybe_rotate` with the time)."""

    def __init__(self, now: float) -> None:
        self._current = secrets.token_bytes(8)
        self._previous = self._current
        self._rotate_at = now + random.uniform(ROTATE_MIN, ROTATE_MAX)
        self._issued: dict[Address, bytes] = {}  # tokens of the current secret
        self._issued_before: dict[Address, bytes] = {}  # tokens of the previous secret

    @staticmethod
    def _make(secret: bytes, addr: Address) -> bytes:
        return hashlib.sha256(secret + pack_ip(addr[0]) + addr[1].to_bytes(2, "big")).digest()

    @staticmethod
    def _memo(memo: dict[Address, bytes], secret: bytes, addr: Address) -> bytes:
        token = memo.get(addr)
        if token is None:
            if len(memo) >= MAX_CACHED:
                memo.clear()
            token = memo[addr] = TokenIssuer._make(secret, addr)
        return token

    def issue(self, addr: Address) -> bytes:
        token = self._issued.get(addr)
        return token if token is not None else self._memo(self._issued, self._current, addr)

    def check(self, token: bytes | None, addr: Address) -> bool:
        if token is None or len(token) != TOKEN_LEN:
            return False
        return token == self.issue(addr) or token == self._memo(self._issued_before, self._previous, addr)

    def maybe_rotate(self, now: float) -> bool:
        if now < self._rotate_at:
            return False
        self._previous, self._current = self._current, secrets.token_bytes(8)
        self._issued_before, self._issued = self._issued, {}
        self._rotate_at = now + random.uniform(ROTATE_MIN, ROTATE_MAX)
        return True
