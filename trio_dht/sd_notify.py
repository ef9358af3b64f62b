"""systemd's service notifications (``sd_notify``), with the standard library only.

Under a unit with ``Type=notify``, systemd names a Unix datagram socket in ``$NOTIFY_SOCKET`` (a path, or
``@name`` in Linux's abstract namespace) and waits for ``READY=1`` before it counts the service as started;
with ``WatchdogSec=`` it also sets ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, the process meant) and kills the
service when no ``WATCHDOG=1`` arrives within that time. Each message is one datagram of ``NAME=value``
lines.

The program sends ``READY=1`` (with ``STATUS=`` and ``MAINPID=``) once the node and the proxy serve,
``STATUS=`` lines when the node's peers change, ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC`` from a Trio
task (so a stuck event loop stops the pings and systemd restarts the service), and ``STOPPING=1`` when the
tree starts shutting down. Without ``$NOTIFY_SOCKET`` nothing is sent. ``READY=1`` is the one message that
must arrive (systemd stops a service that never sends it, after ``TimeoutStartSec=``, 90 s by default): a
``READY=1`` that could not be sent (the socket's queue full) is sent again every
:data:`READY_RETRY_EVERY` s, :data:`READY_ATTEMPTS` times at most.

:func:`read_environ` is the sans-IO core (what the environment asks for, and what in it is wrong);
:class:`SystemdNotifier` is the shell: a non-blocking socket, where a failed send is counted and logged
once, never fatal (systemd may be gone, or the socket's queue full).
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import trio

log = logging.getLogger(__name__)

READY_RETRY_EVERY = 0.5
"""Seconds between attempts to send a ``READY=1`` that failed."""
READY_ATTEMPTS = 180
"""Attempts at ``READY=1`` (180 x 0.5 s: systemd's default start timeout, 90 s)."""


@dataclass(frozen=True, slots=True)
class NotifySettings:
    """Where to send notifications, and how often to ping the watchdog."""

    address: str
    """The socket: a path, or ``"\\0name"`` for an abstract one (``@name`` in ``$NOTIFY_SOCKET``)."""
    watchdog_every: float | None = None
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``); None: no watchdog."""

    @property
    def name(self) -> str:
        """The socket as ``$NOTIFY_SOCKET`` names it (for log lines)."""
        return "@" + self.address[1:] if self.address.startswith("\0") else self.address


def read_environ(environ: Mapping[str, str], pid: int) -> tuple[NotifySettings | None, list[str]]:
    """What ``environ`` asks the process ``pid`` to send, and a line for each value that is ignored.

    No (or an empty) ``NOTIFY_SOCKET``: None, and nothing is wrong. A socket that is neither an absolute
    path nor ``@name`` is ignored (systemd sets only those). The watchdog is on when ``WATCHDOG_USEC`` is a
    positive integer and ``WATCHDOG_PID`` is unset or ``pid`` (another process's watchdog is not ours).
    """
    problems: list[str] = []
    value = environ.get("NOTIFY_SOCKET", "")
    if not value:
        return None, problems
    if value.startswith("@") and len(value) > 1:
        address = "\0" + value[1:]
    elif value.startswith("/"):
        address = value
    else:
        return None, [f"NOTIFY_SOCKET={value!r} is neither an absolute path nor @name: not notifying systemd"]
    if len(os.fsencode(address)) > 107:  # sun_path holds 108 bytes with the NUL
        return None, [f"NOTIFY_SOCKET={value!r} is longer than a Unix socket address: not notifying systemd"]
    return NotifySettings(address, _watchdog_every(environ, pid, problems)), problems


def _watchdog_every(environ: Mapping[str, str], pid: int, problems: list[str]) -> float | None:
    usec = environ.get("WATCHDOG_USEC")
    if usec is None:
        return None
    if not usec.isdecimal() or int(usec) == 0:
        problems.append(f"WATCHDOG_USEC={usec!r} is not a positive number of microseconds: no watchdog pings")
        return None
    watchdog_pid = environ.get("WATCHDOG_PID")
    if watchdog_pid is not None:
        if not watchdog_pid.isdecimal():
            problems.append(f"WATCHDOG_PID={watchdog_pid!r} is not a process id: no watchdog pings")
            return None
        if int(watchdog_pid) != pid:
            return None  # a parent's watchdog, inherited
    return int(usec) / 1e6 / 2


def message(**fields: object) -> bytes:
    """A notification: ``NAME=value`` lines (a value's newlines become spaces: one line each)."""
    return "\n".join(f"{name}={' '.join(str(value).splitlines())}" for name, value in fields.items()).encode()


class SystemdNotifier:
    """Sends notifications to ``settings.address``. Create it with :meth:`from_environ`; :meth:`run` is its
    task (watchdog pings, and ``STOPPING=1`` when it is cancelled)."""

    def __init__(self, settings: NotifySettings) -> None:
        self.settings = settings
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # not inherited (PEP 446)
        self._socket.setblocking(False)
        self.sent = 0
        self.errors = 0
        """Sends that failed (the first one logged)."""
        self._status: str | None = None
        self._ready_attempts = 0
        """Attempts at a ``READY=1`` not yet sent (0: none pending)."""
        self._wake = trio.Event()
        """Set by :meth:`ready`: :meth:`run` sees whether a ``READY=1`` is pending."""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier | None:
        """A notifier for ``environ`` (default ``os.environ``); None without ``$NOTIFY_SOCKET``. What is
        wrong in it is logged, one line each."""
        settings, problems = read_environ(os.environ if environ is None else environ, os.getpid())
        for problem in problems:
            log.warning("%s", problem)
        return cls(settings) if settings is not None else None

    def send(self, data: bytes) -> bool:
        """Send one notification now; False if it could not be (counted, the first failure logged)."""
        try:
            self._socket.sendto(data, self.settings.address)
        except OSError as exc:
            self.errors += 1
            if self.errors == 1:
                log.warning("cannot notify systemd through %s: %s (further failures not logged)",
                            self.settings.name, exc)  # fmt: skip
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> None:
        """The service is up: ``READY=1``, its ``STATUS=`` and ``MAINPID=`` (this process). If it cannot be
        sent now, :meth:`run` sends it again (see :data:`READY_ATTEMPTS`)."""
        self._status = status
        self._ready_attempts = 0
        self._send_ready()
        self._wake.set()

    def _send_ready(self) -> None:
        self._ready_attempts += 1
        if self.send(message(READY=1, STATUS=self._status, MAINPID=os.getpid())):
            self._ready_attempts = 0  # sent: nothing pending
        elif self._ready_attempts >= READY_ATTEMPTS:
            log.error("gave up notifying systemd that the service is ready after %d attempts", READY_ATTEMPTS)
            self._ready_attempts = 0

    @property
    def ready_pending(self) -> bool:
        """A ``READY=1`` is still to be sent."""
        return self._ready_attempts > 0

    def status(self, status: str) -> None:
        """``STATUS=status``, if it differs from the last one sent (a pending ``READY=1`` carries it)."""
        if status != self._status:
            self._status = status
            if not self.ready_pending:
                self.send(message(STATUS=status))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ping the watchdog every ``settings.watchdog_every`` seconds, and send a pending ``READY=1`` again,
        until cancelled (from this task, so that the pings stop when the event loop does); then send
        ``STOPPING=1`` and close the socket."""
        every = self.settings.watchdog_every
        if every is not None:
            log.info("pinging systemd's watchdog every %g s", every)
        task_status.started()
        next_ping = trio.current_time() + every if every is not None else math.inf
        retry_at = math.inf  # kept across wake-ups: watchdog pings do not put a retry off
        try:
            while True:
                if not self.ready_pending:
                    retry_at = math.inf
                elif retry_at == math.inf:
                    retry_at = trio.current_time() + READY_RETRY_EVERY
                with trio.move_on_at(min(next_ping, retry_at)):
                    await self._wake.wait()
                self._wake = trio.Event()
                now = trio.current_time()
                if self.ready_pending and now >= retry_at:
                    self._send_ready()
                    retry_at = math.inf
                if every is not None and now >= next_ping:
                    self.send(message(WATCHDOG=1))
                    next_ping = now + every
        finally:
            self.send(message(STOPPING=1, STATUS="stopping"))
            self._socket.close()
