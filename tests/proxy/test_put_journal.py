"""Permanent puts survive a restart through the state file, with their deadlines (MockClock for the hours)."""

from __future__ import annotations

from pathlib import Path

import trio

from trio_dht.infohash import InfoHash
from trio_dht.persist import StateStore
from trio_dht.proxy.permanent import LIFETIME, REFRESH_MARGIN, PermanentPuts
from trio_dht.proxy.put_journal import StorePutJournal
from trio_dht.rest.value_json import PushTarget
from trio_dht.value import Value

KEY = InfoHash.get("permanent")


class WallClock:
    """A Unix clock that advances with Trio's (mock) clock, as the real ones do together."""

    def __init__(self) -> None:
        self.offset = 1_800_000_000.0 - trio.current_time()

    def __call__(self) -> float:
        return trio.current_time() + self.offset


async def test_puts_are_written_and_restored_with_their_deadlines(tmp_path: Path, autojump_clock) -> None:
    wall = WallClock()
    path = tmp_path / "state.sqlite"
    with StateStore(path) as store:
        puts = PermanentPuts(StorePutJournal(store, wall))
        push = PushTarget("device-token", "client", "android", "session")
        held = puts.record(KEY, Value(data=b"kept", id=7), push, trio.current_time())
        puts.record(KEY, Value(data=b"dropped", id=8), None, trio.current_time())
        puts.remove(KEY, 8)
        expires_at = held.expires_at

    await trio.sleep(3600)  # the process was down for an hour

    with StateStore(path) as store:
        journal = StorePutJournal(store, wall)
        restored = journal.load()
        assert [(p.key, p.value.id, p.value.data) for p in restored] == [(KEY, 7, b"kept")]
        (p,) = restored
        assert abs(p.expires_at - expires_at) < 1e-3
        assert p.push == push
        assert abs(p.refresh_at - (expires_at - REFRESH_MARGIN)) < 1e-3
        again = PermanentPuts(journal)
        again.restore(p)
        await trio.sleep(LIFETIME - REFRESH_MARGIN - 3600)
        expired, warn = again.due(trio.current_time())
        assert (expired, [w.value.id for w in warn]) == ([], [7])
        await trio.sleep(REFRESH_MARGIN)
        expired, _ = again.due(trio.current_time())
        assert [e.value.id for e in expired] == [7]
        assert journal.load() == []  # lapsed: gone from the file too


async def test_lapsed_and_corrupt_rows_are_skipped(tmp_path: Path, autojump_clock) -> None:
    wall = WallClock()
    path = tmp_path / "state.sqlite"
    with StateStore(path) as store:
        puts = PermanentPuts(StorePutJournal(store, wall))
        puts.record(KEY, Value(data=b"old", id=1), None, trio.current_time())
        store._db.execute("UPDATE permanent_puts SET value = x'c1c1'")  # not a value any more
    with StateStore(path) as store:
        assert StorePutJournal(store, wall).load() == []
    await trio.sleep(LIFETIME + 1)
    with StateStore(path) as store:
        assert StorePutJournal(store, wall).load() == []
