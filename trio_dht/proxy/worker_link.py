"""The front end's side of one HTTP worker process (:mod:`~trio_dht.proxy.http_worker`).

A :class:`WorkerLink` starts the worker over the plain listening sockets and serves its channel
(:mod:`~trio_dht.proxy.relay`): it answers each relayed request through its :class:`Relay` (the front end)
and gives every handed-over connection to the relay to serve. It supervises the process: a worker that dies is
started again a second later; one that never says it serves (it cannot start here) leaves the sockets to the
front end's own accept loops. On shutdown, :meth:`drain` asks the worker to finish; the caller's deadline
bounds that (a cancelled link kills its worker).
"""

from __future__ import annotations

import array
import collections
import functools
import logging
import socket
import ssl
from typing import TYPE_CHECKING, Protocol

import trio

from trio_dht.logs import LogLimit
from trio_dht.proxy import relay
from trio_dht.proxy.conn_limits import Budgets
from trio_dht.proxy.connection import BLOCKING
from trio_dht.proxy.http_worker import Settings, worker_command

if TYPE_CHECKING:
    from trio_dht.proxy.routes import Later

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0
STOP_TIMEOUT = 5.0
"""How long a worker whose channel is closed gets to end before it is killed."""
STARTUP_TIMEOUT = 30.0
"""A worker that has not said it serves by then is stopped, and the front end accepts in its place."""
_INT_SIZE = array.array("i").itemsize


class Relay(Protocol):
    """What a worker link needs of the process that owns the proxy (the front end)."""

    budgets: Budgets
    connections_per_address: int
    timeout_response: bytes
    """The 408 a worker sends a client whose request is late."""

    def relayed_response(self, request: relay.Relayed) -> tuple[bytes | Later, bool]:
        """The response to a relayed request and whether its connection closes after it; or, in place of the
        bytes, what :meth:`relayed_later_response` finishes."""
        ...

    async def relayed_later_response(self, later: Later, close: bool) -> tuple[bytes, bool]:
        """The response to a relayed request once its reply is ready."""
        ...

    def take_over(self, sock: socket.socket, read: bytes, connections: trio.Nursery) -> None:
        """Serve a connection a worker handed over, starting with the bytes it read."""
        ...

    async def accept_loop(
        self, listener: socket.socket, nursery: trio.Nursery, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        """Accept the connections of ``listener`` in place of a worker that cannot start."""
        ...


class WorkerLink:
    """One worker process of a front end, and its channel (see the module docstring)."""

    def __init__(self, front: Relay, plain: list[socket.socket]) -> None:
        self._front = front
        self._plain = plain
        self._sock: socket.socket | None = None
        self._records = relay.RecordWriter()
        self._unsent: collections.deque[bytes] = collections.deque()
        self._blocked = trio.Event()
        self._ready = False
        self._pid = 0
        self._draining = False
        self._fallback = trio.CancelScope()
        self.serving = trio.Event()
        """Set once the worker serves, or once the front end accepts in its place."""
        self.restarts = 0
        self.dropped_hand_overs = 0
        """Connections handed over whose socket did not arrive (this process was out of file descriptors)."""
        self._counts: list[int] = []
        """The HTTP limits the running worker reached (its last :data:`~trio_dht.proxy.relay.STATS`)."""
        self._ended_counts: list[int] = []
        """Those of the workers that ended."""
        self._drop_log = LogLimit()

    def counts(self) -> list[int]:
        """The HTTP limits reached by this link's workers, in the order of ``HttpCounters.as_list``."""
        ended, current = self._ended_counts, self._counts
        size = max(len(ended), len(current))
        ended, current = ended + [0] * (size - len(ended)), current + [0] * (size - len(current))
        return [a + b for a, b in zip(ended, current, strict=True)]

    @property
    def ready(self) -> bool:
        """A worker runs and has said it serves."""
        return self._ready and self._sock is not None

    def drain(self) -> None:
        """Ask the worker to stop accepting and end once its responses are sent (and stop accepting here)."""
        self._draining = True
        self._fallback.cancel()
        self._send([relay.frame(relay.DRAIN)])

    async def run(self, connections: trio.Nursery) -> None:
        """Run the worker until it is drained (again after a second if it dies); handed-over connections and
        the values a SUBSCRIBE waits for are served in ``connections``."""
        front = self._front
        settings = Settings(front.budgets, front.connections_per_address, front.timeout_response)

        while not self._draining:
            mine, theirs = relay.socket_pair()
            fds = (theirs.fileno(), *(sock.fileno() for sock in self._plain))
            command = worker_command(fds[0], list(fds[1:]), settings)
            self._sock, self._ready = mine, False
            process: trio.Process | None = None
            try:
                async with trio.open_nursery() as nursery:
                    try:
                        process = await nursery.start(
                            functools.partial(trio.run_process, command, check=False, pass_fds=fds)
                        )
                    except OSError as exc:
                        log.error("cannot run an HTTP worker: %s", exc)
                    else:
                        theirs.close()
                        self._pid = process.pid
                        async with trio.open_nursery() as helpers:
                            helpers.start_soon(self._write_blocked)
                            helpers.start_soon(self._expect_ready, nursery.cancel_scope)
                            await self._serve_channel(connections)
                            helpers.cancel_scope.cancel()
                        self._close_channel()  # (if the worker did not close it first) it ends on seeing this
                        nursery.cancel_scope.deadline = trio.current_time() + STOP_TIMEOUT  # or is killed
            finally:
                theirs.close()
                self._close_channel()
                self._ended_counts, self._counts = self.counts(), []
            exit_code = "none" if process is None else process.returncode
            if self._draining:
                return
            if not self._ready:
                log.error("an HTTP worker could not start (exit code %s): serving here", exit_code)
                with self._fallback:
                    async with trio.open_nursery() as accepting:
                        for sock in self._plain:
                            accepting.start_soon(self._front.accept_loop, sock, connections)
                        self.serving.set()
                return
            log.warning("an HTTP worker ended (exit code %s); starting another", exit_code)
            self.restarts += 1
            await trio.sleep(RESTART_DELAY)

    def _close_channel(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._unsent.clear()
        self._records.take()

    async def _expect_ready(self, worker_scope: trio.CancelScope) -> None:
        """Stop (kill) a worker that does not say it serves within :data:`STARTUP_TIMEOUT`."""
        await trio.sleep(STARTUP_TIMEOUT)
        if not self._ready:
            log.error("HTTP worker %d did not start within %g s", self._pid, STARTUP_TIMEOUT)
            worker_scope.cancel()

    async def _serve_channel(self, connections: trio.Nursery) -> None:
        """Answer what the worker relays and take what it hands over, until it closes its end (or sends what
        does not parse: then this end closes, and the worker ends)."""
        sock = self._sock
        assert sock is not None
        fd_space = socket.CMSG_SPACE(_INT_SIZE)
        buffer = bytearray(relay.RECEIVE_SIZE)
        while True:
            try:
                size, ancillary, _, _ = sock.recvmsg_into([buffer], fd_space, socket.MSG_CMSG_CLOEXEC)
            except BLOCKING:
                self._flush()
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError:
                return
            if not size and not ancillary:
                return
            record = memoryview(buffer)[:size]
            handed = [
                socket.socket(fileno=fd)
                for level, kind, data in ancillary
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                for fd in array.array("i", data[: len(data) - len(data) % _INT_SIZE])
            ]
            try:
                for frame in relay.frames(record):
                    if frame.kind == relay.RELAY:
                        self._answer(frame.request_id, relay.parse_relayed(frame.payload), connections)
                    elif frame.kind == relay.HAND_OVER:
                        if handed:
                            self._front.take_over(handed.pop(), frame.payload, connections)
                        else:
                            self.dropped_hand_overs += 1
                            line = self._drop_log.line(
                                "a connection handed over by an HTTP worker did not arrive (out of file "
                                "descriptors?)",
                                trio.current_time(),
                            )
                            if line is not None:
                                log.warning("%s", line)
                    elif frame.kind == relay.STATS:
                        self._counts = relay.parse_stats(frame.payload)
                    elif frame.kind == relay.READY:
                        self._ready = True
                        self.serving.set()
                        log.info("HTTP worker %d serves the plain-HTTP connections", self._pid)
                    else:
                        raise relay.BadRecord(f"a frame of kind {frame.kind} from a worker")
            except relay.BadRecord as exc:
                log.error("an HTTP worker sent a bad record (%s): ending it", exc)
                return
            finally:
                for extra in handed:
                    extra.close()

    def _answer(self, request_id: int, request: relay.Relayed, connections: trio.Nursery) -> None:
        response, close = self._front.relayed_response(request)
        if isinstance(response, bytes):
            self._send(relay.response_frames(request_id, close, response))
        else:
            connections.start_soon(self._answer_later, request_id, response, close)

    async def _answer_later(self, request_id: int, later: Later, close: bool) -> None:
        response, close = await self._front.relayed_later_response(later, close)
        self._send(relay.response_frames(request_id, close, response))
        self._flush()

    def _send(self, frames: list[bytes]) -> None:
        """Gather frames for the worker; a record goes every :data:`~trio_dht.proxy.relay.BATCH` frames."""
        if self._sock is None:  # no worker: its requests ended with it
            return
        for data in frames:
            self._records.add(data)
        if self._records.frames >= relay.BATCH or self._draining:
            self._flush()

    def _flush(self) -> None:
        """Send what the socket takes; :meth:`_write_blocked` sends the rest."""
        unsent = self._unsent
        unsent.extend(self._records.take())
        while unsent and self._sock is not None:
            try:
                self._sock.send(unsent[0])
            except BLOCKING:
                self._blocked.set()
                return
            except OSError:  # the worker is gone: its requests end with it
                unsent.clear()
                return
            unsent.popleft()

    async def _write_blocked(self) -> None:
        while True:
            await self._blocked.wait()
            self._blocked = trio.Event()
            while self._unsent and self._sock is not None:
                await trio.lowlevel.wait_writable(self._sock)
                self._flush()
