"""The ``trio-dht`` program: flags, startup lines, clean stop on SIGINT/SIGTERM, one-line failures."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import trio
from cli_process import LOOPBACK_NODE, ping, trio_dht_process

from trio_dht import __main__ as cli
from trio_dht import app
from trio_dht.cli import AppConfig

MODULE = (sys.executable, "-m", "trio_dht")
LOOPBACK = AppConfig(port=0, bind="127.0.0.1", bind6=None, proxy=None)


@pytest.fixture
def quiet_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process runs of main() leave the test session's logging configuration alone."""
    monkeypatch.setattr(cli, "configure_logging", lambda *args: None)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"trio-dht {metadata.version('trio-dht')}\n"


def test_help_lists_dhtnode_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "trio-dht client --help" in " ".join(out.split())
    for flag in (
        "-p PORT",
        "-b [HOST[:PORT]]",
        "-n NETWORK_ID",
        "--verbose",
        "--version",
        "--proxyserver PORT",
    ):
        assert flag in out
    for flag in ("--proxyserverssl", "--proxy-addr", "--pushserver", "--bundleid", "--persist"):
        assert flag in out
    for flag in ("--identity", "--certificate FILE", "--privkey FILE", "--privkey-password"):
        assert flag in out  # dhtnode's identity flags
    assert "--save-identity" in out
    assert "needs the cryptography package" in " ".join(out.split())


def test_client_subcommand_is_the_proxy_client(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["client", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: trio-dht client")


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("trio-dht")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=30, check=True)
    assert result.stdout.startswith("trio-dht ")


def test_describe_failure_unwraps_exception_groups() -> None:
    inner = ExceptionGroup("proxy", [OSError(98, "Address already in use")])
    nested = BaseExceptionGroup("run", [ExceptionGroup("node", [inner, ValueError("bad")])])
    assert cli.describe_failure(nested) == "OSError: [Errno 98] Address already in use; ValueError: bad"
    assert cli.describe_failure(TimeoutError()) == "TimeoutError"


def test_a_failure_is_one_line_and_exit_code_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], quiet_logging: None
) -> None:
    async def failing_run(config: AppConfig) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            raise OSError("boom")

    monkeypatch.setattr(cli, "run", failing_run)
    assert cli.main(["--no-proxy"]) == 1
    assert capsys.readouterr().err == "trio-dht: error: OSError: boom\n"


def test_ctrl_c_outside_the_signal_receiver_exits_0(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], quiet_logging: None
) -> None:
    async def interrupted_run(config: AppConfig) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupted_run)
    assert cli.main([]) == 0
    assert capsys.readouterr().err == ""


def test_configure_logging_levels() -> None:
    loggers = logging.getLogger(), logging.getLogger("trio_dht")
    saved = [logger.level for logger in loggers]
    try:
        for verbose, root_level, own_level in [
            (0, logging.WARNING, logging.INFO),
            (1, logging.INFO, logging.DEBUG),
        ]:
            cli.configure_logging(verbose)
            assert (loggers[0].level, loggers[1].level) == (root_level, own_level)
        cli.configure_logging(2)
        assert loggers[0].level == logging.DEBUG
    finally:
        for logger, level in zip(loggers, saved, strict=True):
            logger.setLevel(level)


async def test_run_serves_until_sigterm() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            node = await nursery.start(app.run, LOOPBACK)
            reply = await ping(node.bound_port)
            assert reply["r"]["id"] == node.node_id
            os.kill(os.getpid(), signal.SIGTERM)
        # run() returned: the signal cancelled the tree, and the node's socket is closed.
        with pytest.raises(AssertionError, match="no reply"):
            await ping(node.bound_port, attempts=1)


async def test_a_crashing_service_stops_the_whole_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    async def crashing_proxy(services: trio.Nursery, node: Any, config: AppConfig, push: Any) -> None:
        async def crash(task_status: trio.TaskStatus[None]) -> None:
            task_status.started()
            await trio.sleep(0.1)
            raise OSError("proxy crashed")

        await services.start(crash)

    monkeypatch.setattr(app, "_start_proxy", crashing_proxy)
    with trio.fail_after(10), pytest.raises(BaseExceptionGroup) as exc_info:
        await app.run(LOOPBACK)
    assert cli.describe_failure(exc_info.value) == "OSError: proxy crashed"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_process_logs_startup_and_exits_0_on_signal(signum: int) -> None:
    async with trio_dht_process([*MODULE, *LOOPBACK_NODE, "--no-proxy"]) as node:
        assert node.process.returncode is None, node.output
        reply = await ping(node.udp_port)
        assert reply["t"] == 0x12345678
        assert reply["r"]["id"].hex() == node.node_id
        assert await node.stop(signum) == 0
    assert f"got {signal.Signals(signum).name}, shutting down" in node.output
    assert node.lines[-1].endswith("stopped")
    assert "Traceback" not in node.output


async def test_process_that_cannot_start_says_why_in_one_line() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        flags = ["-p", str(port), "--bind", "127.0.0.1", "--no-ipv6", "--no-proxy"]
        async with trio_dht_process([*MODULE, *flags]) as node:
            with trio.fail_after(10):
                assert await node.process.wait() == 1
            await node.output_closed.wait()
    assert node.lines == ["trio-dht: error: OSError: [Errno 98] Address already in use"]
