"""Plumbing shared by the peer drivers: child processes on pipes, free ports, availability checks.

A driver runs its peer with :func:`open_child`, which owns the process for the length of an
``async with`` block: stdout chunks go to a callback (:class:`LineSplitter` makes lines), stderr
is kept as a short tail for error messages, and on exit the driver's graceful ``stop`` runs first
(bounded), then the process is killed if it is still there. The process and its pumps are
shielded from the caller's cancellation until then, so cleanup still reaches a live peer.
Nothing outlives the block.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Any, Literal

import pytest
import trio

#: Seconds a child gets to stop on its own before it is killed.
STOP_GRACE = 5.0


class PeerError(RuntimeError):
    """A real peer failed, timed out or exited; the message ends with the tail of its output."""


class PeerUnavailable(PeerError):
    """The peer's program or package is not installed."""


def _ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def skip_or_fail(reason: str) -> None:
    """Skip the current test, or fail it when ``CI=true`` (a CI run must not silently lose interop)."""
    if _ci():
        pytest.fail(f"{reason} (CI=true: missing interop peers are an error)", pytrace=False)
    pytest.skip(reason)


def opendht_available() -> bool:
    """True if the PyPI ``opendht`` bindings are importable by this interpreter."""
    return importlib.util.find_spec("opendht") is not None


def dhtnode_path() -> str | None:
    """Path of the ``dhtnode`` program (``$DHTNODE`` overrides), or None if it is not executable."""
    path = os.environ.get("DHTNODE") or shutil.which("dhtnode")
    return path if path and os.access(path, os.X_OK) else None


#: Marks a test that needs PyPI opendht: skipped with a clear reason when it is missing, except
#: with ``CI=true``, where the test runs and :func:`require_opendht` fails it.
needs_opendht = pytest.mark.skipif(
    not opendht_available() and not _ci(), reason="PyPI opendht is not installed (pip install opendht==4.4.2)"
)
#: Marks a test that needs Debian's dhtnode (see :data:`needs_opendht`).
needs_dhtnode = pytest.mark.skipif(
    dhtnode_path() is None and not _ci(), reason="dhtnode is not installed (apt-get install dhtnode)"
)


def require_opendht() -> None:
    """Skip (or fail under CI) the current test unless ``opendht`` is installed."""
    if not opendht_available():
        skip_or_fail("PyPI opendht is not installed (pip install opendht==4.4.2)")


def require_dhtnode() -> None:
    """Skip (or fail under CI) the current test unless Debian's ``dhtnode`` is installed."""
    if dhtnode_path() is None:
        skip_or_fail("dhtnode is not installed (apt-get install dhtnode)")


def free_port(kind: Literal["udp", "tcp", "both"] = "udp", host: str = "127.0.0.1") -> int:
    """A port the kernel just gave out on ``host``; with ``"both"``, free for UDP and TCP at once.

    The port is released before it is returned, so another program may take it first: prefer
    port 0 where a peer can report what it bound, and retry a start that fails to bind.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kinds = {"udp": [socket.SOCK_DGRAM], "tcp": [socket.SOCK_STREAM]}
    types = kinds.get(kind, [socket.SOCK_DGRAM, socket.SOCK_STREAM])
    for _ in range(50):
        with socket.socket(family, types[0]) as first:
            first.bind((host, 0))
            port = first.getsockname()[1]
            others_free = True
            for other_type in types[1:]:
                with socket.socket(family, other_type) as other:
                    try:
                        other.bind((host, port))
                    except OSError:
                        others_free = False
            if others_free:
                return port
    raise PeerError(f"no free {kind} port on {host} after 50 tries")


@contextmanager
def single_error() -> Iterator[None]:
    """Re-raise the lone exception of a nursery's ExceptionGroup, so callers see the body's own error."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1 and not isinstance(group.exceptions[0], BaseExceptionGroup):
            raise group.exceptions[0] from None
        raise


class Child:
    """A running peer process: line-oriented stdin, the tail of its output, and its exit."""

    def __init__(self, process: trio.Process, name: str) -> None:
        self.process = process
        self.name = name
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self._send_lock = trio.Lock()

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def error(self, what: str) -> PeerError:
        """A :class:`PeerError` about ``what``, carrying the exit status and last output lines."""
        status = "running" if self.running else f"exited with {self.process.returncode}"
        tail = "\n".join(self.tail) or "(no output)"
        return PeerError(
            f"{self.name} (pid {self.process.pid}, {status}): {what}\n--- last output ---\n{tail}"
        )

    async def send_line(self, text: str) -> None:
        """Write one line to the child's stdin."""
        assert self.process.stdin is not None
        async with self._send_lock:
            try:
                await self.process.stdin.send_all(text.encode() + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise self.error(f"stdin closed while sending {text[:80]!r}") from exc

    async def close_stdin(self) -> None:
        """Send EOF on stdin (idempotent)."""
        assert self.process.stdin is not None
        async with self._send_lock:
            await self.process.stdin.aclose()

    async def wait_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the child to exit; True if it did."""
        with trio.move_on_after(timeout):
            await self.process.wait()
        return not self.running


class LineSplitter:
    """Turns stdout chunks into text lines for ``on_line``, then calls ``on_eof`` at the end."""

    def __init__(
        self,
        on_line: Callable[[str], None],
        on_eof: Callable[[], None],
        tail: collections.deque[str] | None = None,
    ) -> None:
        self._on_line = on_line
        self._on_eof = on_eof
        self._tail = tail
        self._buffer = b""

    def feed(self, chunk: bytes) -> None:
        """Take one chunk; ``b""`` means end of stream."""
        if chunk:
            self._buffer += chunk
            *lines, self._buffer = self._buffer.split(b"\n")
        else:
            lines, self._buffer = ([self._buffer] if self._buffer else []), b""
        for raw in lines:
            line = raw.decode("utf-8", errors="replace").rstrip("\r")
            if self._tail is not None:
                self._tail.append(line[:300])
            self._on_line(line)
        if not chunk:
            self._on_eof()


async def _pump(stream: trio.abc.ReceiveStream, on_chunk: Callable[[bytes], None]) -> None:
    """Hand every chunk of ``stream`` to ``on_chunk``, then ``b""`` at EOF."""
    while True:
        try:
            chunk = await stream.receive_some(1 << 16)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            chunk = b""
        on_chunk(chunk)
        if not chunk:
            return


async def _kill(process: trio.Process) -> None:
    process.kill()


@asynccontextmanager
async def open_child(
    command: list[str],
    *,
    name: str,
    on_stdout: Callable[[bytes], None],
    stop: Callable[[Child], Awaitable[None]],
    merge_stderr: bool = False,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Child]:
    """Run ``command`` for the length of the block.

    ``on_stdout`` gets every chunk of stdout (stderr too with ``merge_stderr``), then ``b""``
    at EOF (see :class:`LineSplitter`); otherwise stderr is kept as ``child.tail``. On exit
    ``stop(child)`` asks the program to quit (bounded by :data:`STOP_GRACE`, shielded from
    cancellation); a child still running afterwards is killed.
    """
    # The process and its output pumps run shielded: when the caller is cancelled, its cleanup
    # (cancel a listen, say goodbye) still reaches a live peer. They stop when we cancel them.
    scopes: list[trio.CancelScope] = []

    async def shielded(
        function: Callable[..., Awaitable[object]], *args: object, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.CancelScope(shield=True) as scope:
            scopes.append(scope)
            if task_status is trio.TASK_STATUS_IGNORED:
                await function(*args)
            else:
                await function(*args, task_status=task_status)

    with single_error():
        async with trio.open_nursery() as nursery:
            run = partial(
                trio.run_process,
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                check=False,
                deliver_cancel=_kill,
                env=env,
            )
            process: trio.Process = await nursery.start(shielded, run)
            child = Child(process, name)
            assert process.stdout is not None
            nursery.start_soon(shielded, _pump, process.stdout, on_stdout)
            if not merge_stderr:
                assert process.stderr is not None
                stderr_lines = LineSplitter(lambda _line: None, lambda: None, child.tail)
                nursery.start_soon(shielded, _pump, process.stderr, stderr_lines.feed)
            try:
                yield child
            finally:
                with trio.CancelScope(shield=True):
                    if child.running:
                        with trio.move_on_after(STOP_GRACE):
                            await stop(child)
                    if not await child.wait_exit(STOP_GRACE):
                        process.kill()
                        await child.wait_exit(STOP_GRACE)
                # Output pumps may still hold pipes inherited by grandchildren: do not wait for them.
                for scope in scopes:
                    scope.cancel()


async def poll_until(predicate, timeout: float, step: float = 0.1):
    """Await ``predicate()`` until it returns something truthy; return that (TooSlowError on timeout)."""
    with trio.fail_after(timeout):
        while True:
            result = await predicate()
            if result:
                return result
            await trio.sleep(step)
