"""Restart delays: exponential from `restart_min_s` to `restart_max_s`, with ± jitter.

Jitter keeps a fleet whose services crashed together (a Redis outage) from restarting in lockstep.
"""

from __future__ import annotations

import random


def restart_delay_s(attempt: int, *, min_s: float, max_s: float, jitter: float,
                    rng: random.Random | None = None) -> float:
    """Delay before restart number `attempt` (1 = first restart after a crash)."""
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    base = min(max_s, min_s * 2.0 ** (attempt - 1))
    spread = (rng or random).uniform(-jitter, jitter)
    return max(0.0, min(max_s, base * (1.0 + spread)))
