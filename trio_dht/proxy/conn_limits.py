"""What an HTTP connection may cost, for the proxy's servers (sans-IO: the caller passes the time).

* :func:`client_key`: the address a client is counted under (IPv4-mapped IPv6 as IPv4, IPv6 per /64).
* :class:`PerAddress`: open connections (or listen streams) per client address, with a cap.
* :class:`Budgets` and :class:`Expiry`: the deadlines of a connection. A server keeps one ``deadline`` and
  one :class:`Expiry` per connection, set when it starts waiting on the client (for a request's first byte,
  its head's end, its body's end, the client taking a response) and not moved by the bytes that trickle in;
  one sweeping task closes the connections past their deadline (no timeout per request).
  :func:`close_late_connections` is that task, :func:`expire` what it does to one connection.
* :class:`AcceptPause`: what to do when ``accept`` fails: go on to the next connection when the error was
  about one connection only, otherwise (no file descriptor or memory left, or anything unexpected) pause
  accepting (100 ms, doubling to 1 s) and log at most one line per 10 s.
* :class:`HttpCounters`: the limits reached, for ``/node/stats``.

The HTTP worker process imports this module; it imports no more of the proxy than
:mod:`~trio_dht.proxy.http1`.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, NoReturn, Protocol, TypeVar

import trio

from trio_dht.backoff import Backoff
from trio_dht.logs import LogLimit
from trio_dht.proxy.http1 import KEEP_ALIVE_TIMEOUT
from trio_dht.sources import client_key

if TYPE_CHECKING:
    from trio_dht.limits import Limits

SWEEPS_PER_TIMEOUT = 4
"""The sweeping task runs this many times per shortest deadline: a connection is closed at most a quarter of
that deadline late."""
ACCEPT_SKIPPED = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
"""``accept`` errors about one connection only: the next accept goes on. Any other error (no file descriptor
or memory left, typically) pauses accepting."""

log = logging.getLogger(__name__)


class PerAddress:
    """How many of something each client address holds, at most ``cap`` (loopback counted too; a host that
    is not an IP address is not counted). :meth:`acquire` and :meth:`release` pair up."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.refused = 0
        self._held: dict[str, int] = {}

    def acquire(self, host: str) -> bool:
        """Take one for ``host``; False (and counted) when it holds ``cap`` already."""
        key = client_key(host)
        if key is None:
            return True
        held = self._held.get(key[0], 0)
        if held >= self.cap:
            self.refused += 1
            return False
        self._held[key[0]] = held + 1
        return True

    def release(self, host: str) -> None:
        key = client_key(host)
        if key is None:
            return
        held = self._held.get(key[0], 0) - 1
        if held > 0:
            self._held[key[0]] = held
        else:
            self._held.pop(key[0], None)

    def held(self, host: str) -> int:
        key = client_key(host)
        return 0 if key is None else self._held.get(key[0], 0)

    def __len__(self) -> int:
        """Addresses holding at least one."""
        return len(self._held)


class Expiry(enum.Enum):
    """What a connection waits for, and so what its deadline closes."""

    IDLE = "the next request (no byte yet): closed silently"
    HEAD = "the rest of a request head: 408, closed"
    BODY = "the rest of a request body: 408, closed"
    SEND = "the client to take a response: closed"


@dataclass(frozen=True, slots=True)
class Budgets:
    """A server's deadlines (seconds) and send buffer (bytes), from :class:`~trio_dht.limits.Limits`."""

    head: float = 10.0
    body: float = 30.0
    send: float = 30.0
    send_buffer: int = 4 * 1024 * 1024
    keep_alive: float = KEEP_ALIVE_TIMEOUT

    @classmethod
    def from_limits(cls, limits: Limits) -> Budgets:
        """From a :class:`~trio_dht.limits.Limits` (its ``http_*`` fields)."""
        return cls(
            head=limits.http_head_timeout,
            body=limits.http_body_timeout,
            send=limits.http_send_timeout,
            send_buffer=limits.http_send_buffer,
        )

    @property
    def sweep_interval(self) -> float:
        """Seconds between two sweeps of the connections past their deadline."""
        return min(self.head, self.body, self.send, self.keep_alive) / SWEEPS_PER_TIMEOUT


class _Deadlined(Protocol):
    deadline: float


C = TypeVar("C", bound=_Deadlined)


async def close_late_connections(
    interval: float,
    connections: Callable[[], Iterable[C]],
    expire_one: Callable[[C], None],
    then: Callable[[], None] | None = None,
) -> NoReturn:
    """Every ``interval`` seconds, ``expire_one`` each of ``connections()`` past its ``deadline`` (one task
    for all, no timeout per request), then call ``then``."""
    while True:
        await trio.sleep(interval)
        now = trio.current_time()
        for conn in [conn for conn in connections() if conn.deadline < now]:
            expire_one(conn)
        if then is not None:
            then()


def expire(counters: HttpCounters, expiry: Expiry, sock: socket.socket, timeout_response: bytes) -> None:
    """Count a connection past its deadline; a request not all sent gets ``timeout_response`` (a 408; empty:
    none, as when a response has begun). The caller closes the connection."""
    if expiry is Expiry.HEAD or expiry is Expiry.BODY:
        if expiry is Expiry.HEAD:
            counters.head_timeouts += 1
        else:
            counters.body_timeouts += 1
        if timeout_response:
            with contextlib.suppress(OSError):
                sock.send(timeout_response)
    elif expiry is Expiry.SEND:
        counters.send_timeouts += 1


class AcceptPause:
    """What follows an ``accept`` that failed (:meth:`after`): the next accept, or a pause and its log lines.

    The pause starts at :attr:`FIRST` and doubles at each failure in a row, up to :attr:`LONGEST`; an
    accepted connection resets it. At most one warning per :attr:`LOG_EVERY` seconds, saying how many
    failures it stands for.
    """

    FIRST = 0.1
    LONGEST = 1.0
    LOG_EVERY = 10.0

    def __init__(self) -> None:
        self.pauses = 0
        """Pauses in all (``/node/stats``)."""
        self._backoff = Backoff(self.FIRST, self.LONGEST, jitter=0.0)
        self._log = LogLimit(self.LOG_EVERY)

    def failed(self, error: OSError, now: float) -> tuple[float, str | None]:
        """(seconds to pause accepting, a warning to log or None) after ``error``."""
        self.pauses += 1
        text = f"accept failed ({error}); accepting pauses for up to {self.LONGEST:g} s at a time"
        return self._backoff.failed(), self._log.line(text, now)

    def after(self, error: OSError, now: float) -> float:
        """Seconds to pause accepting after ``error`` (0: go on with the next connection); a warning is
        logged at most once per :attr:`LOG_EVERY`."""
        if error.errno in ACCEPT_SKIPPED:
            return 0.0
        delay, warning = self.failed(error, now)
        if warning is not None:
            log.warning("%s", warning)
        return delay

    def accepted(self) -> None:
        self._backoff.succeeded()


@dataclass(slots=True)
class HttpCounters:
    """The HTTP limits reached (``/node/stats`` ``"http"``: the field names in camel case)."""

    head_timeouts: int = 0
    body_timeouts: int = 0
    send_timeouts: int = 0
    send_buffer_overflows: int = 0
    connections_refused: int = 0
    listens_refused: int = 0
    accept_pauses: int = 0
    hand_overs_dropped: int = 0
    """Connections an HTTP worker closed because the front end did not take them in time."""

    def as_list(self) -> list[int]:
        return [getattr(self, f.name) for f in fields(self)]

    def total(self, per_address: PerAddress, pause: AcceptPause) -> HttpCounters:
        """A copy, with the refusals of ``per_address`` and the pauses of ``pause`` added."""
        counters = HttpCounters(*self.as_list())
        counters.connections_refused += per_address.refused
        counters.accept_pauses += pause.pauses
        return counters

    def add(self, values: list[int]) -> None:
        """Add counts in the order of :meth:`as_list` (a worker's, sent over its channel)."""
        for f, value in zip(fields(self), values, strict=False):
            setattr(self, f.name, getattr(self, f.name) + value)

    def as_json(self) -> dict[str, int]:
        return {_camel(f.name): getattr(self, f.name) for f in fields(self)}


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part.title() for part in rest)
