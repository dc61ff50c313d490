"""Shared fixtures: a real redis-server per test session (never the system one on 6379).

`ESPER_TEST_REDIS_URL` points the suite at an existing, *disposable* Redis instead (it is FLUSHDB'd
before every test). It is deliberately not `ESPER_REDIS_URL`, which users export to run the fleet:
a test run must never wipe their Redis. Otherwise a private `redis-server` is spawned on a free
loopback port.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry
from redis import Redis as SyncRedis

from esper.core.redis_server import EmbeddedRedis
from esper.oona import OonaClient, OonaMetrics, OonaSettings


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    external = os.environ.get("ESPER_TEST_REDIS_URL")
    if external:
        yield external
        return
    server = EmbeddedRedis()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _flush(request: pytest.FixtureRequest) -> None:
    if "redis_url" not in request.fixturenames:
        return
    url = request.getfixturevalue("redis_url")
    with SyncRedis.from_url(url) as r:
        r.flushdb()


@pytest.fixture
def secret() -> str:
    return secrets.token_hex(16)


@pytest.fixture
def settings(redis_url: str, secret: str) -> OonaSettings:
    return OonaSettings(
        redis_url=redis_url,
        leyline_secret=secret,
        visibility_timeout_ms=300,
        claim_interval_ms=100,
        block_ms=50,
        max_deliveries=3,
        metrics_port=-1,
    )


ClientFactory = Callable[..., Awaitable[OonaClient]]


@pytest.fixture
async def make_client(settings: OonaSettings) -> AsyncIterator[ClientFactory]:
    """Factory of connected clients (fresh metrics registry each); all closed at teardown."""
    made: list[OonaClient] = []

    async def make(sender: str = "test", **overrides: object) -> OonaClient:
        s = settings.model_copy(update=overrides) if overrides else settings
        client = OonaClient.from_settings(s, sender=sender, metrics=OonaMetrics(CollectorRegistry()))
        await client.connect()
        made.append(client)
        return client

    yield make
    for c in made:
        await c.close()
