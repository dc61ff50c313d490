"""Token bucket for the emergency lane (prototype: 120 per minute, refilled continuously)."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """`per_minute` tokens of capacity, refilled at per_minute/60 per second. Pure; clock injected."""

    __slots__ = ("_capacity", "_clock", "_last", "_rate_per_s", "_tokens")

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute <= 0:
            raise ValueError("per_minute must be positive")
        self._capacity = float(per_minute)
        self._rate_per_s = per_minute / 60.0
        self._tokens = float(per_minute)
        self._clock = clock
        self._last = clock()

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate_per_s)
        self._last = now

    def try_take(self, n: int = 1) -> bool:
        self._refill()
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False
