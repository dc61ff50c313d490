"""Wall-clock helpers: epoch milliseconds are what goes on the wire (``issued_at_ms``, ``deadline_ms``)."""

from __future__ import annotations

import time

__all__ = ["now_ms"]


def now_ms() -> int:
    """Current wall-clock time in integer milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000
