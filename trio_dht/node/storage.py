"""The values a node stores for others and for itself (OpenDHT's ``Storage`` plus the node's store rules).

Sans-IO: every call takes ``now`` (seconds on any monotonic clock); nothing here reads a clock or does I/O.
The caller (``node.protocol``) answers requests and pushes ``update``s to listeners from the results:

- :meth:`Storage.put` applies OpenDHT's put rules and returns a :class:`PutResult`:
  ``STORED``/``EDITED`` → push ``values``; ``REFRESHED`` → push ``re``; ``evicted`` → push ``exp``.
- :meth:`Storage.refresh` is the ``refresh`` request (``None`` → answer 404).
- :meth:`Storage.expire` removes what has expired (→ push ``exp``); :meth:`Storage.next_expiration` says when
  to call it next.

Simplified against OpenDHT (documented on purpose):

- Type 2 (service announcement): stored as sent. OpenDHT rewrites the sockaddr in ``data`` with the sender's
  address and refuses port 0; we neither parse nor rewrite it.
- Type 8 (certificate): stored without parsing the certificate (OpenDHT checks that it sits at its public
  key's id), and an edit is accepted when ``owner`` is unchanged (OpenDHT compares the certificates' public
  keys). Without X.509 parsing, a type-8 value is checked for size only.
- A re-put by the node itself (``local=True``) goes through the same store and edit policies as a remote put
  (OpenDHT's own puts bypass them), so this node never holds a value the network would refuse.
- A local put that would exceed ``max_local_bytes`` is refused; local values are never evicted.

Values are kept by reference (no copy): never mutate a :class:`Value` after putting it.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from trio_dht.infohash import InfoHash
from trio_dht.sources import client_key
from trio_dht.value import MAX_VALUE_SIZE, SECURED_TYPES, Query, Value, type_expiration
from trio_dht.wire.msgpack_codec import unpackb

MAX_VALUES_PER_KEY = 64 * 1024
"""At most this many values under one key (OpenDHT's ``Storage::MAX_VALUES``)."""

DEFAULT_MAX_TOTAL_BYTES = 64 * 1024 * 1024
"""Default quota for values stored on behalf of other nodes (OpenDHT's ``STORAGE_LIMIT_DEFAULT``)."""

DHT_MESSAGE_TYPE = 1
CERTIFICATE_TYPE = 8

NEVER = math.inf
"""Expiration of a local permanent value."""

_HEAP_SLACK = 1024
_BUCKET_HEAP_SLACK = 16

# (expiration, generation, key, value id): an entry of the expiry heap and of a source's eviction heap. It is
# live while the value is stored with that generation; any change to a stored value gives it a new one.
_Entry = tuple[float, int, InfoHash, int]


class PutOutcome(enum.Enum):
    """What :meth:`Storage.put` did with a value."""

    STORED = "stored"
    """A new value id was stored: push ``values`` to the key's matching listeners."""
    EDITED = "edited"
    """An accepted edit replaced the stored value: push ``values`` to the key's matching listeners."""
    REFRESHED = "refreshed"
    """A byte-identical re-put extended the stored value's life: push ``re`` to every listener of the key."""
    REFUSED = "refused"
    """Nothing changed for this value (the put is still answered with its ``vid``)."""


class Refusal(enum.StrEnum):
    """Why a put was refused (for counters and logs)."""

    INVALID_ID = "invalid id"
    TOO_LARGE = "too large"
    EXPIRED = "expired"
    EDIT_REFUSED = "edit refused"
    BAD_SIGNATURE = "bad signature"
    POLICY = "type policy"
    KEY_FULL = "key full"
    LOCAL_QUOTA = "local quota"
    QUOTA = "evicted for quota"


@dataclass(frozen=True, slots=True)
class PutResult:
    """Outcome of a put, plus the values it evicted for quota (the caller pushes ``exp`` for those).

    ``evicted`` may hold values of other keys. If the put value itself was evicted at once, the outcome is
    ``REFUSED`` (``refusal`` = ``QUOTA``); it is listed in ``evicted`` only if listeners had already seen
    that id (an edit of a stored value).
    """

    outcome: PutOutcome
    evicted: tuple[tuple[InfoHash, int], ...] = ()
    refusal: Refusal | None = None

    @property
    def accepted(self) -> bool:
        return self.outcome is not PutOutcome.REFUSED


def source_bucket(source: str | None) -> str:
    """The quota bucket of a sender: its IPv4 address, or its IPv6 /64 (:func:`~trio_dht.sources.client_key`;
    ``""`` when unknown). A string that is not an IP address is its own bucket."""
    if not source:
        return ""
    key = client_key(source)
    return source if key is None else key[0]


class StoredValue:
    """A value as stored: the value, its expiration and its quota bucket (``None`` for local values).

    Read-only for callers; :class:`Storage` owns it.
    """

    __slots__ = ("bucket", "expiration", "gen", "size", "value")

    def __init__(self, value: Value, expiration: float, bucket: str | None, size: int | None = None) -> None:
        self.value = value
        self.size = value.size if size is None else size
        self.expiration = expiration
        self.bucket = bucket
        self.gen = 0

    @property
    def local(self) -> bool:
        return self.bucket is None

    def __repr__(self) -> str:
        where = "local" if self.bucket is None else self.bucket
        return f"StoredValue(id={self.value.id:#x}, expiration={self.expiration}, {where})"


class _Bucket:
    """Remote values from one source IP (or IPv6 /64): bytes used, count, eviction heap."""

    __slots__ = ("count", "heap", "usage")

    def __init__(self) -> None:
        self.usage = 0
        self.count = 0
        self.heap: list[_Entry] = []


class Storage:
    """Values per key, with OpenDHT's put rules, per-source quota and expiry.

    ``max_total_bytes`` bounds values stored for other nodes (-1: unlimited); ``max_local_bytes`` bounds the
    node's own values (-1: unlimited). ``verify(value)`` checks a signed value's signature (None: accept all).
    """

    def __init__(
        self,
        *,
        max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
        max_values_per_key: int = MAX_VALUES_PER_KEY,
        max_local_bytes: int = -1,
        verify: Callable[[Value], bool] | None = None,
    ) -> None:
        self.max_total_bytes = max_total_bytes
        self.max_values_per_key = max_values_per_key
        self.max_local_bytes = max_local_bytes
        self._verify = verify
        self._keys: dict[InfoHash, dict[int, StoredValue]] = {}
        self._heap: list[_Entry] = []  # expiry heap of values with a finite expiration
        self._timed = 0  # values with a finite expiration
        self._buckets: dict[str, _Bucket] = {}
        self._usage_heap: list[tuple[int, str]] = []  # (-usage, bucket), lazily updated: see _largest_bucket
        self._gen = 0
        self._remote_bytes = 0
        self._local_bytes = 0
        self._value_count = 0

    # -- reading ------------------------------------------------------------------------------------------

    def get(self, key: InfoHash, query: Query | None = None) -> list[Value]:
        """Values under ``key`` (in storing order) that match the query's Where; its Select is not applied."""
        values = self._keys.get(key)
        if not values:
            return []
        if query is None or not query.where:
            return [s.value for s in values.values()]
        return [s.value for s in values.values() if query.matches(s.value)]

    def get_value(self, key: InfoHash, vid: int) -> Value | None:
        stored = self.stored(key, vid)
        return stored.value if stored is not None else None

    def stored(self, key: InfoHash, vid: int) -> StoredValue | None:
        """The stored record of a value (expiration, local or not), or None."""
        values = self._keys.get(key)
        return values.get(vid) if values is not None else None

    def items(self) -> Iterator[tuple[InfoHash, StoredValue]]:
        """Every stored value with its key (do not store or remove while iterating)."""
        for key, values in self._keys.items():
            for stored in values.values():
                yield key, stored

    def keys(self) -> list[InfoHash]:
        """The keys that hold at least one value (a copy)."""
        return list(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    @property
    def total_bytes(self) -> int:
        """Bytes of values stored for other nodes (what ``max_total_bytes`` bounds; local ones excluded)."""
        return self._remote_bytes

    @property
    def local_bytes(self) -> int:
        """Bytes of the node's own values (what ``max_local_bytes`` bounds)."""
        return self._local_bytes

    @property
    def value_count(self) -> int:
        return self._value_count

    @property
    def key_count(self) -> int:
        return len(self._keys)

    def stats(self) -> dict[str, int]:
        return {
            "keys": len(self._keys),
            "values": self._value_count,
            "total_bytes": self._remote_bytes,
            "local_bytes": self._local_bytes,
            "sources": len(self._buckets),
            "max_total_bytes": self.max_total_bytes,
            "max_local_bytes": self.max_local_bytes,
        }

    # -- writing ------------------------------------------------------------------------------------------

    def put(
        self,
        key: InfoHash,
        value: Value,
        now: float,
        *,
        created: float | None = None,
        source: str | None = None,
        local: bool = False,
        permanent: bool = False,
    ) -> PutResult:
        """Store, refresh or edit ``value`` under ``key`` following OpenDHT's rules.

        ``created`` is the put's ``c`` (a creation time on the same clock as ``now``; later than ``now``
        counts as now). ``source`` is the sender's IP, for its quota. ``local`` marks the node's own values;
        ``permanent`` (local values only) makes a value live until :meth:`remove`.
        """
        if value.id == 0:
            return _refused(Refusal.INVALID_ID)
        size = value.size
        if size > MAX_VALUE_SIZE:
            return _refused(Refusal.TOO_LARGE)
        lifetime = type_expiration(value.type)
        if local and permanent:
            expiration = NEVER
        else:
            start = created if created is not None and created < now else now  # NaN counts as now
            expiration = start + lifetime
            if expiration <= now:
                return _refused(Refusal.EXPIRED)
        bucket = None if local else source_bucket(source)

        values = self._keys.get(key)
        stored = values.get(value.id) if values is not None else None
        if stored is not None:
            if stored.value.same_content(value):
                # A byte-identical re-put is a refresh (OpenDHT's storageRefresh): the stored value stays, its
                # life restarts from now, never shortened; the node's own re-put takes a remote value over.
                new_bucket = None if local else stored.bucket
                if new_bucket is None and stored.bucket is not None and not self._local_room(stored.size):
                    return _refused(Refusal.LOCAL_QUOTA)
                expiration = max(stored.expiration, now + lifetime, expiration)
                self._replace(key, stored, stored.value, expiration, new_bucket)
                outcome = PutOutcome.REFRESHED
            else:
                if not self._may_edit(stored.value, value):
                    return _refused(Refusal.EDIT_REFUSED)
                freed = stored.size if stored.bucket is None else 0
                if bucket is None and not self._local_room(size - freed):
                    return _refused(Refusal.LOCAL_QUOTA)
                self._replace(key, stored, value, expiration, bucket)
                outcome = PutOutcome.EDITED
        else:
            refusal = self._store_policy(value)
            if refusal is not None:
                return _refused(refusal)
            if values is not None and len(values) >= self.max_values_per_key:
                return _refused(Refusal.KEY_FULL)
            if bucket is None and not self._local_room(size):
                return _refused(Refusal.LOCAL_QUOTA)
            if values is None:
                values = self._keys[key] = {}
            stored = values[value.id] = StoredValue(value, expiration, bucket, size)
            self._account(key, stored)
            outcome = PutOutcome.STORED

        if self._remote_bytes <= self.max_total_bytes or self.max_total_bytes < 0:
            return _PLAIN_RESULTS[outcome]
        evicted = self._enforce_quota()
        if (key, value.id) in evicted:
            if outcome is PutOutcome.STORED:
                evicted.remove((key, value.id))
            return PutResult(PutOutcome.REFUSED, tuple(evicted), Refusal.QUOTA)
        return PutResult(outcome, tuple(evicted))

    def refresh(self, key: InfoHash, vid: int, now: float) -> bool | None:
        """The ``refresh`` request: restart a value's life from ``now``.

        None when nothing is stored under ``key`` (answer 404). Otherwise True, also for an unknown ``vid``
        (OpenDHT answers it normally and pushes ``re`` anyway).
        """
        values = self._keys.get(key)
        if not values:
            return None
        stored = values.get(vid)
        if stored is not None:
            expiration = max(stored.expiration, now + type_expiration(stored.value.type))
            if expiration != stored.expiration:
                self._replace(key, stored, stored.value, expiration, stored.bucket)
        return True

    def remove(self, key: InfoHash, vid: int) -> bool:
        """Drop a value (a cancelled permanent put); False if it was not stored."""
        values = self._keys.get(key)
        if values is None or vid not in values:
            return False
        self._delete(key, values, vid)
        return True

    def expire(self, now: float) -> list[tuple[InfoHash, list[int]]]:
        """Remove every value whose expiration is ``<= now``; returns their ids grouped by key."""
        expired: dict[InfoHash, list[int]] = {}
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, gen, key, vid = heapq.heappop(heap)
            values = self._keys.get(key)
            if values is None or (stored := values.get(vid)) is None or stored.gen != gen:
                continue
            self._delete(key, values, vid)
            expired.setdefault(key, []).append(vid)
        return list(expired.items())

    def next_expiration(self) -> float | None:
        """When the earliest stored value expires (None if none will): the time to call :meth:`expire`."""
        heap = self._heap
        while heap:
            if self._live(heap[0]):
                return heap[0][0]
            heapq.heappop(heap)
        return None

    # -- policies -----------------------------------------------------------------------------------------

    def _verified(self, value: Value) -> bool:
        if self._verify is None:
            return True
        try:
            return bool(self._verify(value))
        except Exception:  # a malformed owner key or signature is a refusal, never a crash
            return False

    def _store_policy(self, value: Value) -> Refusal | None:
        """OpenDHT's store policy for a new value id (size is checked before)."""
        if value.type in SECURED_TYPES and value.is_signed and not self._verified(value):
            return Refusal.BAD_SIGNATURE
        if value.type == DHT_MESSAGE_TYPE and _empty_service(value.data):
            return Refusal.POLICY
        return None

    def _may_edit(self, old: Value, new: Value) -> bool:
        """OpenDHT's edit policy of the stored value's type, for a put of different content."""
        if old.type in SECURED_TYPES:
            if not (old.is_signed and new.is_signed and new.owner == old.owner):
                return False
            if new.seq < old.seq or (new.seq == old.seq and new.signed_bytes() != old.signed_bytes()):
                return False
            return self._verified(new)
        if old.type == CERTIFICATE_TYPE:
            return new.owner == old.owner
        return False

    def _local_room(self, extra: int) -> bool:
        return self.max_local_bytes < 0 or self._local_bytes + extra <= self.max_local_bytes

    # -- bookkeeping --------------------------------------------------------------------------------------

    def _live(self, entry: _Entry) -> bool:
        values = self._keys.get(entry[2])
        stored = values.get(entry[3]) if values is not None else None
        return stored is not None and stored.gen == entry[1]

    def _account(self, key: InfoHash, stored: StoredValue) -> None:
        """Count a stored value in totals, quota and expiry heaps, under a fresh generation."""
        self._gen += 1
        stored.gen = self._gen
        self._value_count += 1
        entry = (stored.expiration, stored.gen, key, stored.value.id)
        if stored.expiration != NEVER:
            self._timed += 1
            heapq.heappush(self._heap, entry)
            if len(self._heap) > 2 * self._timed + _HEAP_SLACK:
                self._heap = self._compacted(self._heap)
        name = stored.bucket
        if name is None:
            self._local_bytes += stored.size
            return
        self._remote_bytes += stored.size
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = _Bucket()
        bucket.usage += stored.size
        bucket.count += 1
        heapq.heappush(bucket.heap, entry)
        if len(bucket.heap) > 2 * bucket.count + _BUCKET_HEAP_SLACK:
            bucket.heap = self._compacted(bucket.heap)
        heapq.heappush(self._usage_heap, (-bucket.usage, name))
        if len(self._usage_heap) > 2 * len(self._buckets) + _HEAP_SLACK:
            self._usage_heap = [(-b.usage, n) for n, b in self._buckets.items()]
            heapq.heapify(self._usage_heap)

    def _unaccount(self, stored: StoredValue) -> None:
        """Undo :meth:`_account` (heap entries go stale and are dropped lazily)."""
        self._value_count -= 1
        if stored.expiration != NEVER:
            self._timed -= 1
        name = stored.bucket
        if name is None:
            self._local_bytes -= stored.size
            return
        self._remote_bytes -= stored.size
        bucket = self._buckets[name]
        bucket.usage -= stored.size
        bucket.count -= 1
        if bucket.count == 0:
            del self._buckets[name]

    def _compacted(self, heap: list[_Entry]) -> list[_Entry]:
        live = [e for e in heap if self._live(e)]
        heapq.heapify(live)
        return live

    def _replace(
        self, key: InfoHash, stored: StoredValue, value: Value, expiration: float, bucket: str | None
    ) -> None:
        self._unaccount(stored)
        stored.value = value
        stored.size = value.size
        stored.expiration = expiration
        stored.bucket = bucket
        self._account(key, stored)

    def _delete(self, key: InfoHash, values: dict[int, StoredValue], vid: int) -> None:
        stored = values.pop(vid)
        if not values:
            del self._keys[key]
        stored.gen = -1  # its heap entries are stale from now on
        self._unaccount(stored)
        if len(self._heap) > 2 * self._timed + _HEAP_SLACK:
            self._heap = self._compacted(self._heap)
        bucket = self._buckets.get(stored.bucket) if stored.bucket is not None else None
        if bucket is not None and len(bucket.heap) > 2 * bucket.count + _BUCKET_HEAP_SLACK:
            bucket.heap = self._compacted(bucket.heap)

    def _largest_bucket(self) -> str | None:
        """The source using the most bytes.

        The usage heap gets an entry each time a bucket grows, none when it shrinks, so every bucket has an
        entry at least as large as its usage: a top entry that equals its bucket's usage is the maximum.
        """
        heap = self._usage_heap
        while heap:
            neg_usage, name = heap[0]
            bucket = self._buckets.get(name)
            usage = bucket.usage if bucket is not None else 0
            if usage == -neg_usage and usage > 0:
                return name
            if usage > 0:
                heapq.heapreplace(heap, (-usage, name))
            else:
                heapq.heappop(heap)
        return None

    def _enforce_quota(self) -> list[tuple[InfoHash, int]]:
        """While remote values exceed the quota, evict the largest source's value that expires first."""
        evicted: list[tuple[InfoHash, int]] = []
        if self.max_total_bytes < 0:
            return evicted
        while self._remote_bytes > self.max_total_bytes:
            name = self._largest_bucket()
            if name is None:
                break
            heap = self._buckets[name].heap
            while heap and not self._live(heap[0]):
                heapq.heappop(heap)
            if not heap:  # cannot happen: every remote value has a live entry in its bucket
                break
            _, _, key, vid = heapq.heappop(heap)
            self._delete(key, self._keys[key], vid)
            evicted.append((key, vid))
        return evicted


_PLAIN_RESULTS = {outcome: PutResult(outcome) for outcome in PutOutcome}
"""Results without evictions or refusal (PutResult is frozen, so one of each is shared)."""
_REFUSALS = {refusal: PutResult(PutOutcome.REFUSED, (), refusal) for refusal in Refusal}


def _refused(refusal: Refusal) -> PutResult:
    return _REFUSALS[refusal]


def _empty_service(data: bytes) -> bool:
    """True if ``data`` is a DHT message ``[service, data]`` whose service is empty, STR or BIN (OpenDHT
    refuses it)."""
    try:
        obj = unpackb(data)
    except ValueError:  # not a DHT message: nothing to check
        return False
    return isinstance(obj, list) and len(obj) == 2 and (obj[0] == "" or obj[0] == b"")
