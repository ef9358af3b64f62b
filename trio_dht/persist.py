"""State on disk (``-f/--persist PATH``), in SQLite: the proxy's push subscriptions and permanent puts, and
the node's own state (its id, the good nodes it knew, the values it stores for others: ``node.saved_state``).

Every change is written when it happens, in its own transaction, before memory changes and before the HTTP
reply acknowledges it: a write that fails raises :class:`PersistError`, the caller changes nothing and
answers 503, so memory and disk never differ on what a client was told. The database runs in WAL mode with
``synchronous=NORMAL``, so a killed process (``kill -9``) loses no committed change (a power cut may lose
the last few). Deadlines are stored as absolute Unix times, so a restart re-arms them where they were.
Writes are synchronous: one small transaction takes tens of microseconds, which is cheaper than handing it
to a thread, and the style of this project keeps threads out. A database locked by another process makes a
write fail after :data:`BUSY_TIMEOUT`, not wait for it.

The file holds device tokens and endpoint URLs: it is created with mode 0600 (SQLite gives its ``-wal``,
``-shm`` and ``-journal`` files the mode of the database), and an existing file that others may read is
reported with a warning.

Value ids are unsigned 64-bit numbers; SQLite's INTEGER is signed, so an id of 2**63 or more is stored as
``id - 2**64`` and read back as the unsigned id (ids below 2**63, the only ones older versions could store,
read the same). A file that is not a database of ours is a :class:`PersistError`; a row that does not parse
(a wrong type, a bad key) is skipped with a warning and counted in :attr:`StateStore.skipped`.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from time import monotonic
from typing import Any

from trio_dht.logs import LogLimit
from trio_dht.node.saved_state import NodeState, SavedNode, SavedValue

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
"""1: no ``source`` columns (added, empty, when such a file is opened); 2: no node state (its tables are
added, empty)."""
UNAVAILABLE = "Cannot save the change: state file unavailable"
"""The error of a request refused (503) because its change could not be written."""
BUSY_TIMEOUT = 0.1
"""Seconds a write waits for a lock held by another process before it fails."""
FILE_MODE = 0o600

_SUBSCRIPTION_COLUMNS = (
    "sid", "dialect", "token", "key", "client_id", "session_id", "platform", "topic", "deadline", "state",
    "source",
)  # fmt: skip
_PUT_COLUMNS = (
    "key", "value_id", "value", "deadline", "token", "client_id", "session_id", "platform", "topic", "source",
)  # fmt: skip
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
    state TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT ''
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
    source TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (key, value_id)
);
CREATE TABLE IF NOT EXISTS dht_nodes (
    key BLOB NOT NULL,
    host TEXT NOT NULL,
    port INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dht_values (
    key BLOB NOT NULL,
    value BLOB NOT NULL,
    deadline REAL NOT NULL,
    bucket TEXT NOT NULL
);
"""
_NODE_COLUMNS = ("key", "host", "port")
_VALUE_COLUMNS = ("key", "value", "deadline", "bucket")


class PersistError(Exception):
    """The state file cannot be used (not SQLite, written by an incompatible version), or a change could not
    be written to it."""


@dataclass(frozen=True, slots=True)
class StoredSubscription:
    """A push subscription as stored; ``deadline`` is a Unix time, ``source`` the client's address bucket."""

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
    source: str = ""


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
    source: str = ""


_Types = dict[str, type | tuple[type, ...]]


def _to_signed(value_id: int) -> int:
    return value_id - (1 << 64) if value_id >= 1 << 63 else value_id


def _from_signed(stored: int) -> int:
    return stored & ((1 << 64) - 1)


def _check_row(row: Any, types: _Types) -> str | None:
    """What is wrong with a row read back (a column of the wrong type, a bad key or deadline), or None."""
    for name, kind in types.items():
        if not isinstance(row[name], kind) or isinstance(row[name], bool):
            return f"{name} is {type(row[name]).__name__}"
    if len(row["key"]) != 20:
        return "key is not 20 bytes"
    if "deadline" in types and not math.isfinite(row["deadline"]):
        return "deadline is not finite"
    return None


_NUMBER = (float, int)
_SUBSCRIPTION_TYPES: _Types = {
    **dict.fromkeys(_SUBSCRIPTION_COLUMNS, str),
    "sid": int,
    "key": bytes,
    "deadline": _NUMBER,
}
_NODE_TYPES: _Types = {"key": bytes, "host": str, "port": int}
_VALUE_TYPES: _Types = {"key": bytes, "value": bytes, "deadline": _NUMBER, "bucket": str}
_PUT_TYPES: _Types = {
    **dict.fromkeys(_PUT_COLUMNS, str),
    "key": bytes,
    "value_id": int,
    "value": bytes,
    "deadline": _NUMBER,
}


class StateStore:
    """The SQLite file holding the proxy's durable state. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.skipped = 0
        """Rows that did not parse when loading (skipped)."""
        self.write_errors = 0
        """Changes that could not be written (refused with :class:`PersistError`)."""
        self._error_log = LogLimit()
        """Failed writes (a full disk: one per stranger's request) log one line per 10 s."""
        try:
            _create_private(self.path)
            self._db = sqlite3.connect(str(path), isolation_level=None, timeout=BUSY_TIMEOUT)
        except (OSError, sqlite3.Error) as exc:
            raise PersistError(f"{path}: {exc}") from exc
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._transaction():
                self._create_or_upgrade()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise PersistError(f"{path}: {exc}") from exc
        except PersistError:
            self._db.close()
            raise
        if not os.access(self.path, os.W_OK):
            log.warning("state file %s is read-only: every change will be refused (503)", self.path)

    def _create_or_upgrade(self) -> None:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                self._db.execute(statement)
        row = self._db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            return
        version = row[0]
        if version in ("1", "2"):  # the node state's tables were created above
            if version == "1":
                for table in ("subscriptions", "permanent_puts"):
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN source TEXT NOT NULL DEFAULT ''")
            self._db.execute("UPDATE meta SET value = ? WHERE name = 'schema'", (str(SCHEMA_VERSION),))
            log.info("state file %s upgraded to schema %d", self.path, SCHEMA_VERSION)
        elif version != str(SCHEMA_VERSION):
            raise PersistError(f"{self.path}: schema version {version}, expected {SCHEMA_VERSION}")
        for table, columns in (("subscriptions", _SUBSCRIPTION_COLUMNS), ("permanent_puts", _PUT_COLUMNS)):
            found = {info[1] for info in self._db.execute(f"PRAGMA table_info({table})")}
            if not set(columns) <= found:
                raise PersistError(f"{self.path}: table {table} lacks {sorted(set(columns) - found)}")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction: committed on success, rolled back on an exception."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    @contextmanager
    def _write(self, what: str) -> Iterator[None]:
        """One change in its own transaction; a SQLite error becomes a counted :class:`PersistError`."""
        try:
            with self._transaction():
                yield
        except sqlite3.Error as exc:
            self.write_errors += 1
            if line := self._error_log.line(f"state file {self.path}: cannot {what}: {exc}", monotonic()):
                log.error("%s", line)
            raise PersistError(f"cannot {what}: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load(
        self, table: str, columns: tuple[str, ...], types: _Types, order: str = "deadline"
    ) -> Iterator[sqlite3.Row]:
        """The rows of ``table`` by ``order``, less those that do not parse (skipped, counted, warned)."""
        try:
            rows = self._db.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}").fetchall()
        except sqlite3.Error as exc:
            raise PersistError(f"{self.path}: cannot read {table}: {exc}") from exc
        for row in rows:
            problem = _check_row(row, types)
            if problem is not None:
                self.skipped += 1
                log.warning("state file %s: skipping a row of %s: %s", self.path, table, problem)
                continue
            yield row

    # -- subscriptions ---------------------------------------------------------------------------------------

    def save_subscription(self, sub: StoredSubscription) -> None:
        """Insert or replace one subscription (committed on return; else :class:`PersistError`)."""
        with self._write("save a subscription"):
            self._db.execute(
                f"INSERT OR REPLACE INTO subscriptions ({', '.join(_SUBSCRIPTION_COLUMNS)})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sub.sid, sub.dialect, sub.token, sub.key, sub.client_id, sub.session_id, sub.platform,
                 sub.topic, sub.deadline, sub.state, sub.source),
            )  # fmt: skip

    def delete_subscriptions(self, sids: list[int]) -> None:
        """Delete subscriptions by sid (committed on return; else :class:`PersistError`)."""
        with self._write("delete subscriptions"):
            self._db.executemany("DELETE FROM subscriptions WHERE sid = ?", [(sid,) for sid in sids])

    def load_subscriptions(self) -> list[StoredSubscription]:
        out = []
        for row in self._load("subscriptions", _SUBSCRIPTION_COLUMNS, _SUBSCRIPTION_TYPES):
            fields = {name: row[name] for name in _SUBSCRIPTION_COLUMNS}
            fields["deadline"] = float(fields["deadline"])
            out.append(StoredSubscription(**fields))
        return out

    # -- permanent puts --------------------------------------------------------------------------------------

    def save_put(self, put: StoredPut) -> None:
        """Insert or replace one permanent put (committed on return; else :class:`PersistError`)."""
        with self._write("save a permanent put"):
            self._db.execute(
                f"INSERT OR REPLACE INTO permanent_puts ({', '.join(_PUT_COLUMNS)})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (put.key, _to_signed(put.value_id), put.value, put.deadline, put.token, put.client_id,
                 put.session_id, put.platform, put.topic, put.source),
            )  # fmt: skip

    def delete_put(self, key: bytes, value_id: int) -> None:
        """Delete one permanent put (committed on return; else :class:`PersistError`)."""
        with self._write("delete a permanent put"):
            self._db.execute(
                "DELETE FROM permanent_puts WHERE key = ? AND value_id = ?", (key, _to_signed(value_id))
            )

    def load_puts(self) -> list[StoredPut]:
        out = []
        for row in self._load("permanent_puts", _PUT_COLUMNS, _PUT_TYPES):
            fields = {name: row[name] for name in _PUT_COLUMNS}
            fields["value_id"] = _from_signed(fields["value_id"])
            fields["deadline"] = float(fields["deadline"])
            out.append(StoredPut(**fields))
        return out

    # -- the node's own state -------------------------------------------------------------------------------

    def save_node_state(self, state: NodeState) -> None:
        """Replace the saved node state with ``state`` (its values too, unless None), in one transaction (else
        :class:`PersistError`)."""
        with self._write("save the node state"):
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('node_id', ?)", (state.node_id.hex(),))
            self._db.execute("DELETE FROM dht_nodes")
            self._db.executemany(
                "INSERT INTO dht_nodes (key, host, port) VALUES (?, ?, ?)",
                [(n.node_id, n.host, n.port) for n in state.nodes],
            )
            if state.values is None:
                return
            self._db.execute("DELETE FROM dht_values")
            self._db.executemany(
                "INSERT INTO dht_values (key, value, deadline, bucket) VALUES (?, ?, ?, ?)",
                [(v.key, v.packed, v.expires, v.bucket) for v in state.values],
            )

    def load_node_state(self) -> NodeState | None:
        """The saved node state, or None if none was saved (rows that do not parse are skipped)."""
        row = self._db.execute("SELECT value FROM meta WHERE name = 'node_id'").fetchone()
        try:
            node_id = bytes.fromhex(row[0]) if row is not None else b""
        except (TypeError, ValueError):
            node_id = b""
        if len(node_id) != 20:
            if row is not None:
                self.skipped += 1
                log.warning("state file %s: skipping a bad node id", self.path)
            return None
        nodes = []
        for r in self._load("dht_nodes", _NODE_COLUMNS, _NODE_TYPES, order="rowid"):
            if 0 < r["port"] < 65536:
                nodes.append(SavedNode(r["key"], r["host"], r["port"]))
            else:
                self.skipped += 1
                log.warning("state file %s: skipping a row of dht_nodes: port %d", self.path, r["port"])
        values = tuple(
            SavedValue(r["key"], r["value"], float(r["deadline"]), r["bucket"])
            for r in self._load("dht_values", _VALUE_COLUMNS, _VALUE_TYPES)
        )
        return NodeState(node_id, tuple(nodes), values)


def _create_private(path: Path) -> None:
    """Create the file with mode 0600 if it does not exist; warn if an existing one is readable by others."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning(
                "state file %s has mode %o: others may read the device tokens in it (chmod 600 %s)",
                path, stat.S_IMODE(mode), path,
            )  # fmt: skip
        return
    os.close(fd)
