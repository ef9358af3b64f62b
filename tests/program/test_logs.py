"""The program's log: ``-l FILE`` and ``--log-format json``, the rate limit on its lines, the token bucket."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from cli_process import LOOPBACK_NODE, READY

from trio_dht.logs import JsonFormatter, RateLimitedHandler, configure
from trio_dht.token_bucket import TokenBucket

MODULE = (sys.executable, "-m", "trio_dht")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


def record(message: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("trio_dht.test", level, __file__, 1, message, (), None)


def test_token_bucket_starts_full_and_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.4)  # 0.8 of a token
    assert bucket.take(0.5)  # one
    assert not bucket.take(0.5)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # never more than the burst
    assert not TokenBucket(rate=0, burst=0, now=0.0).take(10.0)


def test_a_token_bucket_gains_nothing_from_a_clock_going_back() -> None:
    bucket = TokenBucket(rate=1, burst=1, now=10.0)
    assert bucket.take(10.0)
    assert not bucket.take(5.0) and bucket.updated == 10.0
    assert not bucket.take(10.5)  # half a token since 10.0, not 5.5 s worth
    assert bucket.take(11.0)


def test_the_handler_passes_a_burst_then_the_rate_and_counts_what_it_drops() -> None:
    clock = FakeClock()
    inner = Collect()
    handler = RateLimitedHandler(inner, rate=10, burst=5, clock=clock)
    for i in range(50):  # a flood: the burst passes, the rest is dropped
        handler.handle(record(f"flood {i}"))
    assert inner.messages == [f"flood {i}" for i in range(5)]
    assert handler.dropped == 45
    clock.now += 0.1  # one line's worth
    handler.handle(record("after"))
    assert inner.messages[5:] == ["45 log lines dropped (more than 10 a second)", "after"]
    assert inner.records[5].levelno == logging.WARNING and inner.records[5].name == "trio_dht.logs"
    handler.handle(record("next"))  # no token left: dropped...
    clock.now += 1
    handler.handle(record("soon"))  # ...and reported at most once per 10 s
    assert inner.messages[7:] == ["soon"]
    clock.now += 10
    handler.handle(record("later"))
    assert inner.messages[8:] == ["1 log lines dropped (more than 10 a second)", "later"]
    assert handler.dropped == 46
    clock.now += 10
    handler.handle(record("quiet"))
    assert inner.messages[10:] == ["quiet"]  # nothing dropped since: no note


def test_the_programs_failure_line_passes_a_flood_and_close_tells_what_was_dropped() -> None:
    clock = FakeClock()
    inner = Collect()
    handler = RateLimitedHandler(inner, rate=10, burst=5, clock=clock)
    for i in range(50):
        handler.handle(record(f"flood {i}"))
    failure = logging.LogRecord("trio_dht", logging.ERROR, __file__, 0, "stopped by a failure", None, None)
    handler.handle(failure)  # no token left, but the program's own failure always reaches the log
    assert inner.messages[5:] == ["45 log lines dropped (more than 10 a second)", "stopped by a failure"]
    strangers = logging.LogRecord("trio_dht.node.dht", logging.ERROR, __file__, 0, "any error", None, None)
    handler.handle(strangers)  # other loggers' errors keep to the budget
    handler.close()
    assert inner.messages[7:] == ["1 log lines dropped (more than 10 a second)"]


def test_a_steady_flood_writes_the_rate_a_second() -> None:
    clock = FakeClock()
    inner = Collect()
    handler = RateLimitedHandler(inner, rate=20, burst=200, clock=clock)
    for _ in range(100 * 60):  # 100 lines a second for a minute
        clock.now += 0.01
        handler.handle(record("x"))
    notes = [m for m in inner.messages if m != "x"]
    assert len(notes) == 6  # one per 10 s
    assert (
        200 + 20 * 60 - 5 <= len(inner.records) - len(notes) <= 200 + 20 * 60
    )  # the burst, then 20 a second
    assert handler.dropped == 100 * 60 - (len(inner.records) - len(notes))


def test_json_lines_hold_the_usual_fields() -> None:
    formatter = JsonFormatter()
    line = record("node ready\nsecond line")
    line.created = 1_700_000_000.25
    doc = json.loads(formatter.format(line))
    assert doc == {
        "time": "2023-11-14T22:13:20.250Z",
        "level": "INFO",
        "logger": "trio_dht.test",
        "message": "node ready\nsecond line",
    }
    assert "\n" not in formatter.format(line)
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord(
            "trio_dht", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info()
        )
    doc = json.loads(formatter.format(failed))
    assert doc["message"] == "failed x" and doc["level"] == "ERROR"
    assert doc["exc"].startswith("Traceback") and "ValueError: boom" in doc["exc"]


def test_configure_leaves_a_root_logger_with_handlers_alone(tmp_path: Path) -> None:
    """As logging.basicConfig: an embedding program's (or the test runner's) handlers stay the only ones."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("trio_dht").level
    root.handlers[:] = []
    try:
        handler = logging.FileHandler(tmp_path / "x.log")
        configure(0, handler, "json")
        (ours,) = root.handlers
        assert isinstance(ours, RateLimitedHandler) and ours.inner is handler
        assert isinstance(handler.formatter, JsonFormatter)
        other = logging.FileHandler(tmp_path / "y.log")
        configure(0, other)
        assert root.handlers == [ours] and other.stream is None  # closed, unused
        root.handlers[:] = []
        configure(2)  # -vv: every line, no rate limit
        assert not isinstance(root.handlers[0], RateLimitedHandler)
        handler.close()
    finally:
        root.handlers[:], level, own = saved
        root.setLevel(level)
        logging.getLogger("trio_dht").setLevel(own)


async def test_the_program_logs_json_lines_to_its_file(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "trio-dht.log"
    log_file.parent.mkdir()
    log_file.write_text("an earlier line\n")  # appended to, never truncated
    command = [*MODULE, *LOOPBACK_NODE, "--no-proxy", "-l", str(log_file), "--log-format", "json"]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with trio.fail_after(30):
            while READY not in log_file.read_text():
                assert process.poll() is None, "the program ended"
                await trio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.stdout is not None and process.stderr is not None
    assert await process.stdout.receive_some() == b"" and await process.stderr.receive_some() == b""
    first, *lines = log_file.read_text().splitlines()
    assert first == "an earlier line"
    docs = [json.loads(line) for line in lines]
    assert all(set(doc) == {"time", "level", "logger", "message"} for doc in docs), docs
    assert all(doc["time"].endswith("Z") for doc in docs)
    messages = [doc["message"] for doc in docs]
    start = next(doc for doc in docs if doc["message"].startswith("node "))
    assert (
        " on UDP port " in start["message"] and start["level"] == "INFO" and start["logger"] == "trio_dht.app"
    )
    assert READY in messages and messages[-1] == "stopped"


def test_a_log_file_that_cannot_be_opened_is_one_line_and_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "no such folder" / "trio-dht.log"
    done = subprocess.run(
        [*MODULE, *LOOPBACK_NODE, "--no-proxy", "-l", str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr == f"trio-dht: error: cannot open the log file {missing}: No such file or directory\n"
    assert done.stdout == ""


def test_a_failure_is_in_the_log_file_too(tmp_path: Path) -> None:
    log_file = tmp_path / "trio-dht.log"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        command = [
            *MODULE,
            "-p",
            str(port),
            "--bind",
            "127.0.0.1",
            "--no-ipv6",
            "--no-proxy",
            "-l",
            str(log_file),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith("trio-dht: error: OSError: ") and "in use" in line
    assert (
        f"ERROR trio_dht: stopped by a failure: {line.removeprefix('trio-dht: error: ')}"
        in log_file.read_text()
    )


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_log_format_is_a_choice(log_format: str) -> None:
    from trio_dht.cli import parse_args

    assert parse_args(["--log-format", log_format]).log_format == log_format
    with pytest.raises(SystemExit):
        parse_args(["--log-format", "xml"])


def test_lines_to_the_journal_carry_their_priority_and_no_time(tmp_path: Path) -> None:
    from trio_dht.logs import JournalFormatter, to_journal

    formatter = JournalFormatter()
    for level, priority in [(logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3)]:
        assert formatter.format(record("peers found", level)) == f"<{priority}>trio_dht.test: peers found"
    with (tmp_path / "stream").open("w") as stream, (tmp_path / "other").open("w") as other:
        stat = os.fstat(stream.fileno())
        environ = {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
        assert to_journal(stream, environ)
        assert not to_journal(other, environ)  # stderr was redirected elsewhere
        assert not to_journal(stream, {}) and not to_journal(stream, {"JOURNAL_STREAM": "x"})
        root = logging.getLogger()
        saved = root.handlers[:], root.level, logging.getLogger("trio_dht").level
        root.handlers[:] = []
        try:
            configure(0, stream=stream, environ=environ)
            logging.getLogger("trio_dht.test").warning("lost")
            root.handlers[:] = []
            other_stat = os.fstat(other.fileno())
            other_journal = {"JOURNAL_STREAM": f"{other_stat.st_dev}:{other_stat.st_ino}"}
            configure(0, log_format="json", stream=other, environ=other_journal)  # JSON stays JSON
            logging.getLogger("trio_dht.test").warning("lost")
        finally:
            root.handlers[:], level, own = saved
            root.setLevel(level)
            logging.getLogger("trio_dht").setLevel(own)
    assert (tmp_path / "stream").read_text() == "<4>trio_dht.test: lost\n"
    assert json.loads((tmp_path / "other").read_text())["message"] == "lost"
