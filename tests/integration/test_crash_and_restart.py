"""Process-level failures on a real redis-server: SIGKILL mid-handler, Redis restart with AOF."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from esper.core.redis_server import EmbeddedRedis
from esper.leyline import CHANNELS, pb
from esper.oona import Consumer, Delivery, OonaClient, OonaSettings, PublishError
from tests.conftest import ClientFactory
from tests.oona._helpers import pending_count, state, wait_until

WORKER = Path(__file__).with_name("crash_worker.py")
ROOT = Path(__file__).resolve().parents[2]
STREAM = CHANNELS["state"].stream("normal")


def _spawn(url: str, secret: str, stall_on: str, name: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(WORKER), url, secret, stall_on, name], env=env)


async def test_sigkill_mid_handler_is_reclaimed_and_effect_happens_once(
    make_client: ClientFactory, redis_url: str, secret: str
) -> None:
    pub = await make_client("trainer")
    r = pub.redis
    a = _spawn(redis_url, secret, "p3", "worker-a")
    b: subprocess.Popen[bytes] | None = None
    try:
        await wait_until(lambda: _exists(r, "ready:worker-a"), what="worker a ready")
        for i in range(3):
            await pub.publish("state", state(i))
        await pub.publish("state", state(3))  # worker-a stalls on this one
        await wait_until(lambda: _exists(r, "started:p3"), what="worker a inside the handler")
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=10)
        assert await r.hget("effects", "p3") is None, "effect must not have happened before the kill"
        assert await pending_count(r, STREAM, "tamiyo") == 1
        for i in range(4, 8):
            await pub.publish("state", state(i))
        b = _spawn(redis_url, secret, "never", "worker-b")
        # The completion counter is a handler's last write and the ack comes after the handler: once
        # nothing is pending every handler has finished, so the counts read then are final (reading
        # them when the 8th *effect* appeared raced the last handler's counter on a loaded machine).
        await wait_until(lambda: _hlen(r, "completions", 8), timeout_s=20, what="worker b reclaimed and finished")
        await wait_until(lambda: _pending_zero(r), what="nothing pending")
        completions = {k.decode(): int(v) for k, v in (await r.hgetall("completions")).items()}
        assert completions == {f"p{i}": 1 for i in range(8)}, completions
        assert (await r.hget("effects", "p3")) == b"worker-b"
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(timeout=10)


async def _exists(r: object, key: str) -> bool:
    return bool(await r.exists(key))  # type: ignore[attr-defined]


async def _hlen(r: object, key: str, n: int) -> bool:
    return int(await r.hlen(key)) >= n  # type: ignore[attr-defined]


async def _pending_zero(r: object) -> bool:
    return await pending_count(r, STREAM, "tamiyo") == 0  # type: ignore[arg-type]


@pytest.fixture
async def aof_redis(tmp_path: Path) -> AsyncIterator[EmbeddedRedis]:
    server = EmbeddedRedis(data_dir=tmp_path, appendonly=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_consumer_survives_redis_restart_and_nothing_acked_is_lost(aof_redis: EmbeddedRedis) -> None:
    settings = OonaSettings(redis_url=aof_redis.url, leyline_secret=secrets.token_hex(16), block_ms=50,
                            visibility_timeout_ms=300, claim_interval_ms=100, metrics_port=-1)
    pub = OonaClient.from_settings(settings, sender="trainer")
    sub = OonaClient.from_settings(settings, sender="tamiyo")
    await pub.connect()
    await sub.connect()
    handled: list[str] = []

    async def handler(d: Delivery) -> None:
        handled.append(d.message_as(pb.SystemStatePacket).packet_id)

    consumer = Consumer(sub, "state", group="tamiyo", handler=handler)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        for i in range(20):
            await pub.publish("state", state(i))
        await wait_until(lambda: _count(handled, 20), what="first batch handled")
        await asyncio.to_thread(aof_redis.restart)
        await pub.connect()
        for i in range(20, 40):
            await pub.publish("state", state(i))
        await wait_until(lambda: _count(handled, 40), timeout_s=30, what="second batch handled after restart")
        assert handled == [f"p{i}" for i in range(40)], "a message was lost or re-handled"
        assert consumer.stats.reconnects >= 1
        assert await pending_count(sub.redis, STREAM, "tamiyo") == 0
    finally:
        stop.set()
        await task
        await pub.close()
        await sub.close()


async def _count(items: list[str], n: int) -> bool:
    return len(items) >= n


async def test_ack_that_failed_to_reach_redis_is_kept_and_flushed_later(aof_redis: EmbeddedRedis) -> None:
    """Redis dies between the handler's effect and the XACK: the ack must not be forgotten."""
    settings = OonaSettings(redis_url=aof_redis.url, leyline_secret=secrets.token_hex(16), block_ms=50,
                            redis_retries=0, metrics_port=-1)
    client = OonaClient.from_settings(settings, sender="tamiyo")
    await client.connect()
    effects: list[str] = []

    async def handler(d: Delivery) -> None:
        effects.append(d.message_id)
        await asyncio.to_thread(aof_redis.stop)  # the effect happened; now the ack cannot be written

    consumer = Consumer(client, "state", group="tamiyo", handler=handler)
    await consumer.start()
    published = await client.publish("state", state(1))
    with pytest.raises(Exception, match=r"(?i)connect|closed|refused|reset"):
        await consumer.run_once(block_ms=0)
    assert effects == [published.message_id]
    assert consumer._acks, "the unconfirmed ack was dropped"
    await asyncio.to_thread(aof_redis.start)
    await client.connect()
    await consumer.close()  # flushes the kept ack
    assert await pending_count(client.redis, STREAM, "tamiyo") == 0
    await client.close()


async def test_publish_breaker_opens_on_redis_loss_and_fails_fast(tmp_path: Path) -> None:
    server = EmbeddedRedis(data_dir=tmp_path)
    server.start()
    settings = OonaSettings(redis_url=server.url, leyline_secret=secrets.token_hex(16), redis_retries=0,
                            breaker_failures=3, breaker_reset_s=60, socket_timeout_s=0.5, connect_timeout_s=0.5,
                            metrics_port=-1)
    client = OonaClient.from_settings(settings, sender="tolaria")
    try:
        await client.connect()
        await client.publish("telemetry", pb.TelemetryPacket(packet_id="ok"))
        server.stop()
        for _ in range(3):
            with pytest.raises(PublishError, match="XADD"):
                await client.publish("telemetry", pb.TelemetryPacket(packet_id="lost"))
        assert client.publish_breaker.state == pb.CIRCUIT_STATE_OPEN
        with pytest.raises(PublishError, match="breaker open"):
            await client.publish("telemetry", pb.TelemetryPacket(packet_id="fast-fail"))
        assert client.metrics.breaker_state.labels("publish")._value.get() == pb.CIRCUIT_STATE_OPEN
        assert client.metrics.publish_errors.labels("telemetry", "breaker_open")._value.get() == 1
    finally:
        await client.close()
        server.stop()
