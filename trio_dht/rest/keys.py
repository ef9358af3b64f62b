"""The ``{hash}`` path parameter of the REST proxy, read exactly as OpenDHT's proxy server reads it.

RESTinio hands the handler the raw path segment, with only *unreserved* percent-escapes decoded (``%7E``
becomes ``~``, ``%20`` stays ``%20``). OpenDHT then takes the first 40 characters as a hex InfoHash when they
are all hex (either case) and not all zeroes; anything else is the SHA-1 of the whole segment.
"""

from __future__ import annotations

import hashlib
import re

from trio_dht.infohash import HASH_LEN, InfoHash

_HEX_LEN = 2 * HASH_LEN
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def decode_unreserved(raw: bytes) -> bytes:
    """Decode the percent-escapes of unreserved characters only (letters, digits, ``-._~``: those a URI may
    carry escaped or not with the same meaning), leaving the others as sent.
    """

    def one(m: re.Match[bytes]) -> bytes:
        char = int(m.group(1), 16)
        return bytes((char,)) if char in _UNRESERVED else m.group(0)

    return _ESCAPE.sub(one, raw) if b"%" in raw else raw


def hash_from_segment(segment: bytes) -> InfoHash:
    """The DHT key a ``{hash}`` segment names (already unreserved-decoded; see :func:`decode_unreserved`)."""
    head = segment[:_HEX_LEN]
    if len(head) == _HEX_LEN and not head.translate(None, _HEX_DIGITS):  # all hex digits
        key = InfoHash(bytes.fromhex(head.decode("ascii")))
        if key:
            return key
    return InfoHash(hashlib.sha1(segment).digest())
