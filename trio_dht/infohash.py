"""160-bit identifiers: DHT keys and node ids (OpenDHT's ``InfoHash``)."""

from __future__ import annotations

import hashlib
import os

HASH_LEN = 20


class InfoHash(bytes):
    """A 20-byte key or node id. Compares, hashes and packs as the raw bytes.

    ``InfoHash.get("text")`` is SHA-1 of the text, as OpenDHT's ``InfoHash::get``.
    """

    __slots__ = ()

    def __new__(cls, raw: bytes = bytes(HASH_LEN)) -> InfoHash:
        if len(raw) != HASH_LEN:
            raise ValueError(f"an InfoHash is {HASH_LEN} bytes, not {len(raw)}")
        return super().__new__(cls, raw)

    @classmethod
    def get(cls, data: str | bytes) -> InfoHash:
        """SHA-1 of ``data`` (UTF-8 for text)."""
        if isinstance(data, str):
            data = data.encode()
        return cls(hashlib.sha1(data).digest())

    @classmethod
    def random(cls) -> InfoHash:
        return cls(os.urandom(HASH_LEN))

    @classmethod
    def from_hex(cls, text: str) -> InfoHash:
        """Parse 40 hex characters (either case); raises ValueError otherwise."""
        if len(text) != 2 * HASH_LEN:
            raise ValueError("an InfoHash in hex is 40 characters")
        return cls(bytes.fromhex(text))

    def __repr__(self) -> str:
        return f"InfoHash({self.hex()})"

    def __str__(self) -> str:
        return self.hex()

    def __bool__(self) -> bool:
        return any(self)

    def distance(self, other: bytes) -> int:
        """XOR distance as an integer (smaller is closer)."""
        return int.from_bytes(self, "big") ^ int.from_bytes(other, "big")

    def to_int(self) -> int:
        return int.from_bytes(self, "big")

    @classmethod
    def from_int(cls, value: int) -> InfoHash:
        return cls(value.to_bytes(HASH_LEN, "big"))
