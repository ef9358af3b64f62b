"""A deliberately narrow HTTP/1.1 reader and writer for the requests the proxy's front end serves (sans-IO).

:func:`read_head` recognises only the plainest requests, a strict subset of what h11 (hypercorn's HTTP/1.1
parser) accepts and reads the same way: an HTTP/1.1 request line with an origin-form target of visible ASCII,
``Name: value`` header lines with values of visible characters, spaces and tabs, exactly one ``Host``, each
line ending in CRLF, and a body given by one ``Content-Length``. Everything else is reported as
:data:`UNUSUAL`: HTTP/1.0 or any other version, absolute-form, authority-form (CONNECT) or asterisk-form
targets, chunked or ``Expect: 100-continue`` bodies, upgrades, ``TE`` and ``Trailer``, folded lines, space
before a colon, control bytes, bare-LF line ends, a missing or repeated ``Host``, a repeated or malformed
``Content-Length``, a head longer than :data:`MAX_HEAD`. The caller then hands the connection, bytes and all,
to hypercorn, whose h11 answers it properly (a 400 for what is malformed). So this module never judges a bad
request, and a request it does read ends where h11 would end it.

The writers build complete responses (:func:`reply`) and chunked streams (:func:`stream_head`,
:func:`chunk`, :data:`LAST_CHUNK`) as bytes.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Final, NamedTuple

RECV_SIZE = 65536
"""Bytes read from a connection at a time."""
KEEP_ALIVE_TIMEOUT = 60.0
"""An idle connection (no byte of a next request yet) is closed after this long; a head begun and not
completed is bounded by ``Limits.http_head_timeout``."""
MAX_HEAD = 16 * 1024
"""A request head longer than this is :data:`UNUSUAL` (hypercorn's h11 then judges it)."""


class Head(NamedTuple):
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

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = rb"(?!CONNECT )(" + _TOKEN + rb") (/[\x21-\x7e]*) HTTP/1\.1\r\n"
_FIELD = _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n"
_HEAD = re.compile(_REQUEST_LINE + rb"(?:" + _FIELD + rb")*\r\n")
"""A request line (any method but CONNECT, a protocol switch for h11), then ``Name: value`` lines, each ending
in CRLF, then an empty line. A value holds no control byte but HTAB (h11 refuses NUL, CR, LF, VT and FF, and
accepts the others): every head this matches is one h11 reads into the same lines, with values stripped of
spaces and tabs.
"""
_FIELDS_READ = re.compile(
    rb"\n(host|content-length|connection|transfer-encoding|expect|upgrade|te|trailer):([^\r]*)", re.IGNORECASE
)
"""The fields this reader looks at (each line starts after an LF)."""
_LENGTH = re.compile(rb"[ \t]*([0-9]{1,18})[ \t]*")
_TOKEN_BYTES = frozenset(b"-!#$%&'*+.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def read_head(buffer: bytes | bytearray) -> Head | _Unusual | None:
    """The request head at the start of ``buffer``; None while it is incomplete; :data:`UNUSUAL` if it is
    not a plain HTTP/1.1 request.

    None only while h11 would wait for more bytes too: a head that cannot become a plain one within
    :data:`MAX_HEAD` bytes, that does not start with a method, or that has a bare LF (h11 may have its whole
    head already) is :data:`UNUSUAL` at once.
    """
    end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD)
    if end < 0:
        return _incomplete(buffer)
    size = end + 4
    head = _HEAD.fullmatch(buffer, 0, size)
    if head is None:
        return UNUSUAL
    content_length = -1
    close = False
    hosts = 0
    for name, value in _FIELDS_READ.findall(buffer, head.end(2), end + 2):
        name = name.lower()
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            length = _LENGTH.fullmatch(value)
            if content_length >= 0 or length is None:
                return UNUSUAL
            content_length = int(length[1])
        elif name == b"connection":
            tokens = {t.strip(b" \t") for t in value.lower().split(b",")}
            if b"upgrade" in tokens:
                return UNUSUAL
            close = close or b"close" in tokens
        else:  # transfer-encoding, expect, upgrade, te, trailer
            return UNUSUAL
    if hosts != 1:  # h11 refuses an HTTP/1.1 request without a Host, and one with several
        return UNUSUAL
    return Head(head[1].decode("ascii"), head[2], size, max(content_length, 0), close)


def _incomplete(buffer: bytes | bytearray) -> _Unusual | None:
    """None while the head in ``buffer`` may still become a plain one (and h11 would wait for more too)."""
    if not buffer:
        return None
    if len(buffer) >= MAX_HEAD:  # no room left for the end of the head
        return UNUSUAL
    if buffer[0] not in _TOKEN_BYTES:  # h11 refuses at once what cannot start a request line (TLS, ...)
        return UNUSUAL
    if buffer.count(b"\n") != buffer.count(b"\r\n"):  # a bare LF: h11 may have read the whole head
        return UNUSUAL
    return None


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
    """Response bytes with a fixed set of headers on every response (the proxy's ``BASE_HEADERS``); a
    response's own ``Content-Type``, first of its headers, replaces the base one."""

    def __init__(self, base_headers: tuple[tuple[str, str], ...]) -> None:
        self._base = _header_block(base_headers)
        self._base_untyped = _header_block(tuple(h for h in base_headers if h[0] != "Content-Type"))
        self._stream_head = _STATUS_LINES[200] + self._base + b"Transfer-Encoding: chunked\r\n\r\n"

    def reply(
        self, status: int, body: bytes, headers: tuple[tuple[str, str], ...] = (), *, close: bool = False
    ) -> bytes:
        """A complete response with a Content-Length (and ``Connection: close`` when ``close``)."""
        head = _STATUS_LINES.get(status) or _status_line(status)
        base = self._base
        extra = b""
        if headers:
            extra = _header_block(headers)
            if headers[0][0] == "Content-Type":
                base = self._base_untyped
        connection = b"Connection: close\r\n" if close else b""
        return b"%s%s%s%sContent-Length: %d\r\n\r\n%s" % (
            head,
            base,
            extra,
            connection,
            len(body),
            body,
        )

    def stream_head(self, status: int = 200, *, close: bool = False) -> bytes:
        """The head of a response whose body is chunked (``Connection: close`` when ``close``)."""
        if status == 200 and not close:
            return self._stream_head
        head = _STATUS_LINES.get(status) or _status_line(status)
        connection = b"Connection: close\r\n" if close else b""
        return b"%s%s%sTransfer-Encoding: chunked\r\n\r\n" % (head, self._base, connection)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (``data`` must not be empty)."""
    return b"%x\r\n%s\r\n" % (len(data), data)
