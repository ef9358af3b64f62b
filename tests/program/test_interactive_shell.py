"""The interactive prompt's Trio shell (``trio_dht.interactive.shell``) over a real node on loopback, its
input and output in memory (no terminal: no prompt, lines read with ``readline()``)."""

from __future__ import annotations

import io
import os
from functools import partial
from pathlib import Path

import trio

from trio_dht import open_node
from trio_dht.cli import parse_args
from trio_dht.config_file import parse_config
from trio_dht.infohash import InfoHash
from trio_dht.interactive import Prompt
from trio_dht.interactive.commands import text_value
from trio_dht.interactive.shell import MAX_LINE, MAX_QUEUED_LINES

FOO = InfoHash.get("foo")


class _Stops:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def _lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


async def _shown(prompt: Prompt, out: io.StringIO) -> list[str]:
    """The lines written once the prompt's queue is empty (its writing task runs in the test's nursery)."""
    with trio.fail_after(5):
        while prompt._queued:
            await trio.sleep(0.005)
    return _lines(out)


async def test_put_then_get_ll_ld_ls_through_the_prompt() -> None:
    async with open_node(port=0, host="127.0.0.1", host6=None) as node:
        stops = _Stops()
        out = io.StringIO()
        await Prompt(node, stops, stdin=io.StringIO("p foo bar baz\n"), stdout=out).run()
        assert stops.count == 1  # end of input stops the program, after the put ended
        lines = _lines(out)
        assert lines[0] == f"OpenDHT node {node.node_id.hex()} running on port {node.bound_port}"
        assert f"Using h(foo) = {FOO.hex()}" in lines
        put = next(line for line in lines if line.startswith("Put: "))
        assert put.startswith("Put: success, took ")
        value_id = put.rsplit(" ", 1)[1]
        assert lines[-2:] == ["", "Stopping node..."]

        out = io.StringIO()
        commands = "g foo\nll\nld\nls\nla\nzz\nh\n"
        await Prompt(node, stops, stdin=io.StringIO(commands), stdout=out).run()
        lines = _lines(out)
        assert f'\tValue[id:{value_id} data(text/plain):"bar baz"]' in lines
        assert any(line.startswith("Get: completed, took ") and line.endswith("(total 1)") for line in lines)
        assert f"OpenDHT node {node.node_id.hex()} running on port {node.bound_port}" in lines[3:]
        assert "Known nodes: 0 good, 0 dubious, 0 incoming." in lines
        assert any(line.startswith(f"Storage {FOO.hex()} 0 list., 1 values") for line in lines)
        assert "Total 1 storages, 1 values" in "\n".join(lines)
        assert "Total: 0 searches." in lines
        assert "Reported public addresses:" in lines
        assert "Unknown command: zz" in lines
        assert "OpenDHT command line interface (CLI)" in lines


async def test_listen_prints_new_values_until_cancelled() -> None:
    async with open_node(port=0, host="127.0.0.1", host6=None) as node:
        out = io.StringIO()
        prompt = Prompt(node, _Stops(), stdin=io.StringIO(""), stdout=out)
        async with trio.open_nursery() as tasks:
            tasks.start_soon(prompt._write_queued)
            prompt.execute("l foo", tasks)
            assert (await _shown(prompt, out))[-1] == "Listening, token: 1"
            await node.put(FOO, text_value("one", 0x1))
            await trio.sleep(0.05)
            assert (await _shown(prompt, out))[-2:] == [
                "Listen: found 1 values (total 1)",
                '\tValue[id:1 data(text/plain):"one"]',
            ]
            prompt.execute("cl foo 2", tasks)
            assert (await _shown(prompt, out))[-1] == f"No listen with token 2 on {FOO.hex()}"
            prompt.execute(f"cl {FOO.hex()} 1", tasks)
            await node.put(FOO, text_value("two", 0x2))
            await trio.sleep(0.05)
            assert "two" not in out.getvalue()
            assert prompt.listens == {}
            tasks.cancel_scope.cancel()


async def test_quit_stops_at_once() -> None:
    async with open_node(port=0, host="127.0.0.1", host6=None) as node:
        stops = _Stops()
        out = io.StringIO()
        await Prompt(node, stops, stdin=io.StringIO("q\ng foo\n"), stdout=out).run()
        assert stops.count == 1
        assert not any(line.startswith("Get:") for line in _lines(out))


async def test_a_cancelled_prompt_abandons_its_blocked_read() -> None:
    """SIGTERM cancels the tree while the prompt waits for a line: the prompt ends, the program is not
    stopped a second time."""
    read_end, write_end = os.pipe()
    stdin = open(read_end, encoding="utf-8")  # noqa: SIM115 (closed once the abandoned read returns)
    async with open_node(port=0, host="127.0.0.1", host6=None) as node:
        stops = _Stops()
        with trio.fail_after(5), trio.move_on_after(0.3) as scope:
            await Prompt(node, stops, stdin=stdin, stdout=io.StringIO()).run()
        assert scope.cancelled_caught
        assert stops.count == 0
    os.close(write_end)  # the abandoned thread reads the end of input and returns
    await trio.sleep(0.1)
    stdin.close()


def test_the_flag() -> None:
    assert parse_args([]).interactive is False
    assert parse_args(["--interactive"]).interactive is True


def test_the_config_file_has_no_interactive_setting() -> None:
    loaded = parse_config("interactive = true\n", path=Path("/etc/trio-dht/config.toml"))
    assert loaded.problems == ("interactive: unknown key",)


async def test_permanent_put_and_its_cancel() -> None:
    async with open_node(port=0, host="127.0.0.1", host6=None) as node:
        out = io.StringIO()
        prompt = Prompt(node, _Stops(), stdin=io.StringIO(""), stdout=out)
        async with trio.open_nursery() as tasks:
            tasks.start_soon(prompt._write_queued)
            prompt.execute("pp foo kept", tasks)
            with trio.fail_after(5):
                while "Put: " not in out.getvalue():
                    await trio.sleep(0.01)
            value_id = _lines(out)[-1].rsplit(" ", 1)[1]
            prompt.execute(f"cpp {FOO.hex()} {value_id}", tasks)
            assert (await _shown(prompt, out))[-1].startswith("Put: success")  # nothing printed: cancelled
            prompt.execute(f"cpp {FOO.hex()} {value_id}", tasks)
            assert (await _shown(prompt, out))[-1] == f"No permanent put of value {value_id} on {FOO.hex()}"
            tasks.cancel_scope.cancel()


async def test_signing_needs_an_identity() -> None:
    async with open_node(port=0, host="127.0.0.1", host6=None) as node:
        out = io.StringIO()
        await Prompt(node, _Stops(), stdin=io.StringIO("s foo x\ne foo 00 x\n"), stdout=out).run()
        needed = "An identity is needed to sign or encrypt (-i, or --certificate and --privkey)"
        assert _lines(out).count(needed) == 2


async def test_bad_input_is_answered_and_the_prompt_goes_on() -> None:
    """Undecodable bytes, a token past int()'s digit limit, a line over the cap: each is one line of answer,
    and the node keeps running."""
    read_end, write_end = os.pipe()
    lines = b"p k \xff\xfe\ncl foo " + b"9" * 5000 + b"\n" + b"x" * 70_000 + b"\nll\n"
    async with open_node(port=0, host="127.0.0.1", host6=None) as node:
        stops = _Stops()
        out = io.StringIO()
        with open(read_end, encoding="utf-8") as stdin:  # the prompt reads its descriptor, not this reader
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(Prompt(node, stops, stdin=stdin, stdout=out).run))
                await trio.to_thread.run_sync(os.write, write_end, lines)
                os.close(write_end)
        shown = _lines(out)
        assert stops.count == 1  # by the end of input only
        assert any(line.startswith("Put: success") for line in shown)  # the bad bytes became U+FFFD
        assert any(line.startswith("Error: ") or line.startswith("Syntax error") for line in shown)
        assert f"Line over {MAX_LINE} bytes: ignored" in shown
        assert f"OpenDHT node {node.node_id.hex()} running on port {node.bound_port}" in shown[1:]


async def test_output_the_terminal_does_not_take_is_dropped_and_counted() -> None:
    async with open_node(port=0, host="127.0.0.1", host6=None) as node:
        prompt = Prompt(node, _Stops(), stdin=io.StringIO(""), stdout=io.StringIO())
        prompt.print(["x"] * MAX_QUEUED_LINES)
        prompt.print(["dropped", "too"])
        assert prompt.dropped_lines == 2 and len(prompt._queued) == MAX_QUEUED_LINES
        prompt._queued.clear()
        prompt.print(["next"])
        assert list(prompt._queued) == ["(2 lines not printed: the terminal was too slow)", "next"]
