"""The front end's writers of streamed responses: a GET's values (:func:`write_get`) and a listen stream
(:class:`ListenWriter`), both sent from the DHT's callbacks as far as the socket takes them.
"""

from __future__ import annotations

import trio

from trio_dht.proxy.conn_limits import HttpCounters
from trio_dht.proxy.connection import ClientGone, Connection
from trio_dht.proxy.http1 import LAST_CHUNK, chunk
from trio_dht.proxy.streams import GetStream, ListenFeed


async def write_get(conn: Connection, head: bytes, stream: GetStream, counters: HttpCounters) -> None:
    """Send a GET's values as the DHT finds them, written from its callback as far as the socket takes them
    (no task, no channel); ``head`` (the response's) goes with the first chunk (or the end): one send where
    OpenDHT makes two. A client that does not read is cut past ``http_send_buffer`` bytes held (counted).
    """
    out = head  # what is not sent yet
    gone = done = False

    def on_lines(lines: bytes) -> None:
        nonlocal out, gone
        if gone or done:  # a late callback must not write past the end of the response
            return
        try:
            out = conn.send_now(out + chunk(lines))
        except ClientGone:
            gone = True
            conn.scope.cancel()  # nobody reads: stop the get, close the connection
            return
        if len(out) > conn.budgets.send_buffer:  # the client does not read: cut the response
            counters.send_buffer_overflows += 1
            gone = True
            conn.scope.cancel()

    try:
        await stream.run(on_lines)
    finally:
        done = True
    if gone:  # the get ended before the cancellation reached it
        raise ClientGone
    await conn.send(out + LAST_CHUNK)


class ListenWriter:
    """Writes a :class:`~trio_dht.proxy.streams.ListenFeed` to a front-end connection.

    New lines are sent from the DHT's callback (:meth:`on_ready`) as far as the socket takes them: one value
    sent to many streams costs each a ``send`` and no task wake-up. The connection's task (:meth:`run`) sends
    the head and what the socket did not take, and otherwise waits for the client's bytes: its close or
    half-close ends the stream (the listen is cancelled); bytes it sends are dropped (nothing can be answered
    after a never-ending response). A stream whose client does not read ends when its feed overflows (the
    connection is cut); a closed feed (shutdown) ends with the last chunk.
    """

    def __init__(self, conn: Connection, head: bytes) -> None:
        self.conn = conn
        self.feed: ListenFeed | None = None
        self._out = head
        """Bytes to send before any other (the head first): only the task sends them."""
        self._waiting: trio.CancelScope | None = None
        """While the task waits for the client (nothing to send): cancelled to wake it."""
        self._gone = False

    def on_ready(self) -> None:
        feed = self.feed
        if feed is None:  # lines of the values already there: the task sends them with the head
            return
        if feed.overflowed:
            self.conn.scope.cancel()  # the task may be waiting to send to a client that does not read
            return
        waiting = self._waiting
        if waiting is None or self._out or self._gone:  # the task is busy or woken: it takes the lines next
            return
        if not feed.ended:
            try:
                self._out = self.conn.send_now(chunk(feed.take()))
            except ClientGone:
                self._gone = True
            if not self._out and not self._gone:
                return
        waiting.cancel()

    async def run(self) -> None:
        conn = self.conn
        feed = self.feed
        assert feed is not None
        while True:
            if self._gone or feed.overflowed:
                raise ClientGone
            lines = feed.take()
            if lines:
                self._out += chunk(lines)
            if self._out:
                await conn.send(self._out)
                self._out = b""
                continue
            if feed.ended:
                await conn.send(LAST_CHUNK)
                return
            with trio.CancelScope() as self._waiting:
                await trio.lowlevel.wait_readable(conn.fd)
            self._waiting = None
            if not self._out and not feed.ready and not self._gone:  # the client sent bytes, or its end
                conn.recv_now()  # ClientGone at the end
                conn.buffer.clear()
