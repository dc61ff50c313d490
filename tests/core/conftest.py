"""Shared fixtures: one private redis-server per session (never the system one on 6379)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio

from esper.core.redis_server import EmbeddedRedis


@pytest.fixture(scope="session")
def embedded_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
async def redis_client(embedded_redis: EmbeddedRedis) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(embedded_redis.url, decode_responses=True)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()
