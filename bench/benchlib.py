"""Helpers every benchmark script shares: percentiles, and what was measured (git, redis-server)."""

from __future__ import annotations

import math
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(samples)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[k]


def git_state() -> dict[str, Any]:
    """Which library code was measured (the tree may hold uncommitted edits)."""

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "libs", "services")
    return {"git_commit": git("rev-parse", "--short", "HEAD"), "git_library_dirty": bool(dirty)}


def redis_version(url: str) -> str:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()
