"""Proxy state on disk (``-f/--persist PATH``): push subscriptions and permanent puts, in SQLite.

Every change is written when it happens, in its own transaction, before the HTTP reply acknowledges it; the
database runs in WAL mode with ``synchronous=NORMAL``, so a killed process (``kill -9``) loses no committed
change (a power cut may lose the last few). Deadlines are stored as absolute Unix times, so a restart re-arms
them where they were. Writes are synchronous: one small transaction takes tens of microseconds, which is
cheaper than handing it to a thread, and the style of this project keeps threads out.

A file that is not a database of ours, or a row that does not parse, is reported (:class:`PersistError`) or
skipped and counted, never a crash.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS subscriptions (
    sid INTEGER PRIMARY KEY,
    dialect TEXT NOT NULL,
    token TEXT NOT NULL,
    key BLOB NOT NULL,
    client_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    platform TEXT NOT NULL,
    topic TEXT NOT NULL,
    deadline REAL NOT NULL,
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS permanent_puts (
    key BLOB NOT NULL,
    value_id INTEGER NOT NULL,
    value BLOB NOT NULL,
    deadline REAL NOT NULL,
    token TEXT NOT NULL DEFAULT '',
    client_id TEXT NOT NULL DEFAULT '',
    session_id TEXT NOT NULL DEFAULT '',
    platform TEXT NOT NULL DEFAULT '',
    topic TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (key, value_id)
);
"""


class PersistError(Exception):
    """The state file cannot be used (not SQLite, or written by an incompatible version)."""


@dataclass(frozen=True, slots=True)
class StoredSubscription:
    """A push subscription as stored; ``deadline`` is a Unix time."""

    sid: int
    dialect: str
    token: str
    key: bytes
    client_id: str
    session_id: str
    platform: str
    topic: str
    deadline: float
    state: str


@dataclass(frozen=True, slots=True)
class StoredPut:
    """A permanent put as stored: the packed value (``Value.packed()``), its deadline and its push info."""

    key: bytes
    value_id: int
    value: bytes
    deadline: float
    token: str = ""
    client_id: str = ""
    session_id: str = ""
    platform: str = ""
    topic: str = ""


class StateStore:
    """The SQLite file holding the proxy's durable state. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str | Path) -> None:
        try:
            self._db = sqlite3.connect(str(path), isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._transaction():
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                row = self._db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
                if row is None:
                    self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                elif row[0] != str(SCHEMA_VERSION):
                    raise PersistError(f"{path}: schema version {row[0]}, expected {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise PersistError(f"{path}: {exc}") from exc
        self.skipped = 0
        """Rows that did not parse when loading."""

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction: committed on success, rolled back on an exception."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- subscriptions ---------------------------------------------------------------------------------------

    def save_subscription(self, sub: StoredSubscription) -> None:
        """Insert or replace one subscription (committed on return)."""
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO subscriptions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sub.sid, sub.dialect, sub.token, sub.key, sub.client_id, sub.session_id, sub.platform,
                 sub.topic, sub.deadline, sub.state),
            )  # fmt: skip

    def delete_subscriptions(self, sids: list[int]) -> None:
        with self._transaction():
            self._db.executemany("DELETE FROM subscriptions WHERE sid = ?", [(sid,) for sid in sids])

    def load_subscriptions(self) -> list[StoredSubscription]:
        out = []
        for row in self._db.execute("SELECT * FROM subscriptions ORDER BY deadline"):
            try:
                sub = StoredSubscription(*row)
                if not (
                    isinstance(sub.key, bytes) and len(sub.key) == 20 and isinstance(sub.deadline, float)
                ):
                    raise TypeError("bad key or deadline")
            except TypeError as exc:
                log.warning("skipping stored subscription %r: %s", row[:1], exc)
                self.skipped += 1
                continue
            out.append(sub)
        return out

    # -- permanent puts --------------------------------------------------------------------------------------

    def save_put(self, put: StoredPut) -> None:
        """Insert or replace one permanent put (committed on return)."""
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO permanent_puts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (put.key, put.value_id, put.value, put.deadline, put.token, put.client_id, put.session_id,
                 put.platform, put.topic),
            )  # fmt: skip

    def delete_put(self, key: bytes, value_id: int) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM permanent_puts WHERE key = ? AND value_id = ?", (key, value_id))

    def load_puts(self) -> list[StoredPut]:
        out = []
        for row in self._db.execute("SELECT * FROM permanent_puts ORDER BY deadline"):
            try:
                put = StoredPut(*row)
                if not (isinstance(put.key, bytes) and len(put.key) == 20 and isinstance(put.value, bytes)):
                    raise TypeError("bad key or value")
            except TypeError as exc:
                log.warning("skipping stored put: %s", exc)
                self.skipped += 1
                continue
            out.append(put)
        return out
