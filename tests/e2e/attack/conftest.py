"""The attack suite's shared helpers: the real ``trio-dht`` process under attack, and what to measure on it.

Each test here starts the program as a user would (``python -m trio_dht``, loopback only), sends it what a
stranger could send, in loops bounded in count and time, and asserts the bound the program promises
(``trio_dht.limits``): resident memory, how long a slow peer is kept, that honest traffic is still served.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cli_process import LOOPBACK_NODE, TrioDhtProcess, free_tcp_port, trio_dht_process

pytestmark = pytest.mark.attack


@dataclass
class Target:
    """A running ``trio-dht`` under attack: its process, UDP port and proxy base URL."""

    proc: TrioDhtProcess
    udp_port: int
    http_port: int

    @property
    def pid(self) -> int:
        return self.proc.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def rss_kb(self) -> int:
        """Resident memory of the process and its children (the HTTP worker), in KiB."""
        return rss_kb(self.pid)

    async def stats(self) -> dict:
        """``GET /node/stats``."""
        async with httpx.AsyncClient(timeout=5) as client:
            reply = await client.get(f"{self.url}/node/stats")
            reply.raise_for_status()
            return reply.json()


def rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` plus that of its child processes, in KiB (Linux ``/proc``)."""
    total = 0
    pids = [pid]
    while pids:
        current = pids.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except FileNotFoundError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
        for task in Path(f"/proc/{current}/task").iterdir():
            children = (task / "children").read_text().split()
            pids.extend(int(child) for child in children)
    return total


@asynccontextmanager
async def attacked(*flags: str, timeout: float = 30) -> AsyncIterator[Target]:
    """Start ``python -m trio_dht`` on loopback with ``flags`` (a free proxy port unless given)."""
    args: Sequence[str] = list(flags)
    http_port = 0
    if "--proxyserver" not in args and "--no-proxy" not in args:
        http_port = free_tcp_port()
        args = ["--proxyserver", str(http_port), "--proxy-addr", "127.0.0.1", *args]
    elif "--proxyserver" in args:
        http_port = int(args[list(args).index("--proxyserver") + 1])
    command = [sys.executable, "-m", "trio_dht", *LOOPBACK_NODE, *args]
    async with trio_dht_process(command, timeout=timeout) as proc:
        assert proc.process.returncode is None, proc.output
        yield Target(proc, proc.udp_port, http_port)
