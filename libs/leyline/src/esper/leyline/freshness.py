"""Freshness window and replay cache: the receive-side checks after the signature.

Replay detection only has to remember ids for as long as the freshness window accepts a message:
anything older is refused as stale anyway. So the cache is bounded by count *and* age, and the
window must not exceed the cache TTL (checked at construction by the caller's settings).
"""

from __future__ import annotations

from collections import OrderedDict

from esper.leyline._generated import leyline_pb2 as pb
from esper.leyline.errors import FreshnessError, ReplayError

DEFAULT_FRESHNESS_WINDOW_MS = 60_000  # prototype: Weatherlight's freshness 60 s
DEFAULT_MAX_CLOCK_SKEW_MS = 5_000  # prototype: commands more than 5 s ahead are rejected


def check_freshness(
    env: pb.BusEnvelope,
    *,
    now_ms: int,
    window_ms: int = DEFAULT_FRESHNESS_WINDOW_MS,
    max_skew_ms: int = DEFAULT_MAX_CLOCK_SKEW_MS,
) -> None:
    """Refuse envelopes that are undated, too old, from the future, or past their deadline.

    Age is measured at receipt. (Not at the stream entry id's time: any client can XADD with an
    explicit old id on a quiet stream, which would let a captured envelope outlive the replay cache.)
    Consumers of durable channels that must survive an outage-length backlog take a longer window.
    """
    if env.issued_at_ms == 0:
        raise FreshnessError("envelope has no issued_at_ms", reason=pb.DEAD_LETTER_REASON_STALE)
    age_ms = now_ms - env.issued_at_ms
    if age_ms > window_ms:
        raise FreshnessError(f"issued {age_ms} ms ago, window is {window_ms} ms", reason=pb.DEAD_LETTER_REASON_STALE)
    if -age_ms > max_skew_ms:
        raise FreshnessError(
            f"issued {-age_ms} ms in the future, skew allowance is {max_skew_ms} ms",
            reason=pb.DEAD_LETTER_REASON_FROM_FUTURE,
        )
    if env.deadline_ms and now_ms > env.deadline_ms:
        raise FreshnessError(
            f"deadline passed {now_ms - env.deadline_ms} ms ago", reason=pb.DEAD_LETTER_REASON_EXPIRED
        )


class BoundedTTLMap:
    """Insertion-ordered map that forgets entries past `ttl_ms` or beyond `capacity` (oldest first)."""

    __slots__ = ("_capacity", "_forgotten_ms", "_items", "_ttl_ms")

    def __init__(self, *, capacity: int, ttl_ms: int) -> None:
        if capacity <= 0 or ttl_ms <= 0:
            raise ValueError("capacity and ttl_ms must be positive")
        self._capacity = capacity
        self._ttl_ms = ttl_ms
        self._items: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._forgotten_ms: int | None = None

    @property
    def forgotten_until_ms(self) -> int | None:
        """The newest put time of an entry dropped for capacity before its TTL ran out: a key put at or
        before it may have been forgotten early (None: nothing live was ever dropped)."""
        return self._forgotten_ms

    def __len__(self) -> int:
        """Entries held; expired ones are dropped on the next `put`."""
        return len(self._items)

    def _evict(self, now_ms: int) -> None:
        items = self._items
        while items:
            key, (_, at) = next(iter(items.items()))
            live = now_ms - at <= self._ttl_ms
            if len(items) <= self._capacity and live:
                break
            if live:
                self._forgotten_ms = at if self._forgotten_ms is None else max(self._forgotten_ms, at)
            del items[key]

    def get(self, key: str, now_ms: int) -> str | None:
        # Expiry is checked on the hit alone; bulk eviction happens on put (hot path: one lookup).
        hit = self._items.get(key)
        if hit is None or now_ms - hit[1] > self._ttl_ms:
            return None
        return hit[0]

    def put(self, key: str, value: str, now_ms: int) -> None:
        self._items[key] = (value, now_ms)
        self._items.move_to_end(key)
        self._evict(now_ms)


class ReplayCache:
    """Remembers which stream entry first carried each message_id.

    The same id in the *same* entry is a redelivery (crash, reclaim) and is allowed through to the
    idempotency check; the same id in a *different* entry is a replay and is refused.
    """

    __slots__ = ("_seen",)

    def __init__(self, *, capacity: int = 4096, ttl_ms: int = 2 * DEFAULT_FRESHNESS_WINDOW_MS) -> None:
        self._seen = BoundedTTLMap(capacity=capacity, ttl_ms=ttl_ms)

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, message_id: str, entry_id: str, now_ms: int) -> None:
        first = self._seen.get(message_id, now_ms)
        if first is None:
            self._seen.put(message_id, entry_id, now_ms)
        elif first != entry_id:
            raise ReplayError(f"message_id {message_id} already arrived in entry {first}")
