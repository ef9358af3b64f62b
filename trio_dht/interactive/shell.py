"""The interactive prompt's Trio shell: reads lines, runs dhtnode's commands on the running node, prints.

Lines are read in a worker thread (``input()``, with the standard library's ``readline`` for history and
line editing when stdin is a terminal; ``stdin.readline()`` otherwise, and no prompt). A command that
answers at once (``ll``, ``ld``, ``ls``, ``l``, ``cl``...) is run before the next line is read; ``g`` and
the puts run as tasks of the prompt's nursery, and their lines come when the node answers, like a listen's.

Output that comes while a line is being read (a get's result, a listen's value) is written over the prompt
line on a terminal: the line is cleared, the output written, then the prompt and what was typed so far are
written again (``readline.get_line_buffer``), so the output does not split the line being typed. The
program's log lines, when they go to the same terminal (stderr, no ``-l FILE``), go the same way while the
prompt runs.

Output never blocks the node: :meth:`Prompt.print` queues lines (at most :data:`MAX_QUEUED_LINES`; past it
lines are dropped and counted, and the count is printed when there is room), and one task writes them from a
worker thread. A terminal that stops reading (Ctrl-S, a stalled SSH session, a paused pager) then holds up the
output only, never the node: a listen prints what peers store, at their rate. ``readline.get_line_buffer`` is
read from that thread while ``input()`` edits the line in the other; CPython gives no lock for it, so a redraw
may show a line being edited as it was a moment before.

Input: on a terminal, ``input()``; otherwise ``os.read`` on stdin's descriptor (no buffered reader, whose lock
a thread abandoned in it would hold at exit), split into lines of at most :data:`MAX_LINE` bytes (a longer
one is ignored, with a line saying so), decoded as UTF-8 with replacement. Whatever a command raises is
printed and the prompt goes on: nothing typed can stop the node but ``x``.

A thread blocked in ``input()`` cannot be interrupted: when the program stops for another reason than the
prompt (SIGINT, SIGTERM, a failure), the read is abandoned (``abandon_on_cancel``; the thread is a daemon
that dies with the process) and the terminal's settings, which readline changes while it reads, are put
back as they were when the prompt started. ``x``, ``q``, ``quit`` and end of input (Ctrl-D) stop the
program as SIGTERM does; at end of input the gets and puts still running are waited for first, so that
``trio-dht --interactive < commands`` prints their results.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any

import trio

from trio_dht.api import NoIdentity, RecipientNotFound, ValueEvent
from trio_dht.cli import format_host_port
from trio_dht.infohash import InfoHash
from trio_dht.interactive.commands import (
    HELP,
    ONE_SHOT,
    Command,
    CommandError,
    KeyStorage,
    Op,
    RoutingBucket,
    RoutingNode,
    SearchSummary,
    addresses,
    banner,
    get_done,
    get_found,
    listen_found,
    listening,
    node_info,
    parse,
    put_done,
    routing_log,
    searches_log,
    storage_log,
    text_value,
    using_line,
)
from trio_dht.value import random_value_id

if TYPE_CHECKING:
    from trio_dht.api import ListenHandle
    from trio_dht.node import DhtNode

log = logging.getLogger(__name__)

PROMPT = ">> "
_CLEAR_LINE = "\r\x1b[K"
MAX_QUEUED_LINES = 10_000
"""Lines waiting for the terminal at most; more are dropped (and counted)."""
MAX_LINE = 64 * 1024
"""The longest line of input taken, in bytes."""
TOO_LONG = "\x00too long"
"""What :meth:`Prompt._read_line` returns for a line over :data:`MAX_LINE` (a NUL cannot be typed)."""
_CLOSE_TIMEOUT = 2.0
"""Seconds the last lines get to reach the terminal when the prompt ends."""


class Prompt:
    """dhtnode's prompt over ``node``; ``stop`` stops the program (as SIGTERM does)."""

    def __init__(
        self,
        node: DhtNode,
        stop: Callable[[], None],
        *,
        stdin: IO[str] | None = None,
        stdout: IO[str] | None = None,
    ) -> None:
        self.node = node
        self.stop = stop
        self.stdin = stdin if stdin is not None else sys.stdin
        self.stdout = stdout if stdout is not None else sys.stdout
        self.terminal = _is_terminal(self.stdin) and _is_terminal(self.stdout)
        self.readline: Any = None
        self.listens: dict[int, tuple[InfoHash, ListenHandle]] = {}
        self._next_token = 1
        self._reading = False
        self._running = 0  # gets and puts in progress
        self._idle = trio.Event()
        self._queued: deque[str] = deque()
        self._queued_wake = trio.Event()
        self._queue_emptied = trio.Event()
        self.dropped_lines = 0
        """Lines dropped because the terminal did not take them fast enough."""
        self._unreported_drops = 0
        self._fd = _fileno(self.stdin) if not self.terminal else None
        self._input = b""

    # -- the loop -------------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Print the banner, then read and run commands until one quits or input ends."""
        with self._terminal_kept(), contextlib.ExitStack() as listens:
            listens.callback(self._write_left)
            listens.callback(self._cancel_listens)
            async with trio.open_nursery() as output:
                output.start_soon(self._write_queued)
                self._write(banner(self.node.node_id, self.node.bound_port))  # before the first prompt
                task_status.started()
                async with trio.open_nursery() as tasks:
                    while True:
                        await self._written()  # a command's answer before the next prompt, as dhtnode
                        line = await trio.to_thread.run_sync(self._read_line, abandon_on_cancel=True)
                        if line is None:  # end of input: what runs ends first
                            while self._running:
                                await self._idle.wait()
                            break
                        if line == TOO_LONG:
                            self.print([f"Line over {MAX_LINE} bytes: ignored"])
                        elif self.execute(line, tasks) is Op.QUIT:
                            tasks.cancel_scope.cancel()
                            break
                self.print(["", "Stopping node..."])
                with trio.move_on_after(_CLOSE_TIMEOUT):
                    await self._written()
                output.cancel_scope.cancel()
        self.stop()

    def execute(self, line: str, tasks: trio.Nursery) -> Op | None:
        """Run the command on ``line``: at once, or as a task in ``tasks``; its op, or None. What it raises is
        printed: the prompt goes on."""
        try:
            command = parse(line)
        except CommandError as exc:
            self.print(str(exc).split("\n"))
            return None
        except Exception as exc:  # e.g. a key that is no text (surrogates from undecodable input)
            self.print([f"Error: {exc}"])
            return None
        if command is None:
            return None
        using = using_line(command)
        if using is not None:
            self.print([using])
        if command.op in ONE_SHOT:
            self._running += 1
            tasks.start_soon(self._one_shot, command)
            return command.op
        try:
            self._at_once(command)
        except Exception as exc:
            log.debug("%s failed", line, exc_info=True)
            self.print([f"Error: {exc!r}"])
        return command.op

    def _at_once(self, command: Command) -> None:
        node, op = self.node, command.op
        if op is Op.HELP:
            self.print(HELP.splitlines())
        elif op is Op.INFO:
            ongoing = len(node.searches.rounds) + len(node.listens.by_key)
            self.print(node_info(node.info(), ongoing))
        elif op is Op.STORAGE:
            self.print(storage_log(self._storage(command.key)))
        elif op is Op.SEARCHES:
            self.print(searches_log(self._searches(command.key)))
        elif op is Op.ADDRESSES:
            public = node.public_address
            self.print(addresses([format_host_port(*public)] if public is not None else []))
        elif op is Op.ROUTING:
            for v6, family in ((False, "IPv4"), (True, "IPv6")):
                self.print(routing_log(family, self._routing(v6)))
        elif op is Op.LISTEN:
            self._listen(command)
        elif op is Op.CANCEL_LISTEN:
            entry = self.listens.get(command.number)
            if entry is None or entry[0] != command.key:
                self.print([f"No listen with token {command.number} on {command.key}"])
            else:
                del self.listens[command.number]
                entry[1].cancel()
        elif op is Op.CANCEL_PUT:
            assert command.key is not None
            if not node.cancel_put(command.key, command.number):
                self.print([f"No permanent put of value {command.number:x} on {command.key}"])

    # -- commands -------------------------------------------------------------------------------------------

    def _listen(self, command: Command) -> None:
        assert command.key is not None
        total = 0

        def on_event(event: ValueEvent) -> None:
            nonlocal total
            total += 1
            self.print(listen_found([event.value], event.expired, total))

        token, self._next_token = self._next_token, self._next_token + 1
        self.listens[token] = (command.key, self.node.add_listener(command.key, on_event))
        self.print([listening(token)])

    async def _one_shot(self, command: Command) -> None:
        try:
            if command.op is Op.GET:
                await self._get(command)
            else:
                await self._put(command)
        except Exception as exc:  # the prompt goes on
            log.debug("%s failed", command.op, exc_info=True)
            self.print([f"Error: {exc!r}"])
        finally:
            self._running -= 1
            if not self._running:
                self._idle.set()
                self._idle = trio.Event()

    async def _get(self, command: Command) -> None:
        assert command.key is not None
        start = time.perf_counter()
        total = 0

        def on_values(values: list[Any]) -> None:
            nonlocal total
            total += len(values)
            self.print(get_found(values, time.perf_counter() - start, total))

        ok = True
        try:
            await self.node.get(command.key, on_values=on_values)
        except Exception as exc:  # the prompt goes on; the failure is the answer
            log.debug("get %s failed: %r", command.key, exc)
            ok = False
        self.print([get_done(ok, time.perf_counter() - start, total)])

    async def _put(self, command: Command) -> None:
        assert command.key is not None
        node, op = self.node, command.op
        value = text_value(command.text, random_value_id())
        start = time.perf_counter()
        what = {Op.PUT_SIGNED: "Put signed", Op.PUT_ENCRYPTED: "Put encrypted"}.get(op, "Put")
        try:
            if op is Op.PUT_SIGNED:
                ok = await node.put_signed(command.key, value)
            elif op is Op.PUT_ENCRYPTED:
                ok = await node.put_encrypted(command.key, value, bytes.fromhex(command.to))
            else:
                ok = await node.put(command.key, value, permanent=op is Op.PUT_PERMANENT)
        except NoIdentity:
            self.print(["An identity is needed to sign or encrypt (-i, or --certificate and --privkey)"])
            return
        except (RecipientNotFound, ValueError) as exc:
            self.print([f"{what}: failure ({exc})"])
            return
        except Exception as exc:  # the prompt goes on; the failure is the answer
            log.debug("put on %s failed: %r", command.key, exc)
            ok = False
        self.print([put_done(ok, time.perf_counter() - start, value.id, what)])

    def _storage(self, only: InfoHash | None) -> list[KeyStorage]:
        by_key: dict[InfoHash, list[tuple[Any, int]]] = {}
        for key, stored in self.node.storage.items():
            if only is None or key == only:
                by_key.setdefault(key, []).append((stored.value, stored.size))
        listeners = self.node.remote_listeners
        return [KeyStorage(key, values, len(listeners.for_key(key))) for key, values in by_key.items()]

    def _searches(self, only: InfoHash | None) -> list[SearchSummary]:
        getting = {key for key, _ in self.node.searches.rounds}
        listened = self.node.listens.by_key
        summaries = []
        for key in sorted(getting | set(listened)):
            if only is not None and key != only:
                continue
            key_listen = listened.get(key)
            nodes: tuple[str, ...] = ()
            count = 0
            if key_listen is not None:
                count = len(key_listen.listeners)
                nodes = tuple(format_host_port(*t.node.addr) for t in key_listen.targets.values())
            summaries.append(SearchSummary(key, key in getting, count, nodes))
        return summaries

    def _routing(self, v6: bool) -> list[RoutingBucket]:
        now = trio.current_time()
        table = self.node.tables.get(v6)
        if table is None:
            return []
        return [
            RoutingBucket(
                InfoHash.from_int(bucket.first),
                now - bucket.last_changed,
                [
                    RoutingNode(
                        node.id,
                        format_host_port(*node.addr),
                        now - node.last_heard,
                        "good" if node.is_good(now) else "expired" if node.expired else "dubious",
                    )
                    for node in bucket.nodes
                ],
            )
            for bucket in table.buckets
        ]

    def _cancel_listens(self) -> None:
        for _, handle in self.listens.values():
            handle.cancel()
        self.listens.clear()

    # -- the terminal ---------------------------------------------------------------------------------------

    def _read_line(self) -> str | None:
        """One line of input (in a worker thread); None at end of input, :data:`TOO_LONG` for a line over
        :data:`MAX_LINE` bytes."""
        if not self.terminal:
            if self._fd is None:  # a stream without a descriptor (tests)
                line = self.stdin.readline(MAX_LINE + 1)
                if len(line.encode("utf-8", "replace")) > MAX_LINE:
                    return TOO_LONG
                return line.rstrip("\n") if line else None
            return self._read_fd_line(self._fd)
        self._reading = True  # from here on, output is written above the prompt that input() writes
        try:
            return input(PROMPT)
        except EOFError:
            return None
        finally:
            self._reading = False

    def _read_fd_line(self, fd: int) -> str | None:
        skipping = False
        while True:
            end = self._input.find(b"\n")
            if end >= 0:
                line, self._input = self._input[:end], self._input[end + 1 :]
                return TOO_LONG if skipping or len(line) > MAX_LINE else line.decode("utf-8", "replace")
            if len(self._input) > MAX_LINE:
                self._input, skipping = b"", True
            chunk = os.read(fd, 65536)
            if not chunk:
                line, self._input = self._input, b""
                if skipping:
                    return TOO_LONG
                return line.decode("utf-8", "replace") if line else None
            self._input += chunk

    def print(self, lines: list[str]) -> None:
        """Queue ``lines`` for the terminal (see the module's doc); past :data:`MAX_QUEUED_LINES` waiting,
        they are dropped and counted."""
        if len(self._queued) + len(lines) > MAX_QUEUED_LINES:
            self.dropped_lines += len(lines)
            self._unreported_drops += len(lines)
            return
        if self._unreported_drops:
            self._queued.append(f"({self._unreported_drops} lines not printed: the terminal was too slow)")
            self._unreported_drops = 0
        self._queued.extend(lines)
        self._queued_wake.set()

    def _write_left(self) -> None:
        """Write what is still queued, now (the prompt ends, perhaps cancelled: a few lines at most, such as
        the log line of the signal that stops the program)."""
        lines, self._queued = list(self._queued), deque()
        if lines:
            with contextlib.suppress(OSError):
                self._write(lines)

    async def _written(self) -> None:
        """Wait until every queued line is written."""
        while self._queued:
            await self._queue_emptied.wait()

    async def _write_queued(self) -> None:
        """Write the queued lines, all that wait at once, from a worker thread."""
        while True:
            await self._queued_wake.wait()
            self._queued_wake = trio.Event()
            while self._queued:
                lines = list(self._queued)
                try:
                    await trio.to_thread.run_sync(self._write, lines, abandon_on_cancel=True)
                except OSError as exc:  # the terminal is gone: nothing more can be shown
                    log.debug("the prompt's output failed: %r", exc)
                    self._queued.clear()
                    return
                for _ in lines:
                    self._queued.popleft()
            self._queue_emptied.set()
            self._queue_emptied = trio.Event()

    def _write(self, lines: list[str]) -> None:
        """Write ``lines`` now (in a worker thread); on a terminal where a line is being typed, above it."""
        text = "".join(line + "\n" for line in lines)
        if self.terminal and self._reading:
            typed = self.readline.get_line_buffer() if self.readline is not None else ""
            text = f"{_CLEAR_LINE}{text}{PROMPT}{typed}"
        try:
            self.stdout.write(text)
        except UnicodeEncodeError:  # a terminal whose encoding cannot show a peer's text
            self.stdout.write(text.encode("ascii", "backslashreplace").decode("ascii"))
        self.stdout.flush()

    @contextlib.contextmanager
    def _terminal_kept(self) -> Iterator[None]:
        """Load readline on a terminal, and put the terminal's settings back on the way out."""
        if not self.terminal:
            yield
            return
        with contextlib.suppress(ImportError):  # a Python built without readline: plain input()
            import readline

            self.readline = readline
        saved = None
        with contextlib.suppress(ImportError, OSError):
            import termios

            saved = termios.tcgetattr(self.stdin.fileno())
        moved = _log_handlers_on(self.stdout)
        for handler in moved:
            handler.setStream(_AbovePrompt(self))
        try:
            yield
        finally:
            for handler in moved:
                handler.setStream(sys.stderr)
            if saved is not None:
                with contextlib.suppress(OSError):
                    termios.tcsetattr(self.stdin.fileno(), termios.TCSADRAIN, saved)


def _fileno(stream: IO[str]) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, ValueError, OSError):
        return None


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _AbovePrompt(io.TextIOBase):
    """A log handler's stream while the prompt runs: whole lines, written as the prompt writes its output."""

    def __init__(self, prompt: Prompt) -> None:
        self.prompt = prompt
        self.partial = ""

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text).split("\n")
        if lines:
            self.prompt.print(lines)
        return len(text)


def _log_handlers_on(terminal: IO[str]) -> list[logging.StreamHandler[Any]]:
    """The program's log handlers that write to stderr when stderr is ``terminal``'s terminal."""
    try:
        same = sys.stderr.isatty() and os.ttyname(sys.stderr.fileno()) == os.ttyname(terminal.fileno())
    except (AttributeError, ValueError, OSError):
        same = False
    if not same:
        return []
    handlers = [getattr(h, "inner", h) for h in logging.getLogger().handlers]  # logs.RateLimitedHandler
    return [h for h in handlers if type(h) is logging.StreamHandler and h.stream is sys.stderr]
