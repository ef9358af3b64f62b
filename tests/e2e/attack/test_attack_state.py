"""The state file (``-f PATH``) under bad rows, failing writes and a read-only file, against the real program.

* Rows of the wrong type (written with ``sqlite3`` directly) are skipped with a warning and counted; the good
  rows load.
* A write that fails (the file size limit of the process lowered under it, as a full disk would; or a file
  that cannot be written) is a 503 with a JSON error, and nothing changes: the value is not served, and after
  a restart the program holds what it held before (memory and disk agree).
* The file and its ``-wal``/``-shm`` siblings are created 0600; an existing readable file is warned about.
* Permanent puts without an id (random 64-bit ids, half of them past SQLite's signed range) all succeed.
"""

from __future__ import annotations

import resource
import signal
import sqlite3
import stat
import time
from pathlib import Path

import httpx
import trio
from conftest import Target, attacked

from trio_dht.infohash import InfoHash
from trio_dht.persist import StateStore, StoredPut, StoredSubscription
from trio_dht.value import Value

KEY = InfoHash.get("state file key")
SUB_COLUMNS = "sid, dialect, token, key, client_id, session_id, platform, topic, deadline, state, source"
PUT_COLUMNS = "key, value_id, value, deadline, token, client_id, session_id, platform, topic, source"


def http_client(target: Target) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=target.url, timeout=5, trust_env=False)


def subscribe_body(client_id: str, **fields: object) -> dict[str, object]:
    return {"key": "device-token", "platform": "android", "client_id": client_id, **fields}


async def kill(target: Target) -> None:
    """``kill -9``: no chance to save anything on the way out."""
    target.proc.process.send_signal(signal.SIGKILL)
    with trio.fail_after(10):
        await target.proc.process.wait()


async def values_under(http: httpx.AsyncClient, key: InfoHash) -> list[str]:
    r = await http.get(f"/key/{key.hex()}")
    return [line for line in r.text.splitlines() if line.strip()]


async def test_bad_rows_are_skipped_and_the_rest_loads(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    later = time.time() + 3600
    key = bytes(KEY)
    with StateStore(path) as store:  # the good rows
        store.save_subscription(
            StoredSubscription(1, "current", "tok", key, "c", "s", "android", "", later, "active", "10.0.0.1")
        )
        store.save_put(StoredPut(key, 2**64 - 5, Value(data=b"good", id=2**64 - 5).packed(), later))
    raw = sqlite3.connect(path)
    bad_subscriptions = [
        (2, "current", b"tok", key, "c", "s", "android", "", later, "active", ""),  # token a blob
        (3, "current", "tok", "not bytes", "c", "s", "android", "", later, "active", ""),
        (4, "current", "tok", key, "c2", "s", "android", "", "tomorrow", "active", ""),
        (5, "a dialect from the future", "tok", key, "c3", "s", "android", "", later, "active", ""),
    ]
    raw.executemany(
        f"INSERT INTO subscriptions ({SUB_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", bad_subscriptions
    )
    bad_puts = [
        (key, "seven", b"v", later, "", "", "", "", "", ""),
        (key, 8, "text, not a packed value", later, "", "", "", "", "", ""),
        (key, 9, b"\xc1\xc1 not msgpack", later, "", "", "", "", "", ""),
        (key, 10, Value(data=b"id mismatch", id=11).packed(), later, "", "", "", "", "", ""),
        (b"short", 12, b"v", later, "", "", "", "", "", ""),
    ]
    raw.executemany(f"INSERT INTO permanent_puts ({PUT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)", bad_puts)
    raw.commit()
    raw.close()
    async with attacked("-f", str(path)) as target, http_client(target) as http:
        stats = await target.stats()
        assert stats["stateFile"]["skippedRows"] == len(bad_subscriptions) + len(bad_puts)
        assert stats["pushSubscriptions"]["restored"] == 1 and stats["totalPermanentPuts"] == 1
        assert stats["pushSubscriptions"]["sources"] == 1
        assert sum("skipping" in line for line in target.proc.lines) == len(bad_subscriptions) + len(bad_puts)
        assert "Traceback" not in target.proc.output
        with trio.fail_after(5):  # the good put is announced again
            while not await values_under(http, KEY):
                await trio.sleep(0.05)
        assert f'"id":"{2**64 - 5}"' in (await values_under(http, KEY))[0]


async def test_the_state_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    async with attacked("-f", str(path)) as target, http_client(target) as http:
        r = await http.request("SUBSCRIBE", f"/key/{KEY.hex()}", json=subscribe_body("c"))
        assert r.status_code == 200
        files = sorted(tmp_path.iterdir())
        assert [p.name for p in files] == ["state.db", "state.db-shm", "state.db-wal"]
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
        assert "others may read" not in target.proc.output
    path.chmod(0o644)
    async with attacked("-f", str(path)) as target:
        assert "has mode 644: others may read the device tokens" in target.proc.output


async def test_random_id_permanent_puts_succeed_and_survive(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    ids = []
    async with attacked("-f", str(path)) as target, http_client(target) as http:
        for i in range(100):
            r = await http.post(f"/key/{KEY.hex()}", json={"data": f"{i:04}", "permanent": True})
            assert r.status_code == 200, r.text
            ids.append(int(r.json()["id"]))
        assert any(vid >= 2**63 for vid in ids) and all(0 < vid < 2**64 for vid in ids)
        await kill(target)
    async with attacked("-f", str(path)) as target:
        assert (await target.stats())["totalPermanentPuts"] == 100
    with StateStore(path) as store:
        assert sorted(p.value_id for p in store.load_puts()) == sorted(ids)


def lower_file_size_limit(pid: int, soft: int) -> None:
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))


async def test_a_disk_error_while_saving_is_a_503_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    other_key = InfoHash.get("refused key")
    async with attacked("-f", str(path)) as target, http_client(target) as http:
        assert (
            await http.request("SUBSCRIBE", f"/key/{KEY.hex()}", json=subscribe_body("kept"))
        ).status_code == 200
        r = await http.post(f"/key/{KEY.hex()}", json={"data": "a2VwdA==", "id": "1", "permanent": True})
        assert r.status_code == 200
        before = await target.stats()
        # A full disk, for this process: every write past 512 bytes into a file fails with EFBIG.
        lower_file_size_limit(target.pid, 512)
        refused = [
            await http.post(f"/key/{other_key.hex()}", json={"data": "bG9zdA==", "permanent": True}),
            await http.post(f"/key/{KEY.hex()}", json={"data": "bmV3", "id": "1", "permanent": True}),
            await http.request("SUBSCRIBE", f"/key/{other_key.hex()}", json=subscribe_body("new")),
            await http.request("SUBSCRIBE", f"/key/{KEY.hex()}", json=subscribe_body("kept", refresh=True)),
            await http.request("UNSUBSCRIBE", f"/key/{KEY.hex()}", json=subscribe_body("kept")),
        ]
        for r in refused:
            assert r.status_code == 503, r.text
            assert r.json() == {"err": "Cannot save the change: state file unavailable"}
        assert await values_under(http, other_key) == []  # the refused put is not served
        [line] = await values_under(http, KEY)
        assert '"data":"a2VwdA=="' in line  # nor is the refused refresh
        after = await target.stats()
        assert after["stateFile"]["writeErrors"] == len(refused)
        for field in ("totalPermanentPuts", "pushListenersCount"):
            assert after[field] == before[field]
        assert after["pushSubscriptions"]["active"] == before["pushSubscriptions"]["active"] == 1
        # The disk has room again: writes work without a restart.
        lower_file_size_limit(target.pid, resource.RLIM_INFINITY)
        r = await http.post(f"/key/{KEY.hex()}", json={"data": "c2Vjb25k", "id": "2", "permanent": True})
        assert r.status_code == 200
        held = (await target.stats())["totalPermanentPuts"]
        await kill(target)
    async with attacked("-f", str(path)) as target, http_client(target) as http:
        stats = await target.stats()
        assert stats["totalPermanentPuts"] == held == 2
        assert stats["pushSubscriptions"]["restored"] == 1
        assert stats["stateFile"] == {"skippedRows": 0, "writeErrors": 0}
        assert await values_under(http, other_key) == []


async def test_a_read_only_state_file_answers_503(tmp_path: Path, read_only) -> None:
    path = tmp_path / "state.db"
    async with attacked("-f", str(path)) as target, http_client(target) as http:
        assert (
            await http.request("SUBSCRIBE", f"/key/{KEY.hex()}", json=subscribe_body("kept"))
        ).status_code == 200
    with read_only(path):
        async with attacked("-f", str(path)) as target, http_client(target) as http:
            assert "is read-only: every change will be refused (503)" in target.proc.output
            assert (await target.stats())["pushSubscriptions"]["restored"] == 1
            r = await http.post(f"/key/{KEY.hex()}", json={"data": "bG9zdA==", "permanent": True})
            assert r.status_code == 503 and r.json()["err"].startswith("Cannot save the change")
            r = await http.request("SUBSCRIBE", f"/key/{KEY.hex()}", json=subscribe_body("new"))
            assert r.status_code == 503
            assert await values_under(http, KEY) == []
            stats = await target.stats()
            assert stats["totalPermanentPuts"] == 0 and stats["pushSubscriptions"]["active"] == 1
