"""``trio-dht --interactive`` driven through a pseudo-terminal: dhtnode's prompt over the running program.

The program runs with the pty's slave as its stdin, stdout and stderr (so readline is on, as for a person at
a terminal); the test reads the master with a deadline on every wait, and matches the text with the
terminal's escape sequences and carriage returns taken out.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator

import pytest
import trio
from peers import free_port, needs_dhtnode, open_dhtnode_peer, open_dhtnode_prompt, require_dhtnode

from trio_dht.infohash import InfoHash

MODULE = (sys.executable, "-m", "trio_dht")
LOOPBACK_NODE = ("-p", "0", "--bind", "127.0.0.1", "--no-ipv6")
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")
WAIT = 15.0


class Terminal:
    """The program on a pseudo-terminal."""

    def __init__(self, *args: str) -> None:
        self.master, self.slave = pty.openpty()
        self.process = subprocess.Popen(
            [*MODULE, "--interactive", *args],
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            start_new_session=True,  # the pty is the program's controlling terminal
            env={**os.environ, "TERM": "xterm"},
        )
        self.settings = termios.tcgetattr(self.slave)
        self.text = ""
        self.seen = 0  # what expect() has consumed

    def send(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def _read(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready, _, _ = select.select([self.master], [], [], min(left, 0.2))
        if ready:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # the program closed its side
                return False
            self.text += _ESCAPES.sub("", chunk.decode("utf-8", "replace"))
        return True

    def expect(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        """The first match of ``pattern`` after the previous one; fails after ``timeout`` seconds."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.text, self.seen)
            if match is not None:
                self.seen = match.end()
                return match
            if not self._read(deadline):
                pytest.fail(f"no {pattern!r} within {timeout} s; the terminal shows:\n{self.text[-3000:]}")

    def wait(self, timeout: float = WAIT) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            self._read(deadline)
        return self.process.wait(timeout=max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def terminal() -> Iterator[type[Terminal]]:
    opened: list[Terminal] = []

    def start(*args: str) -> Terminal:
        term = Terminal(*args)
        opened.append(term)
        return term

    yield start  # type: ignore[misc]
    for term in opened:
        term.close()


def _banner(term: Terminal) -> str:
    return term.expect(r"^OpenDHT node ([0-9a-f]{40}) running on port (\d+)$").group(1)


def test_put_then_get_prints_the_value_and_x_exits_0(terminal: type[Terminal]) -> None:
    term = terminal(*LOOPBACK_NODE, "--no-proxy")
    node_id = _banner(term)
    term.expect(r"type 'h' or 'help'")
    term.send("p foo hello")
    term.expect(rf"^Using h\(foo\) = {InfoHash.get('foo').hex()}$")
    value_id = term.expect(r"Put: success, took [\d.]+ [mu]?s\. Value ID: ([0-9a-f]+)$").group(1)
    term.send("g foo")
    term.expect(r"Get: found 1 value\(s\) after [\d.]+ [mu]?s \(total 1\)$")
    term.expect(rf'^\tValue\[id:{value_id} data\(text/plain\):"hello"\]$')
    term.expect(r"Get: completed, took .* \(total 1\)$")
    term.send("ll")
    term.expect(rf"^OpenDHT node {node_id} running on port \d+$")
    term.expect(r"^Storage has 1 values, using 0 KB$")
    term.expect(r"^Known nodes: 0 good, 0 dubious, 0 incoming\.$")
    term.send("ld")
    term.expect(rf"^Storage {InfoHash.get('foo').hex()} 0 list\., 1 values")
    term.send("h")
    term.expect(r"^  g <key>\s+Get values at <key>\.$")
    term.send("x")
    term.expect(r"^Stopping node\.\.\.$")
    assert term.wait() == 0
    term.expect(r"INFO trio_dht\.app: stopped$", timeout=1)


def test_listen_prints_a_value_another_client_puts(terminal: type[Terminal]) -> None:
    port = free_port("tcp")
    term = terminal(*LOOPBACK_NODE, "--proxyserver", str(port), "--proxy-addr", "127.0.0.1")
    _banner(term)
    term.send("l foo")
    term.expect(r"^Listening, token: 1$")
    term.expect(r">> ")
    os.write(term.master, b"g fo")  # half a line typed when the value comes
    term.expect(r"g fo")
    put = subprocess.run(
        [*MODULE, "client", "--proxy", f"http://127.0.0.1:{port}", "put", "foo", "from-the-proxy"],
        capture_output=True,
        timeout=WAIT,
        check=False,
    )
    assert put.returncode == 0, put.stderr
    term.expect(r"Listen: found 1 values \(total 1\)$")
    term.expect(
        rf'^\tValue\[id:[0-9a-f]+ data(\(text/plain\):"from-the-proxy"|:{b"from-the-proxy".hex()})\]$'
    )
    term.expect(r"^>> g fo$")  # the output went above the line being typed, which is written again
    term.send("o")  # the line is still whole in readline
    term.expect(r"Get: completed, took .* \(total 1\)$")
    term.send("ls")
    term.expect(rf"^Search {InfoHash.get('foo').hex()} 1 listens open on 0 nodes$")
    term.send("cl foo 1")
    term.send("ls")
    term.expect(r"^Total: 0 searches\.$")
    term.send("q")
    assert term.wait() == 0


def test_end_of_input_quits(terminal: type[Terminal]) -> None:
    term = terminal(*LOOPBACK_NODE, "--no-proxy")
    _banner(term)
    term.expect(r">> ")
    os.write(term.master, b"\x04")  # Ctrl-D on an empty line
    term.expect(r"^Stopping node\.\.\.$")
    assert term.wait() == 0


def test_sigterm_at_the_prompt_exits_0_and_gives_the_terminal_back(terminal: type[Terminal]) -> None:
    """readline changes the terminal's settings while it reads; a signal stops the program in the middle
    of a read, and the settings are put back. The log line about the signal is written above the line
    being typed."""
    term = terminal(*LOOPBACK_NODE, "--no-proxy")
    _banner(term)
    term.expect(r">> ")
    os.write(term.master, b"g fo")  # half a line typed
    term.expect(r"g fo")
    assert termios.tcgetattr(term.slave) != term.settings  # readline's raw mode
    term.process.send_signal(signal.SIGTERM)
    assert term.wait() == 0
    term.expect(r"got SIGTERM, shutting down\n>> g fo")  # a log line goes above the line being typed too
    assert termios.tcgetattr(term.slave) == term.settings


@pytest.mark.interop
@needs_dhtnode
async def test_get_finds_what_dhtnode_put_and_back(terminal: type[Terminal]) -> None:
    """A real OpenDHT node (Debian's dhtnode) bootstraps our program's node: our ``g`` finds the value
    dhtnode's ``p`` put, and dhtnode's ``g`` finds the one our ``p`` put."""
    require_dhtnode()
    async with open_dhtnode_peer() as peer:
        term = terminal(*LOOPBACK_NODE, "--no-proxy", "-b", f"127.0.0.1:{peer.port}")
        await trio.to_thread.run_sync(_banner, term)
        await peer.wait_for_nodes(1)
        assert await peer.prompt.put("from-dhtnode", "hello-trio")
        term.send("g from-dhtnode")
        await trio.to_thread.run_sync(
            term.expect, r'^\tValue\[id:[0-9a-f]+ data\(text/plain\):"hello-trio"\]$'
        )
        await trio.to_thread.run_sync(term.expect, r"Get: completed, took .* \(total 1\)$")
        term.send("p from-trio hello-dhtnode")
        await trio.to_thread.run_sync(term.expect, r"Put: success, took .*Value ID: [0-9a-f]+$")
        values = await peer.prompt.get("from-trio")
        assert [(v["data"], v["utype"]) for v in values] == [(b"hello-dhtnode", "text/plain")]
        term.send("lr")
        dhtnode_id = (await peer.node_id()).hex()
        pattern = rf"^    Node {dhtnode_id} 127\.0\.0\.1:{peer.port} updated: .* ago \[(good|dubious)\]$"
        await trio.to_thread.run_sync(term.expect, pattern)
        term.send("x")
        assert await trio.to_thread.run_sync(term.wait) == 0


async def test_the_driver_of_dhtnode_s_prompt_drives_ours() -> None:
    """The test suite's driver of dhtnode's prompt (over pipes: no terminal, no prompt) reads our answers as
    it reads dhtnode's: puts, gets, ``ll``, and a listen's values."""
    async with open_dhtnode_prompt(
        [*LOOPBACK_NODE, "--no-proxy"], program=[*MODULE, "--interactive"]
    ) as prompt:
        assert await prompt.put("foo", "word")
        values = await prompt.get("foo")
        assert [(v["data"], v["utype"]) for v in values] == [(b"word", "text/plain")]
        info = await prompt.node_info()
        assert (info["node_id"], info["port"], info["values"]) == (prompt.node_id.hex(), prompt.port, 1)
        assert info["ipv4"] == {"good": 0, "dubious": 0, "incoming": 0, "searches": 0, "cached": 0}
        async with prompt.listen("bar") as events:
            assert await prompt.put("bar", "heard")
            with trio.fail_after(WAIT):
                event = await events.receive()
            assert (event["data"], event["expired"]) == (b"heard", False)
        assert await prompt.command("ld") != []
