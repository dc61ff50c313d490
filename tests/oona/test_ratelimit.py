"""Emergency-lane token bucket with an injected clock (prototype: 120/min, refilled continuously)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.oona.ratelimit import TokenBucket


def _clock(start: float = 100.0) -> tuple[list[float], Callable[[], float]]:
    """A settable clock: tests move time by writing now[0]; the bucket reads it through the function."""
    now = [start]

    def clock() -> float:
        return now[0]

    return now, clock


def test_starts_full_at_capacity() -> None:
    _, clock = _clock()
    bucket = TokenBucket(120, clock=clock)
    assert bucket.tokens == 120
    assert sum(bucket.try_take() for _ in range(200)) == 120, "exactly per_minute takes without time passing"
    assert not bucket.try_take()
    assert bucket.tokens == 0


def test_refills_at_per_minute_over_sixty_per_second() -> None:
    now, clock = _clock()
    bucket = TokenBucket(120, clock=clock)  # 2 tokens per second
    while bucket.try_take():
        pass
    now[0] += 0.25
    assert bucket.tokens == pytest.approx(0.5)
    assert not bucket.try_take(), "half a token is not a token"
    now[0] += 0.25
    assert bucket.tokens == pytest.approx(1.0)
    assert bucket.try_take()
    assert not bucket.try_take()
    now[0] += 30.0
    assert bucket.tokens == pytest.approx(60.0)
    assert sum(bucket.try_take() for _ in range(100)) == 60


def test_slow_rate() -> None:
    now, clock = _clock()
    bucket = TokenBucket(1, clock=clock)  # one token a minute
    assert bucket.try_take()
    now[0] += 59.0
    assert not bucket.try_take()
    now[0] += 1.0
    assert bucket.try_take()


def test_never_above_capacity() -> None:
    now, clock = _clock()
    bucket = TokenBucket(10, clock=clock)
    now[0] += 3600.0
    assert bucket.tokens == 10
    assert sum(bucket.try_take() for _ in range(20)) == 10
    bucket2 = TokenBucket(10, clock=clock)
    assert bucket2.try_take(3)
    now[0] += 1e9
    assert bucket2.tokens == 10


def test_multi_token_takes() -> None:
    now, clock = _clock()
    bucket = TokenBucket(60, clock=clock)  # 1 token per second
    assert not bucket.try_take(61), "more than capacity never fits"
    assert bucket.tokens == 60, "a refused take consumes nothing"
    assert bucket.try_take(60)
    assert not bucket.try_take(1)
    now[0] += 5.0
    assert not bucket.try_take(6)
    assert bucket.try_take(5)
    assert bucket.tokens == pytest.approx(0.0)


def test_time_standing_still_adds_nothing() -> None:
    _, clock = _clock()
    bucket = TokenBucket(5, clock=clock)
    assert bucket.try_take(5)
    for _ in range(10):
        assert bucket.tokens == 0
        assert not bucket.try_take()


@pytest.mark.parametrize("per_minute", [0, -1, -120])
def test_per_minute_must_be_positive(per_minute: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(per_minute)


def test_default_clock_is_monotonic() -> None:
    bucket = TokenBucket(120)
    assert bucket.try_take()
    assert 119 <= bucket.tokens <= 120


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 600),
    st.lists(st.tuples(st.floats(0.0, 30.0, allow_nan=False), st.integers(1, 5)), max_size=60),
)
def test_takes_never_exceed_capacity_plus_refill(per_minute: int, ops: list[tuple[float, int]]) -> None:
    now, clock = _clock(0.0)
    bucket = TokenBucket(per_minute, clock=clock)
    taken = 0
    for dt, n in ops:
        now[0] += dt
        if bucket.try_take(n):
            taken += n
        assert -1e-9 <= bucket.tokens <= per_minute
    assert taken <= per_minute + now[0] * per_minute / 60.0 + 1e-6
