"""The held permanent puts' count: kept as puts come and go (a put costs no pass over the keys)."""

from trio_dht.infohash import InfoHash
from trio_dht.proxy.permanent import LIFETIME, PermanentPuts
from trio_dht.value import Value


def recount(book: PermanentPuts) -> int:
    return sum(len(by_id) for by_id in book._puts.values())


def test_total_follows_holds_replacements_removals_and_expiry() -> None:
    book = PermanentPuts()
    keys = [InfoHash.get(str(i)) for i in range(50)]
    for i, key in enumerate(keys):
        for vid in (1, 2):
            book.record(key, Value(data=b"v", id=vid), None, now=float(i))
    assert book.total == recount(book) == 100
    book.record(keys[0], Value(data=b"w", id=1), None, now=60.0)  # the same id again: replaced
    book.restore(book.get(keys[1], 2))  # read back over itself
    assert book.total == recount(book) == 100
    assert book.remove(keys[2], 1) is not None and book.remove(keys[2], 1) is None
    assert book.total == recount(book) == 99
    expired, _ = book.due(LIFETIME + 30.0)  # 31 keys' puts, less one renewed, one removed
    assert book.total == recount(book) == 99 - len(expired) and len(expired) == 60


def test_a_put_costs_no_pass_over_the_keys(monkeypatch) -> None:
    book = PermanentPuts()
    for i in range(2000):
        book.record(InfoHash.get(str(i)), Value(data=b"v", id=1), None, now=0.0)

    class Unscannable(dict):
        def values(self):
            raise AssertionError("a pass over every key")

    book._puts = Unscannable(book._puts)
    book.record(InfoHash.get("new"), Value(data=b"v", id=1), None, now=1.0)
    assert book.total == 2001
