"""Test helper: Debian's ``chromium``, headless, driven over the Chrome DevTools Protocol on a pipe.

``chromium --remote-debugging-pipe`` reads CDP requests on its fd 3 and writes replies and events on its
fd 4, each message a JSON object followed by a NUL byte: no port, no websocket, only the standard library.
:func:`open_page` starts a browser with a fresh profile, opens one page (a target attached in flat mode, so
its messages carry a ``sessionId``) with the Runtime, Log and Page domains on, and collects what a page
reports as an error: console calls of type ``error`` or ``assert``, uncaught exceptions, and log entries
of level ``error`` (failed loads, Content-Security-Policy violations). It yields once the page has loaded.
Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

REPLY_TIMEOUT = 30.0
"""Seconds a CDP request may wait for its reply (a busy machine starts a browser slowly)."""


def chromium_path() -> str | None:
    """The ``chromium`` program (``$CHROMIUM`` overrides), or None."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium")


MISSING = "Debian's chromium is not installed (apt-get install chromium)"


def _ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


needs_chromium = pytest.mark.skipif(chromium_path() is None and not _ci(), reason=MISSING)
"""Marks a browser test: skipped with the reason when ``chromium`` is missing, except with ``CI=true``,
where the test runs and :func:`require_chromium` fails it."""


def require_chromium() -> str:
    """The ``chromium`` program; skips the test without it, or fails it with ``CI=true`` (CI installs it)."""
    path = chromium_path()
    if path is None:
        if _ci():
            pytest.fail(f"{MISSING} (CI=true: the browser test must run)", pytrace=False)
        pytest.skip(MISSING)
    return path


class BrowserGone(Exception):
    """The browser closed its end of the pipe before replying."""


@dataclass
class ConsoleError:
    """Something the page reported as an error."""

    kind: str
    """``console`` (console.error or console.assert), ``exception`` or ``log`` (a log entry)."""
    source: str
    """A log entry's source (``network``, ``security``, ``javascript``, ...); ``javascript`` otherwise."""
    text: str


@dataclass
class Page:
    """One page of a headless Chromium, over CDP."""

    _send: trio.abc.SendStream
    _stderr: Path
    session: str = ""
    errors: list[ConsoleError] = field(default_factory=list)
    """What the page reported as an error so far."""
    loaded: trio.Event = field(default_factory=trio.Event)
    """Set when the page's load event fired (``Page.loadEventFired``)."""
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = field(default_factory=dict)

    async def call(self, method: str, params: dict[str, Any] | None = None, *, browser: bool = False) -> Any:
        """Send a CDP request (to the page's session, or to the browser) and return its ``result``."""
        message: dict[str, Any] = {"id": next(self._ids), "method": method, "params": params or {}}
        if not browser:
            message["sessionId"] = self.session
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[message["id"]] = send
        await self._send.send_all(json.dumps(message).encode() + b"\0")
        with trio.move_on_after(REPLY_TIMEOUT):
            try:
                reply = await receive.receive()
            except trio.EndOfChannel:
                raise BrowserGone(
                    f"{method}: chromium closed its pipe; it said:\n{self.stderr_tail()}"
                ) from None
            if "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            return reply.get("result", {})
        raise AssertionError(
            f"no reply to {method} in {REPLY_TIMEOUT} s; chromium said:\n{self.stderr_tail()}"
        )

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able); raises if it throws."""
        result = await self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def stderr_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self._stderr.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _event(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Page.loadEventFired":
            self.loaded.set()
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(
                str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", [])
            )
            self.errors.append(ConsoleError("console", "javascript", text))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.errors.append(ConsoleError("exception", "javascript", text))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.errors.append(
                ConsoleError("log", entry.get("source", ""), f"{entry.get('text')} {entry.get('url', '')}")
            )

    async def _read(self, stream: trio.abc.ReceiveStream) -> None:
        pending = b""
        async for chunk in stream:
            pending += chunk
            *messages, pending = pending.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                waiting = self._waiting.pop(message.get("id"), None) if "id" in message else None
                if waiting is not None:
                    waiting.send_nowait(message)
                elif "method" in message:
                    self._event(message)
        for waiting in self._waiting.values():  # the browser is gone: no reply will come
            waiting.close()


_LAUNCH = """
import os, sys
for fd, target in ((int(sys.argv[1]), 3), (int(sys.argv[2]), 4)):
    os.dup2(fd, target)
    os.close(fd)
os.execv(sys.argv[3], sys.argv[3:])
"""
"""Run by ``python -c``: argv[1] on fd 3, argv[2] on fd 4, then exec argv[3:]."""


def _high_fd(fd: int) -> int:
    """A copy of ``fd`` at 10 or above (clear of 3 and 4, which the launcher sets), without close-on-exec;
    ``fd`` is closed."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


@asynccontextmanager
async def open_page(url: str) -> AsyncIterator[Page]:
    """A headless Chromium with a fresh profile, showing ``url``; closed (killed if it lingers) on exit."""
    program = require_chromium()
    with tempfile.TemporaryDirectory(prefix="trio-dht-chromium-") as tmp:
        flags = [
            "--headless=new",
            "--remote-debugging-pipe",
            f"--user-data-dir={tmp}/profile",
            "--no-first-run",
            "--no-default-browser-check",
            "--no-proxy-server",
            "--disable-gpu",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--mute-audio",
        ]
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        to_browser, from_page = os.pipe()
        from_browser, to_page = os.pipe()
        child_in, child_out = _high_fd(to_browser), _high_fd(to_page)
        # A small launcher puts the pipe's ends on the fds Chromium reads and writes CDP on (3 and 4).
        launcher = [sys.executable, "-c", _LAUNCH, str(child_in), str(child_out), program]
        stderr_path = Path(tmp) / "stderr"
        with stderr_path.open("wb") as stderr:
            try:
                process = await trio.lowlevel.open_process(
                    [*launcher, *flags, "about:blank"],
                    stdin=subprocess.DEVNULL,
                    stdout=stderr,
                    stderr=stderr,
                    pass_fds=(child_in, child_out),
                    start_new_session=True,
                )
            finally:
                os.close(child_in)
                os.close(child_out)
        send = trio.lowlevel.FdStream(from_page)
        receive = trio.lowlevel.FdStream(from_browser)
        page = Page(send, stderr_path)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(page._read, receive)
                target = await page.call("Target.createTarget", {"url": "about:blank"}, browser=True)
                attached = await page.call(
                    "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, browser=True
                )
                page.session = attached["sessionId"]
                for domain in ("Runtime", "Log", "Page"):
                    await page.call(f"{domain}.enable")
                page.loaded = trio.Event()
                await page.call("Page.navigate", {"url": url})
                with trio.move_on_after(REPLY_TIMEOUT):
                    await page.loaded.wait()
                if not page.loaded.is_set():
                    raise AssertionError(
                        f"{url} did not load in {REPLY_TIMEOUT} s; chromium said:\n{page.stderr_tail()}"
                    )
                yield page
                with trio.move_on_after(5), contextlib.suppress(BrowserGone):
                    await page.call("Browser.close", browser=True)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(5):
                    await process.wait()
                if process.returncode is None:
                    os.killpg(process.pid, signal.SIGKILL)  # the launcher and the browser's processes
                    await process.wait()
                await send.aclose()
                await receive.aclose()
