"""What a front-end connection's task does next, and the poller that reads every connection while its task
is parked (Linux: one edge-triggered epoll).
"""

from __future__ import annotations

import contextlib
import enum
import math
import select
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import outcome
import trio

from trio_dht.proxy.connection import Connection
from trio_dht.proxy.http1 import Head

if TYPE_CHECKING:
    from trio_dht.infohash import InfoHash
    from trio_dht.proxy.routes import Answer, RouteSpec
    from trio_dht.rest.paths import Route

_INF = math.inf
_HANG_UP = getattr(select, "EPOLLRDHUP", 0) | getattr(select, "EPOLLHUP", 0) | getattr(select, "EPOLLERR", 0)
"""Poller events saying the client's side ended: past the bytes read, a read returns the end (or an error)."""


class Pending(NamedTuple):
    """A request for the connection's task: its head, route and key, and its answer once its handler ran (its
    body read); None: the task reads the body and runs the handler."""

    head: Head
    spec: RouteSpec
    key: InfoHash | None
    answer: Answer | None = None
    route: Route | None = None
    start: float = 0.0
    """When its head was read (``time.perf_counter``), for its latency."""


class Step(enum.Enum):
    YIELD = "let the other tasks run"
    FLUSH = "send the pending bytes"
    CLOSE = "close the connection"
    HAND_OVER = "hand the connection to hypercorn"


Next = Pending | Step | None
"""What a connection's task does next; None: wait for more bytes of a request."""


class Poller:
    """One edge-triggered epoll over the front end's connections, watched by one task (:meth:`run`).

    A connection waiting for its next request parks its task here instead of waiting on its own socket:
    Trio's one-shot registration costs an ``epoll_ctl`` per wait, and every wake-up a reschedule. When new
    bytes arrive, :meth:`run` reads them and calls ``serve_buffered``, which answers at once the requests that
    need no waiting (node info, SUBSCRIBE); the task is woken only for what it must do (a request that awaits,
    a hand-over, a blocked send, the end). Edge-triggered means an event per arrival of bytes, not "bytes are
    there": bytes that arrive while the task is busy set :attr:`Connection.readable`, and the task reads them
    before it parks again.
    """

    def __init__(self, serve_buffered: Callable[[Connection], Next]) -> None:
        self._epoll = select.epoll()
        self._serve_buffered = serve_buffered
        self._connections: dict[int, Connection] = {}

    def add(self, conn: Connection) -> None:
        self._epoll.register(conn.fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
        self._connections[conn.fd] = conn

    def remove(self, conn: Connection) -> None:
        if self._connections.pop(conn.fd, None) is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(conn.fd)

    def close(self) -> None:
        self._epoll.close()

    async def park(self, conn: Connection) -> Next:
        """Wait until :meth:`run` has something for the connection's task (the bytes are in its buffer)."""
        conn.parked = trio.lowlevel.current_task()
        conn.waited = True

        def abort(_: object) -> trio.lowlevel.Abort:
            conn.parked = None
            return trio.lowlevel.Abort.SUCCEEDED

        next_step: Next = await trio.lowlevel.wait_task_rescheduled(abort)
        return next_step

    async def run(self) -> None:
        epoll_fd = self._epoll.fileno()
        poll = self._epoll.poll
        connections = self._connections
        serve_buffered = self._serve_buffered
        while True:
            await trio.lowlevel.wait_readable(epoll_fd)
            now = trio.current_time()
            for fd, flags in poll(0):
                conn = connections.get(fd)
                if conn is None:
                    continue
                task = conn.parked
                if task is None:  # its task is busy: it reads before it parks again
                    conn.readable = True
                    continue
                result: outcome.Outcome[Next]
                try:
                    conn.recv_now()
                    if flags & _HANG_UP:  # the end came with the bytes just read: the task reads it next
                        conn.readable = True
                    next_step = serve_buffered(conn)
                except Exception as exc:  # ClientGone, or a bug: the task ends the connection
                    result = outcome.Error(exc)
                else:
                    if next_step is None and not conn.readable:  # stays parked
                        if conn.deadline == _INF or conn.buffer:
                            conn.wait_for_request(now)
                        continue
                    result = outcome.Value(next_step)
                conn.parked = None
                trio.lowlevel.reschedule(task, result)
