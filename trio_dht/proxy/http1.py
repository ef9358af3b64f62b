"""A deliberately narrow HTTP/1.1 reader and writer for the proxy's hot requests (sans-IO).

:func:`read_head` recognises only the plainest requests: an HTTP/1.1 request line with an origin-form
target, ``Name: value`` header lines, and a body given by one ``Content-Length``. Everything else (HTTP/1.0,
chunked or ``Expect: 100-continue`` bodies, upgrades, folded or odd header lines, bare-LF line ends, duplicate
lengths) is reported as :data:`UNUSUAL`, and the caller hands the connection, bytes and all, to hypercorn,
whose h11 answers it properly (including a 400 for what is malformed). So this module never judges a bad
request.

The writers build complete responses (:func:`reply`) and chunked streams (:func:`stream_head`,
:func:`chunk`, :data:`LAST_CHUNK`) as bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

MAX_HEAD = 16 * 1024
"""A request head longer than this is :data:`UNUSUAL` (hypercorn's h11 then judges it)."""


@dataclass(frozen=True, slots=True)
class Head:
    """A plain HTTP/1.1 request head: ``size`` bytes of head, then ``content_length`` bytes of body."""

    method: str
    target: bytes
    size: int
    content_length: int
    close: bool
    """The client sent ``Connection: close``."""


class _Unusual:
    def __repr__(self) -> str:
        return "UNUSUAL"


UNUSUAL: Final = _Unusual()
"""A request this reader does not handle: leave it (and the connection) to hypercorn."""

_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_HANDED_OVER = frozenset((b"transfer-encoding", b"expect", b"upgrade", b"te", b"trailer"))


def read_head(buffer: bytes | bytearray) -> Head | _Unusual | None:
    """The request head at the start of ``buffer``; None while it is incomplete; :data:`UNUSUAL` if it is
    not a plain HTTP/1.1 request.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD or b"\n\n" in buffer:
            return UNUSUAL
        return None
    if end > MAX_HEAD:
        return UNUSUAL
    lines = bytes(buffer[:end]).split(b"\r\n")
    request_line = lines[0].split(b" ")
    if len(request_line) != 3:
        return UNUSUAL
    method, target, version = request_line
    if (
        version != b"HTTP/1.1"
        or not target.startswith(b"/")
        or not method
        or not _TOKEN_CHARS.issuperset(method)
    ):
        return UNUSUAL
    content_length = -1
    close = False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or not _TOKEN_CHARS.issuperset(name) or b"\n" in value or b"\r" in value:
            return UNUSUAL
        name = name.lower()
        if name == b"content-length":
            value = value.strip(b" \t")
            if content_length >= 0 or not value.isdigit() or len(value) > 18:
                return UNUSUAL
            content_length = int(value)
        elif name == b"connection":
            tokens = {t.strip(b" \t").lower() for t in value.split(b",")}
            if b"upgrade" in tokens:
                return UNUSUAL
            close = b"close" in tokens
        elif name in _HANDED_OVER:
            return UNUSUAL
    return Head(method.decode("ascii"), target, end + 4, max(content_length, 0), close)


# -- writing -------------------------------------------------------------------------------------------------

LAST_CHUNK: Final = b"0\r\n\r\n"


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("ascii")


_STATUS_LINES = {s.value: _status_line(s.value) for s in HTTPStatus}


def _header_block(headers: tuple[tuple[str, str], ...]) -> bytes:
    return b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers)


class Writer:
    """Response bytes with a fixed set of headers on every response (the proxy's ``BASE_HEADERS``)."""

    def __init__(self, base_headers: tuple[tuple[str, str], ...]) -> None:
        self._base = _header_block(base_headers)
        self._stream_head = _STATUS_LINES[200] + self._base + b"Transfer-Encoding: chunked\r\n\r\n"

    def reply(
        self, status: int, body: bytes, headers: tuple[tuple[str, str], ...] = (), *, close: bool = False
    ) -> bytes:
        """A complete response with a Content-Length (and ``Connection: close`` when ``close``)."""
        head = _STATUS_LINES.get(status) or _status_line(status)
        extra = _header_block(headers) if headers else b""
        connection = b"Connection: close\r\n" if close else b""
        return b"%s%s%s%sContent-Length: %d\r\n\r\n%s" % (
            head,
            self._base,
            extra,
            connection,
            len(body),
            body,
        )

    def stream_head(self) -> bytes:
        """The head of a 200 whose body is chunked."""
        return self._stream_head


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (``data`` must not be empty)."""
    return b"%x\r\n%s\r\n" % (len(data), data)
