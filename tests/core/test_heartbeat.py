"""Heartbeat keys in a real redis-server."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from esper.core.clock import now_ms
from esper.core.errors import ConfigurationError
from esper.core.heartbeat import Heartbeat, check_health, heartbeat_key
from esper.core.redis_server import free_port


async def get_required(client: redis.asyncio.Redis, key: str) -> str:
    value = await client.get(key)
    assert isinstance(value, str), f"{key} missing"
    return value


async def test_beat_once_writes_json_with_ttl(redis_client: redis.asyncio.Redis) -> None:
    beat = Heartbeat(redis_client, "oona", "host-1", interval_s=1.0, ttl_s=3.0, status=lambda: {"breaker": "CLOSED"})
    before = now_ms()
    await beat.beat_once()
    assert beat.key == "esper.heartbeat.oona.host-1"
    payload = json.loads(await get_required(redis_client, beat.key))
    assert payload["service"] == "oona"
    assert payload["instance"] == "host-1"
    assert payload["status"] == {"breaker": "CLOSED"}
    assert payload["ts_ms"] >= before
    assert 0 < await redis_client.pttl(beat.key) <= 3000


async def test_check_health_sees_live_instances_of_one_service(redis_client: redis.asyncio.Redis) -> None:
    assert await check_health(redis_client, "tamiyo") == []
    for instance in ("b", "a"):
        await Heartbeat(redis_client, "tamiyo", instance).beat_once()
    await Heartbeat(redis_client, "tamiyo-canary", "c").beat_once()
    await Heartbeat(redis_client, "oona", "a").beat_once()
    assert await check_health(redis_client, "tamiyo") == [heartbeat_key("tamiyo", "a"), heartbeat_key("tamiyo", "b")]


async def test_expired_heartbeat_is_not_live(redis_client: redis.asyncio.Redis) -> None:
    await Heartbeat(redis_client, "karn", "x", interval_s=0.01, ttl_s=0.05).beat_once()
    assert await check_health(redis_client, "karn") == ["esper.heartbeat.karn.x"]
    await asyncio.sleep(0.1)
    assert await check_health(redis_client, "karn") == []


async def test_run_beats_until_stopped_then_clears(redis_client: redis.asyncio.Redis) -> None:
    beats = 0
    third_beat = asyncio.Event()

    def status() -> dict[str, str]:
        nonlocal beats
        beats += 1
        if beats == 3:
            third_beat.set()
        return {"beats": str(beats)}

    stop = asyncio.Event()
    beat = Heartbeat(redis_client, "urza", "u1", interval_s=0.02, ttl_s=1.0, status=status)
    task = asyncio.create_task(beat.run(stop))
    async with asyncio.timeout(5):
        await third_beat.wait()
        await asyncio.sleep(0)  # let the third SET go out
        payload = json.loads(await get_required(redis_client, beat.key))
        assert int(payload["status"]["beats"]) >= 2
        stop.set()
        await task
    assert await redis_client.exists(beat.key) == 0


async def test_run_survives_unreachable_redis() -> None:
    dead = redis.asyncio.Redis(port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    try:
        stop = asyncio.Event()
        beat = Heartbeat(dead, "nissa", "n1", interval_s=0.01, ttl_s=1.0)
        task = asyncio.create_task(beat.run(stop))
        await asyncio.sleep(0.05)
        assert not task.done()
        stop.set()
        async with asyncio.timeout(5):
            await task  # returns normally: errors were logged, not raised
        with pytest.raises(redis.ConnectionError):
            await beat.beat_once()
    finally:
        await dead.aclose()


@pytest.mark.parametrize(("interval_s", "ttl_s"), [(0.0, 1.0), (5.0, 5.0), (5.0, 1.0)])
def test_rejects_ttl_not_above_interval(interval_s: float, ttl_s: float) -> None:
    with pytest.raises(ConfigurationError):
        Heartbeat(redis.asyncio.Redis(port=free_port()), "s", "i", interval_s=interval_s, ttl_s=ttl_s)
