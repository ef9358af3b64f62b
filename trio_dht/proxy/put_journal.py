"""Permanent puts kept in the state file (``-f/--persist``): the :class:`PutJournal` over :class:`StateStore`.

Deadlines are stored as Unix times and come back on the Trio clock, so a put restored after a restart lapses
when it would have without one. A row that no longer parses is skipped with a warning and counted
(:attr:`StateStore.skipped`). A put that cannot be written raises :class:`~trio_dht.persist.PersistError`
before anything is held; a lapsed put that cannot be deleted is only logged (its row is dropped on load).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import trio

from trio_dht.infohash import InfoHash
from trio_dht.persist import PersistError, StateStore, StoredPut
from trio_dht.proxy.permanent import REFRESH_MARGIN, PermanentPut
from trio_dht.rest.value_json import PushTarget
from trio_dht.value import InvalidValue, Value

log = logging.getLogger("trio_dht.proxy.put_journal")


class StorePutJournal:
    """Writes each change of a held put to the state file."""

    def __init__(self, store: StateStore, wall_clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._wall_clock = wall_clock

    def saved(self, held: PermanentPut) -> None:
        push = held.push or PushTarget("")
        row = StoredPut(
            key=bytes(held.key),
            value_id=held.value.id,
            value=held.value.packed(),
            deadline=held.expires_at - trio.current_time() + self._wall_clock(),
            token=push.token,
            client_id=push.client_id,
            session_id=push.session_id,
            platform=push.platform,
            topic=push.topic,
            source=held.source,
        )
        self.store.save_put(row)  # PersistError: the caller holds nothing new

    def removed(self, key: InfoHash, value_id: int) -> None:
        # A failure is logged and counted by the store; the row has lapsed and is dropped on load.
        with contextlib.suppress(PersistError):
            self.store.delete_put(bytes(key), value_id)

    def stats(self) -> dict[str, int]:
        """The state file's counters (shared with the push subscriptions kept in it)."""
        return {"skippedRows": self.store.skipped, "writeErrors": self.store.write_errors}

    def load(self) -> list[PermanentPut]:
        """The puts still alive, on the Trio clock (lapsed rows are deleted)."""
        now, wall = trio.current_time(), self._wall_clock()
        out = []
        for row in self.store.load_puts():
            if row.deadline <= wall:
                self.removed(InfoHash(row.key), row.value_id)
                continue
            try:
                value = Value.unpack(row.value)
                if value.id != row.value_id:
                    raise InvalidValue(f"value id {value.id} stored as {row.value_id}")
            except (ValueError, TypeError, RecursionError) as exc:  # InvalidValue is a ValueError
                log.warning("skipping a stored permanent put: %s", exc)
                self.store.skipped += 1
                continue
            expires_at = row.deadline - wall + now
            push = (
                PushTarget(row.token, row.client_id, row.platform, row.session_id, row.topic)
                if row.token
                else None
            )
            refresh_at = (
                expires_at - REFRESH_MARGIN
                if push is not None and expires_at - REFRESH_MARGIN > now
                else None
            )
            out.append(PermanentPut(InfoHash(row.key), value, expires_at, push, refresh_at, row.source))
        return out
