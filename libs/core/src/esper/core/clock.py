"""Wall-clock helpers: epoch milliseconds are what goes on the wire (``issued_at_ms``, ``deadline_ms``)."""

from __future__ import annotations

import asyncio
import contextlib
import time

__all__ = ["now_ms", "sleep_or_stop"]


def now_ms() -> int:
    """Current wall-clock time in integer milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Wait `seconds`, or less when `stop` is set first: the pause of every periodic service loop."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
