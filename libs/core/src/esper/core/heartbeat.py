"""Heartbeat keys: each process refreshes ``esper.heartbeat.<service>.<instance>`` with a TTL.

A key that exists means a live process; one that expired means a dead or wedged one. Supervisors
and compose health checks read them with :func:`check_health` (arq's health-key pattern).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Mapping

from redis.asyncio import Redis

from esper.core.clock import now_ms, sleep_or_stop
from esper.core.errors import ConfigurationError
from esper.core.logging import get_logger

__all__ = ["HEARTBEAT_KEY_PREFIX", "Heartbeat", "check_health", "heartbeat_key"]

HEARTBEAT_KEY_PREFIX = "esper.heartbeat"

_log = get_logger(__name__)


def heartbeat_key(service: str, instance: str) -> str:
    return f"{HEARTBEAT_KEY_PREFIX}.{service}.{instance}"


class Heartbeat:
    """Refreshes a heartbeat key every ``interval_s``; the key expires ``ttl_s`` after the last beat.

    The value is a small JSON object (``service``, ``instance``, ``ts_ms``, ``status``) where
    ``status`` comes from the optional callback, e.g. ``{"breaker": "OPEN"}``.
    """

    def __init__(
        self,
        redis: Redis,
        service: str,
        instance: str,
        *,
        interval_s: float = 5.0,
        ttl_s: float = 15.0,
        status: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        if interval_s <= 0 or ttl_s <= interval_s:
            raise ConfigurationError(f"heartbeat needs 0 < interval_s < ttl_s, got {interval_s} and {ttl_s}")
        self._redis = redis
        self._service = service
        self._instance = instance
        self._interval_s = interval_s
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._status = status
        self.key = heartbeat_key(service, instance)

    def payload(self) -> str:
        status = dict(self._status()) if self._status is not None else {}
        return json.dumps({"service": self._service, "instance": self._instance, "ts_ms": now_ms(), "status": status})

    async def beat_once(self) -> None:
        """Write the key once (raises on Redis errors; :meth:`run` is the forgiving loop)."""
        await self._redis.set(self.key, self.payload(), px=self._ttl_ms)

    async def clear(self) -> None:
        """Delete the key, so a clean exit is seen at once rather than after the TTL."""
        await self._redis.delete(self.key)

    async def run(self, stop: asyncio.Event) -> None:
        """Beat until ``stop`` is set, then delete the key. Errors are logged and retried, never raised."""
        while not stop.is_set():
            try:
                await self.beat_once()
            except Exception as exc:  # a heartbeat must outlive a Redis blip; the TTL reports real outages
                _log.warning("heartbeat failed", key=self.key, error=repr(exc))
            await sleep_or_stop(stop, self._interval_s)
        try:
            await self.clear()
        except Exception as exc:
            _log.warning("heartbeat clear failed", key=self.key, error=repr(exc))


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


async def check_health(redis: Redis, service: str) -> list[str]:
    """Sorted heartbeat keys of the live instances of ``service`` (empty: none alive)."""
    pattern = f"{_glob_escape(heartbeat_key(service, ''))}*"
    keys: set[str] = set()
    async for key in redis.scan_iter(match=pattern, count=1000):
        keys.add(key.decode() if isinstance(key, bytes) else str(key))
    return sorted(keys)
