"""Freshness window, clock skew, deadlines, and the bounded replay cache."""

from __future__ import annotations

import pytest

from esper.leyline import (
    DEFAULT_FRESHNESS_WINDOW_MS,
    DEFAULT_MAX_CLOCK_SKEW_MS,
    BoundedTTLMap,
    EnvelopeError,
    FreshnessError,
    ReplayCache,
    ReplayError,
    check_freshness,
    pb,
)

from .samples import NOW_MS

WINDOW = DEFAULT_FRESHNESS_WINDOW_MS
SKEW = DEFAULT_MAX_CLOCK_SKEW_MS


def _env(issued_at_ms: int = NOW_MS, deadline_ms: int = 0) -> pb.BusEnvelope:
    return pb.BusEnvelope(message_id="m", issued_at_ms=issued_at_ms, deadline_ms=deadline_ms)


def _reason(env: pb.BusEnvelope, now_ms: int = NOW_MS, **kw: int) -> pb.DeadLetterReason.ValueType:
    with pytest.raises(FreshnessError) as exc:
        check_freshness(env, now_ms=now_ms, **kw)
    assert isinstance(exc.value, EnvelopeError)
    return exc.value.reason


def test_prototype_defaults() -> None:
    assert DEFAULT_FRESHNESS_WINDOW_MS == 60_000
    assert DEFAULT_MAX_CLOCK_SKEW_MS == 5_000


def test_fresh_envelope_passes() -> None:
    check_freshness(_env(), now_ms=NOW_MS)
    check_freshness(_env(NOW_MS - 1), now_ms=NOW_MS)


def test_stale_beyond_window() -> None:
    check_freshness(_env(NOW_MS - WINDOW), now_ms=NOW_MS)  # exactly at the window edge: accepted
    assert _reason(_env(NOW_MS - WINDOW - 1)) == pb.DEAD_LETTER_REASON_STALE
    assert _reason(_env(NOW_MS - 10 * WINDOW)) == pb.DEAD_LETTER_REASON_STALE


def test_custom_window() -> None:
    check_freshness(_env(NOW_MS - 100), now_ms=NOW_MS, window_ms=100)
    assert _reason(_env(NOW_MS - 101), window_ms=100) == pb.DEAD_LETTER_REASON_STALE


def test_from_the_future_beyond_skew() -> None:
    check_freshness(_env(NOW_MS + SKEW), now_ms=NOW_MS)  # within skew: accepted
    check_freshness(_env(NOW_MS + 1), now_ms=NOW_MS)
    assert _reason(_env(NOW_MS + SKEW + 1)) == pb.DEAD_LETTER_REASON_FROM_FUTURE
    assert _reason(_env(NOW_MS + 11), max_skew_ms=10) == pb.DEAD_LETTER_REASON_FROM_FUTURE
    check_freshness(_env(NOW_MS + 10), now_ms=NOW_MS, max_skew_ms=10)


def test_missing_issued_at_is_refused() -> None:
    assert _reason(_env(0)) == pb.DEAD_LETTER_REASON_STALE
    # Even with a clock near zero and a huge window, an undated envelope is never accepted.
    assert _reason(_env(0), now_ms=1, window_ms=10**12) == pb.DEAD_LETTER_REASON_STALE


def test_expired_deadline() -> None:
    check_freshness(_env(deadline_ms=NOW_MS), now_ms=NOW_MS)  # deadline == now: still on time
    check_freshness(_env(deadline_ms=NOW_MS + 5), now_ms=NOW_MS)
    assert _reason(_env(deadline_ms=NOW_MS - 1)) == pb.DEAD_LETTER_REASON_EXPIRED
    check_freshness(_env(deadline_ms=0), now_ms=NOW_MS)  # 0 means no deadline


def test_freshness_error_reason_codes() -> None:
    with pytest.raises(FreshnessError) as exc:
        check_freshness(_env(deadline_ms=NOW_MS - 1), now_ms=NOW_MS)
    assert exc.value.reason_name == "expired"


# -- ReplayCache -----------------------------------------------------------------------------------


def test_replay_same_entry_is_a_redelivery() -> None:
    cache = ReplayCache()
    cache.check("m1", "1-0", NOW_MS)
    cache.check("m1", "1-0", NOW_MS + 1)  # XAUTOCLAIM / crash redelivery of the same entry
    assert len(cache) == 1


def test_replay_different_entry_is_refused() -> None:
    cache = ReplayCache()
    cache.check("m1", "1-0", NOW_MS)
    with pytest.raises(ReplayError) as exc:
        cache.check("m1", "2-0", NOW_MS + 1)
    assert exc.value.reason == pb.DEAD_LETTER_REASON_REPLAYED
    # The refused replay does not take over: the first entry is still the legitimate one.
    cache.check("m1", "1-0", NOW_MS + 2)
    with pytest.raises(ReplayError):
        cache.check("m1", "2-0", NOW_MS + 3)
    cache.check("m2", "2-0", NOW_MS + 4)  # another id is independent


def test_replay_forgotten_after_ttl() -> None:
    cache = ReplayCache(capacity=100, ttl_ms=100)
    cache.check("m1", "1-0", NOW_MS)
    with pytest.raises(ReplayError):
        cache.check("m1", "2-0", NOW_MS + 100)  # still within TTL
    cache.check("m1", "3-0", NOW_MS + 101)  # forgotten: accepted (freshness refuses it anyway)
    with pytest.raises(ReplayError):
        cache.check("m1", "1-0", NOW_MS + 150)  # now entry 3-0 is the one remembered


def test_replay_forgotten_when_capacity_exceeded() -> None:
    cache = ReplayCache(capacity=2, ttl_ms=10**9)
    cache.check("m1", "1-0", NOW_MS)
    cache.check("m2", "2-0", NOW_MS)
    cache.check("m3", "3-0", NOW_MS)
    assert len(cache) == 2
    cache.check("m1", "9-0", NOW_MS)  # m1 was the oldest and was evicted
    with pytest.raises(ReplayError):
        cache.check("m3", "9-1", NOW_MS)


def test_replay_cache_default_ttl_covers_the_window() -> None:
    cache = ReplayCache()
    cache.check("m1", "1-0", NOW_MS)
    with pytest.raises(ReplayError):
        cache.check("m1", "2-0", NOW_MS + DEFAULT_FRESHNESS_WINDOW_MS + SKEW)


# -- BoundedTTLMap ---------------------------------------------------------------------------------


def test_ttl_map_rejects_non_positive_bounds() -> None:
    for capacity, ttl in ((0, 1), (1, 0), (-1, 5), (5, -1)):
        with pytest.raises(ValueError):
            BoundedTTLMap(capacity=capacity, ttl_ms=ttl)


def test_ttl_map_evicts_oldest_insertion_first() -> None:
    m = BoundedTTLMap(capacity=3, ttl_ms=10**9)
    for key in ("a", "b", "c"):
        m.put(key, key.upper(), 0)
    m.put("d", "D", 0)
    assert m.get("a", 0) is None
    assert [m.get(k, 0) for k in "bcd"] == ["B", "C", "D"]
    m.put("b", "B2", 1)  # re-put refreshes b to the newest position
    m.put("e", "E", 1)
    assert m.get("c", 1) is None, "c is now the oldest and goes first"
    assert [m.get(k, 1) for k in "bde"] == ["B2", "D", "E"]
    m.put("f", "F", 2)
    assert m.get("d", 2) is None
    assert len(m) == 3


def test_ttl_map_expires_by_age() -> None:
    m = BoundedTTLMap(capacity=10, ttl_ms=100)
    m.put("a", "1", 0)
    m.put("b", "2", 50)
    assert m.get("a", 100) == "1"  # age == ttl: kept
    assert m.get("a", 101) is None
    assert m.get("b", 101) == "2"
    assert m.get("b", 151) is None
    m.put("c", "3", 151)  # expired entries are dropped on the next put
    assert len(m) == 1


def test_ttl_map_put_evicts_expired_entries() -> None:
    m = BoundedTTLMap(capacity=10, ttl_ms=100)
    for i in range(5):
        m.put(f"k{i}", "v", i)
    m.put("late", "v", 1_000)
    assert len(m) == 1
