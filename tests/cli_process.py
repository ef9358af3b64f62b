"""Test helpers: a ``trio-dht`` process started as a user would start it, and a foreign peer's UDP ping."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import trio

READY = "running; SIGINT or SIGTERM stops"
_NODE_LINE = re.compile(r"node ([0-9a-f]{40}) on UDP port (\d+)")
#: Loopback only, IPv4 only, no fixed ports: what every test run of the program adds to its own flags.
LOOPBACK_NODE = ("-p", "0", "--bind", "127.0.0.1", "--no-ipv6")


class TrioDhtProcess:
    """A running ``trio-dht``: its merged stdout/stderr lines so far, and what its startup lines said."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.ready = trio.Event()  # set at the READY line, or when the output ends (the process died)
        self.output_closed = trio.Event()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def node_id(self) -> str:
        return self._node_line().group(1)

    @property
    def udp_port(self) -> int:
        return int(self._node_line().group(2))

    def _node_line(self) -> re.Match[str]:
        match = _NODE_LINE.search(self.output)
        assert match, f"no node line in:\n{self.output}"
        return match

    async def stop(self, signum: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Send ``signum``; the exit code once the process and its output ended (fails after ``timeout``)."""
        self.process.send_signal(signum)
        with trio.fail_after(timeout):
            await self.output_closed.wait()
            return await self.process.wait()

    async def _read_output(self, stream: trio.abc.ReceiveStream) -> None:
        pending = b""
        async for chunk in stream:
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace")
                self.lines.append(line)
                if READY in line:
                    self.ready.set()
        if pending:
            self.lines.append(pending.decode(errors="replace"))
        self.ready.set()
        self.output_closed.set()


@asynccontextmanager
async def trio_dht_process(command: Sequence[str], *, timeout: float = 30) -> AsyncIterator[TrioDhtProcess]:
    """Start ``command``, wait (up to ``timeout``) for its READY line or its exit; kill it on the way out."""
    process = await trio.lowlevel.open_process(
        list(command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    running = TrioDhtProcess(process)
    try:
        async with trio.open_nursery() as nursery:
            assert process.stdout is not None
            nursery.start_soon(running._read_output, process.stdout)
            with trio.fail_after(timeout):
                await running.ready.wait()
            yield running
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


async def ping(port: int, *, attempts: int = 3) -> dict[str, Any]:
    """Ping ``127.0.0.1:port`` as a foreign OpenDHT peer would; the decoded reply."""
    request = msgpack.packb({"a": {"id": os.urandom(20)}, "q": "ping", "t": 0x12345678, "y": "q", "v": "o2"})
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        for _ in range(attempts):
            await sock.sendto(request, ("127.0.0.1", port))
            with trio.move_on_after(1):
                return msgpack.unpackb(await sock.recv(65536), raw=False, strict_map_key=False)
    raise AssertionError(f"no reply to {attempts} pings on UDP port {port}")


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def read_to_end(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes (a reset counts as the end)."""
    data = b""
    while True:
        try:
            chunk = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return data
        if not chunk:
            return data
        data += chunk
