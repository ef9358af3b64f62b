"""The UDP socket of one address family, as a thin Trio shell.

Datagrams are read in batches after one ``wait_readable`` and handed to a synchronous handler, and replies
are sent at once with a non-blocking ``sendto``: per datagram there is no task, no checkpoint and no address
resolution, which is most of what a Trio socket call costs. A send that would block is queued and flushed by
the endpoint's own task when the socket is writable again: at most :data:`MAX_QUEUED` datagrams, each dropped
if still queued after :data:`MAX_QUEUE_AGE` seconds (OpenDHT resends a request unanswered for a second, so an
older datagram only adds to the backlog).
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from collections.abc import Callable

import trio

from trio_dht.wire.compact import Address, normalize

log = logging.getLogger("trio_dht.udp")

RECV_BUFFER = 64 * 1024
BATCH = 64
MAX_QUEUED = 4096
MAX_QUEUE_AGE = 2.0


class UdpEndpoint:
    """One bound, non-blocking UDP socket."""

    def __init__(self, family: socket.AddressFamily, host: str, port: int) -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        if family == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        self.address: Address = normalize(self.sock.getsockname())
        self._queue: deque[tuple[bytes, Address, float]] = deque()
        self._writable = trio.Event()
        self.sent = 0
        self.queue_drops = 0
        """Datagrams dropped from a full or stale send queue."""

    def send(self, data: bytes, addr: Address) -> None:
        """Send now, or queue if the socket buffer is full (dropped past a bound: UDP may lose it anyway)."""
        if self._queue:
            self._enqueue(data, addr)
            return
        try:
            self.sock.sendto(data, addr)
            self.sent += 1
        except BlockingIOError:
            self._enqueue(data, addr)
        except OSError as exc:
            log.debug("send to %s failed: %s", addr, exc)

    def _enqueue(self, data: bytes, addr: Address) -> None:
        if len(self._queue) >= MAX_QUEUED:
            self.queue_drops += 1
            return
        self._queue.append((data, addr, trio.current_time()))
        self._writable.set()

    async def _flush(self) -> None:
        while True:
            await self._writable.wait()
            self._writable = trio.Event()
            while self._queue:
                data, addr, queued_at = self._queue[0]
                if trio.current_time() - queued_at > MAX_QUEUE_AGE:
                    self.queue_drops += 1
                    self._queue.popleft()
                    continue
                await trio.lowlevel.wait_writable(self.sock)
                try:
                    self.sock.sendto(data, addr)
                    self.sent += 1
                except BlockingIOError:
                    continue
                except OSError as exc:
                    log.debug("send to %s failed: %s", addr, exc)
                self._queue.popleft()

    async def serve(self, handler: Callable[[bytes, Address], None]) -> None:
        """Feed every received datagram to ``handler`` (which must not raise) until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._flush)
            sock = self.sock
            v4 = sock.family == socket.AF_INET  # IPv4 addresses come as (ip, port) already
            while True:
                await trio.lowlevel.wait_readable(sock)
                for _ in range(BATCH):
                    try:
                        data, raw_addr = sock.recvfrom(RECV_BUFFER)
                    except BlockingIOError:
                        break
                    except OSError as exc:  # e.g. ICMP port unreachable reported on Linux
                        log.debug("recvfrom: %s", exc)
                        continue
                    handler(data, raw_addr if v4 else normalize(raw_addr))
                else:
                    await trio.lowlevel.checkpoint()  # a full batch: let other tasks run

    def close(self) -> None:
        self.sock.close()
