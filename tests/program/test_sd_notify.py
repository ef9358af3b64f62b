"""systemd's notifications: the environment read (sans-IO), the notifier on a real socket, and the real
program under a test socket playing systemd: READY=1 once the proxy answers, watchdog pings, STOPPING=1."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from cli_process import LOOPBACK_NODE, free_tcp_port

from trio_dht import sd_notify
from trio_dht.sd_notify import NotifySettings, SystemdNotifier, message, read_environ

MODULE = (sys.executable, "-m", "trio_dht")
PID = 4242


# -- the environment ---


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"NOTIFY_SOCKET": ""}, None),
        ({"NOTIFY_SOCKET": "/run/systemd/notify"}, NotifySettings("/run/systemd/notify")),
        (
            {"NOTIFY_SOCKET": "@/org/freedesktop/systemd1/notify/123"},
            NotifySettings("\0/org/freedesktop/systemd1/notify/123"),
        ),
        ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "30000000"}, NotifySettings("/n", 15.0)),
        (
            {"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(PID)},
            NotifySettings("/n", 15.0),
        ),
        ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, NotifySettings("/n")),
        ({"WATCHDOG_USEC": "30000000"}, None),  # a watchdog with no socket to ping through
    ],
)
def test_what_the_environment_asks(environ: dict[str, str], expected: NotifySettings | None) -> None:
    assert read_environ(environ, PID) == (expected, [])


@pytest.mark.parametrize(
    ("environ", "expected", "problem"),
    [
        (
            {"NOTIFY_SOCKET": "notify.sock"},
            None,
            "NOTIFY_SOCKET='notify.sock' is neither an absolute path nor @name",
        ),
        ({"NOTIFY_SOCKET": "@"}, None, "NOTIFY_SOCKET='@' is neither"),
        ({"NOTIFY_SOCKET": "vsock:2:1234"}, None, "NOTIFY_SOCKET='vsock:2:1234' is neither"),
        ({"NOTIFY_SOCKET": "/" + "x" * 107}, None, "is longer than a Unix socket address"),
        (
            {"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "soon"},
            NotifySettings("/n"),
            "WATCHDOG_USEC='soon' is not",
        ),
        ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "0"}, NotifySettings("/n"), "WATCHDOG_USEC='0' is not"),
        ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "-5"}, NotifySettings("/n"), "WATCHDOG_USEC='-5' is not"),
        (
            {"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "me"},
            NotifySettings("/n"),
            "WATCHDOG_PID='me' is not a process id",
        ),
    ],
)
def test_bad_values_are_ignored_with_a_line(environ: dict[str, str], expected: object, problem: str) -> None:
    settings, problems = read_environ(environ, PID)
    assert settings == expected
    assert len(problems) == 1 and problem in problems[0], problems


def test_from_environ_logs_what_it_ignores(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trio_dht.sd_notify")
    assert SystemdNotifier.from_environ({}) is None
    assert SystemdNotifier.from_environ({"NOTIFY_SOCKET": "relative"}) is None
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "not notifying systemd" in caplog.records[0].getMessage()


def test_a_message_is_one_line_a_field() -> None:
    assert (
        message(READY=1, STATUS="up\nand running", MAINPID=7) == b"READY=1\nSTATUS=up and running\nMAINPID=7"
    )


# -- the notifier on a real socket ---


@contextlib.contextmanager
def systemd_socket(address: str) -> Iterator[socket.socket]:
    """The receiving end, as systemd binds it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.setblocking(False)
        yield sock


def received(sock: socket.socket) -> list[bytes]:
    out = []
    with contextlib.suppress(BlockingIOError):
        while True:
            out.append(sock.recv(4096))
    return out


def abstract_name() -> str:
    return f"\0trio-dht-test-{os.getpid()}-{time.monotonic_ns()}"


async def test_the_notifier_through_an_abstract_socket() -> None:
    address = abstract_name()
    with systemd_socket(address) as sock:
        notifier = SystemdNotifier.from_environ(
            {"NOTIFY_SOCKET": "@" + address[1:], "WATCHDOG_USEC": "100000"}
        )
        assert notifier is not None and notifier.settings.watchdog_every == 0.05
        notifier.ready("no good peer yet; proxy on http://127.0.0.1:8000")
        notifier.status("no good peer yet; proxy on http://127.0.0.1:8000")  # unchanged: not sent
        notifier.status("good peers over IPv4; proxy on http://127.0.0.1:8000")
        assert received(sock) == [
            f"READY=1\nSTATUS=no good peer yet; proxy on http://127.0.0.1:8000\nMAINPID={os.getpid()}".encode(),
            b"STATUS=good peers over IPv4; proxy on http://127.0.0.1:8000",
        ]
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.run)
            pings: list[bytes] = []
            with trio.fail_after(5):
                while len(pings) < 3:
                    await trio.sleep(0.05)
                    pings += received(sock)
            assert set(pings) == {b"WATCHDOG=1"}
            time.sleep(0.3)  # the event loop is stuck: no ping goes out meanwhile
            assert received(sock) == []
            nursery.cancel_scope.cancel()
        assert received(sock)[-1] == b"STOPPING=1\nSTATUS=stopping"


async def test_a_ready_that_could_not_be_sent_is_sent_again(autojump_clock: trio.testing.MockClock) -> None:
    """systemd's queue is full when READY=1 goes out: it is sent again (with the latest status) once there is
    room, and the statuses meanwhile are not sent alone."""
    address = abstract_name()
    with systemd_socket(address) as sock:
        notifier = SystemdNotifier(NotifySettings(address))
        filler = 0
        while notifier.send(b"WATCHDOG=1"):  # fill the receiving queue
            filler += 1
            assert filler < 100_000
        notifier.ready("no good peer yet")
        assert notifier.ready_pending
        notifier.status("good peers over IPv4")  # carried by the READY=1 to come
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.run)
            await trio.sleep(10 * sd_notify.READY_RETRY_EVERY + 0.1)
            assert notifier.ready_pending  # still full
            assert received(sock) == [b"WATCHDOG=1"] * filler  # now there is room
            await trio.sleep(sd_notify.READY_RETRY_EVERY + 0.1)  # past the next attempt, not at it
            assert not notifier.ready_pending
            assert received(sock) == [f"READY=1\nSTATUS=good peers over IPv4\nMAINPID={os.getpid()}".encode()]
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("watchdog_every", [None, 0.2, 0.7])
async def test_a_ready_that_never_goes_out_is_given_up(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, watchdog_every: float | None
) -> None:
    """Every 0.5 s, 180 times (90 s), whatever the watchdog pings in between."""
    notifier = SystemdNotifier(NotifySettings(abstract_name(), watchdog_every))  # nobody listens there
    async with trio.open_nursery() as nursery:
        await nursery.start(notifier.run)
        notifier.ready("up")
        given_up_after = (sd_notify.READY_ATTEMPTS - 1) * sd_notify.READY_RETRY_EVERY
        await trio.sleep(given_up_after - 0.1)
        assert notifier.ready_pending
        await trio.sleep(0.2)
        assert not notifier.ready_pending
        nursery.cancel_scope.cancel()
    assert any(r.getMessage().startswith("gave up notifying systemd") for r in caplog.records)


def test_a_failed_send_is_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    notifier = SystemdNotifier(NotifySettings(abstract_name()))  # nobody listens there
    for _ in range(3):
        assert not notifier.send(b"WATCHDOG=1")
    assert notifier.errors == 3 and notifier.sent == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "trio_dht.sd_notify"]
    assert len(lines) == 1 and lines[0].startswith("cannot notify systemd through @trio-dht-test-")


# -- the real program ---


async def test_the_program_under_systemd(tmp_path: Path) -> None:
    """READY=1 comes once the proxy answers, WATCHDOG=1 every half of WATCHDOG_USEC, STOPPING=1 at SIGTERM."""
    with tempfile.TemporaryDirectory(prefix="sd") as folder, systemd_socket(f"{folder}/notify") as sock:
        port = free_tcp_port()
        environ = {**os.environ, "NOTIFY_SOCKET": f"{folder}/notify", "WATCHDOG_USEC": "600000"}
        command = [*MODULE, *LOOPBACK_NODE, "--proxyserver", str(port), "--proxy-addr", "127.0.0.1"]
        process = await trio.lowlevel.open_process(
            command, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        trio_sock = trio.socket.from_stdlib_socket(sock)
        try:
            with trio.fail_after(30):
                first = await trio_sock.recv(4096)
                while first == b"WATCHDOG=1":  # pings may come before the proxy serves
                    first = await trio_sock.recv(4096)
            fields = dict(line.split("=", 1) for line in first.decode().splitlines())
            async with httpx.AsyncClient() as client:  # at once: the proxy answers as soon as READY=1 is sent
                reply = await client.get(f"http://127.0.0.1:{port}/")
            assert reply.status_code == 200 and len(reply.json()["node_id"]) == 40
            assert fields == {
                "READY": "1",
                "STATUS": f"no good peer yet; proxy on http://127.0.0.1:{port}",
                "MAINPID": str(process.pid),
            }
            pings = 0
            with trio.fail_after(5):
                while pings < 4:  # one every 0.3 s
                    assert await trio_sock.recv(4096) == b"WATCHDOG=1"
                    pings += 1
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                while (data := await trio_sock.recv(4096)) == b"WATCHDOG=1":
                    pass
                assert data == b"STOPPING=1\nSTATUS=stopping"
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
