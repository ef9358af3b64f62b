"""The INFO lines an operator needs, from the program's tasks: peers found and lost (with systemd's status),
the limits reached once a minute; and two real nodes saying they found each other."""

from __future__ import annotations

import logging
import socket
import sys
from typing import Any

import pytest
import trio
from cli_process import LOOPBACK_NODE, trio_dht_process

from trio_dht import app
from trio_dht.limits_hit import LIMIT_COUNTERS, REPORT_EVERY, LimitsHit, read_counters
from trio_dht.node.connectivity import Connectivity

MODULE = (sys.executable, "-m", "trio_dht")


class FakeTable:
    def __init__(self) -> None:
        self.good = 0

    def is_connected(self, now: float) -> bool:
        return self.good > 0

    def counts(self, now: float) -> tuple[int, int]:
        return self.good, 2


class FakeNode:
    def __init__(self) -> None:
        self.tables = {False: FakeTable(), True: FakeTable()}

        class Protocol:
            families = {False, True}

        self.protocol = Protocol()


class FakeNotifier:
    def __init__(self) -> None:
        self.statuses: list[str] = []

    def status(self, text: str) -> None:
        self.statuses.append(text)


async def test_peers_found_and_lost_per_family(autojump_clock: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trio_dht.app")
    node, notifier = FakeNode(), FakeNotifier()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app._watch_peers, node, Connectivity(), notifier, ["http://127.0.0.1:8000"])
        await trio.sleep(12)
        node.tables[False].good = 3
        await trio.sleep(6)
        node.tables[False].good = 8  # more nodes: no line
        node.tables[True].good = 1
        await trio.sleep(6)
        node.tables[False].good = node.tables[True].good = 0
        await trio.sleep(6)
        nursery.cancel_scope.cancel()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert lines == [
        (logging.INFO, "IPv4: peers found (3 good nodes)"),
        (logging.INFO, "IPv6: peers found (1 good nodes)"),
        (logging.WARNING, "IPv4: peers lost (no good node, 2 dubious)"),
        (logging.WARNING, "IPv6: peers lost (no good node, 2 dubious)"),
    ]
    proxy = "; proxy on http://127.0.0.1:8000"
    assert notifier.statuses == [
        "good peers over IPv4" + proxy,
        "good peers over IPv4 and IPv6" + proxy,
        "no good peer (all lost)" + proxy,
    ]


def test_limits_hit_names_what_moved() -> None:
    report = LimitsHit()
    stats: dict[str, Any] = {
        "nodeInfo": {"dropped_rate": 10, "listeners_refused": 0, "received": 5},
        "http": {"connectionsRefused": 1},
        "pushListenersCount": 3,
    }
    assert report.line(stats, 0) is None  # the first reading sets the mark
    assert report.line(stats, 60) is None  # nothing moved
    stats["nodeInfo"] = {"dropped_rate": 12_345, "listeners_refused": 0, "received": 99}
    stats["http"] = {"connectionsRefused": 4}
    assert report.line(stats, 60) == (
        "limits reached in the last 60 s (counters of /node/stats): nodeInfo.dropped_rate +12,335, "
        "http.connectionsRefused +3"
    )
    assert read_counters({"http": {"connectionsRefused": 4}}) == {"http.connectionsRefused": 4}
    assert all(path.count(".") == 1 for path in LIMIT_COUNTERS)


async def test_the_limits_report_is_one_line_a_minute(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_dht.app")
    counters = {"dropped_rate": 0}
    stats = app._StatsDocument(None)  # type: ignore[arg-type]
    stats.use(lambda now: {"nodeInfo": dict(counters)})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app._report_limits, stats)
        for _ in range(200):  # a flood: the counter moves all the time
            await trio.sleep(1)
            counters["dropped_rate"] += 1000
        await trio.sleep(REPORT_EVERY * 3)  # then nothing
        nursery.cancel_scope.cancel()
    prefix = "limits reached in the last 60 s (counters of /node/stats): nodeInfo.dropped_rate +"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and all(line.startswith(prefix) for line in lines)  # 200 s of flood, then quiet
    assert sum(int(line.removeprefix(prefix).replace(",", "")) for line in lines) == 200_000


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_two_nodes_say_they_found_peers() -> None:
    port = free_udp_port()
    first = [*MODULE, "-p", str(port), "--bind", "127.0.0.1", "--no-ipv6", "--no-proxy"]
    async with trio_dht_process(first) as one:
        second = [*MODULE, *LOOPBACK_NODE, "--no-proxy", "-b", f"127.0.0.1:{port}"]
        async with trio_dht_process(second) as two:
            with trio.fail_after(30):
                while not all("IPv4: peers found" in node.output for node in (one, two)):
                    await trio.sleep(0.2)
            assert await two.stop() == 0
        assert await one.stop() == 0
    assert (
        "IPv4: peers found (1 good nodes)" in one.output and "IPv4: peers found (1 good nodes)" in two.output
    )
