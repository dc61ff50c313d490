"""Deadlines that travel on the wire as epoch ms but are waited on with the monotonic clock.

A deadline is born from a wall-clock instant (``deadline_ms`` on an envelope) or a budget. Once
built it is pinned to ``time.monotonic`` so an NTP step or a suspended laptop cannot stretch or
shrink an in-process wait; only the conversion at construction uses the wall clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

from esper.core.clock import now_ms
from esper.core.errors import DeadlineExceededError

__all__ = ["Deadline", "wait_for"]

T = TypeVar("T")


class Deadline:
    """An absolute time limit; build it with :meth:`after_ms` or :meth:`at_epoch_ms`."""

    __slots__ = ("_epoch_ms", "_expires_monotonic")

    def __init__(self, epoch_ms: int, expires_monotonic: float) -> None:
        self._epoch_ms = epoch_ms
        self._expires_monotonic = expires_monotonic

    @classmethod
    def after_ms(cls, ms: float) -> Deadline:
        """A deadline ``ms`` milliseconds from now."""
        return cls(now_ms() + round(ms), time.monotonic() + ms / 1000.0)

    @classmethod
    def at_epoch_ms(cls, epoch_ms: int) -> Deadline:
        """A deadline at a wall-clock instant, e.g. an envelope's ``deadline_ms``."""
        return cls(epoch_ms, time.monotonic() + (epoch_ms - now_ms()) / 1000.0)

    @property
    def epoch_ms(self) -> int:
        """Wall-clock expiry in epoch milliseconds: the value to put on the wire."""
        return self._epoch_ms

    def remaining_s(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self._expires_monotonic - time.monotonic())

    def remaining_ms(self) -> float:
        """Milliseconds left, never negative."""
        return self.remaining_s() * 1000.0

    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return time.monotonic() >= self._expires_monotonic

    def overdue_ms(self) -> float:
        """Milliseconds since the deadline passed (0 while it has not)."""
        return max(0.0, (time.monotonic() - self._expires_monotonic) * 1000.0)

    def check(self, what: str) -> None:
        """Raise :class:`DeadlineExceededError` naming ``what`` if the deadline has passed."""
        if self.expired():
            raise DeadlineExceededError(f"{what}: deadline passed {self.overdue_ms():.1f} ms ago")

    def __repr__(self) -> str:
        return f"Deadline(epoch_ms={self._epoch_ms}, remaining_ms={self.remaining_ms():.1f})"


async def wait_for(aw: Awaitable[T], deadline: Deadline, what: str) -> T:
    """Await ``aw`` until ``deadline``; on expiry cancel it and raise :class:`DeadlineExceededError`.

    A ``TimeoutError`` raised by ``aw`` itself propagates unchanged: only our own expiry is
    reported as a deadline miss.
    """
    timeout = asyncio.timeout(deadline.remaining_s())
    try:
        async with timeout:
            return await aw
    except TimeoutError as exc:
        if not timeout.expired():
            raise
        raise DeadlineExceededError(f"{what}: deadline passed {deadline.overdue_ms():.1f} ms ago") from exc
