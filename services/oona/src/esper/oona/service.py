"""`python -m esper.oona run`: the stream keeper process (uvloop, SIGTERM drain, /metrics, heartbeat)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from prometheus_client import CollectorRegistry

from esper.core.health_server import HealthServer
from esper.core.heartbeat import Heartbeat
from esper.core.lifecycle import Lifecycle
from esper.core.logging import configure_logging, get_logger
from esper.oona.client import OonaClient
from esper.oona.connection import RETRYABLE
from esper.oona.keeper import StreamKeeper
from esper.oona.metrics import OonaMetrics
from esper.oona.settings import OonaSettings

log = get_logger("esper.oona.service")


async def serve(settings: OonaSettings) -> int:
    configure_logging(level=settings.log_level, fmt=settings.log_format, service=settings.service_name)
    life = Lifecycle(settings.service_name, drain_timeout_s=settings.drain_timeout_s)
    life.install_signal_handlers()
    registry = CollectorRegistry()
    client = OonaClient.from_settings(settings, metrics=OonaMetrics(registry))
    await client.connect()
    keeper = StreamKeeper(client, registry=registry)
    await keeper.ensure_all()
    state = {"last_tick_ok": "false"}

    def health() -> tuple[bool, Mapping[str, object]]:
        return state["last_tick_ok"] == "true", dict(state)

    http: HealthServer | None = None
    if settings.metrics_port >= 0:
        http = HealthServer(registry, health, host=settings.metrics_host, port=settings.metrics_port)
        await http.start()
        log.info("metrics listening", host=settings.metrics_host, port=http.port)
    beat = Heartbeat(client.redis, settings.service_name, settings.instance_id,
                     interval_s=settings.heartbeat_interval_s, ttl_s=settings.heartbeat_ttl_s,
                     status=lambda: dict(state))
    beat_task = asyncio.create_task(beat.run(life.stop_event))
    log.info("oona keeper started", redis=settings.redis_url)
    try:
        while not life.stopping:
            try:
                result = await keeper.tick()
                state.update(last_tick_ok="true", dead_lettered=str(result.dead_lettered))
            except RETRYABLE as e:
                state["last_tick_ok"] = "false"
                log.warning("keeper tick failed; retrying next interval", error=str(e))
            try:
                async with asyncio.timeout(settings.keeper_interval_s):
                    await life.wait_stopped()
            except TimeoutError:
                pass
    finally:
        await asyncio.gather(beat_task, return_exceptions=True)
        if http is not None:
            await http.stop()
        await client.close()
        log.info("oona keeper stopped")
    return 0
