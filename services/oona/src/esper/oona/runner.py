"""The process shape most bus services share: logging, SIGTERM lifecycle, connect, /metrics and
/healthz, a heartbeat, the service's own loops, a drain, and a close that always runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from esper.core.health_server import HealthServer, Route
from esper.core.heartbeat import Heartbeat
from esper.core.lifecycle import Lifecycle
from esper.core.logging import configure_logging, get_logger
from esper.oona.client import OonaClient
from esper.oona.settings import OonaSettings

log = get_logger("esper.oona.runner")

Loops = Callable[[asyncio.Event], list[Coroutine[Any, Any, None]]]
HealthCheck = Callable[[], tuple[bool, Mapping[str, object]]]


async def run_bus_service(name: str, settings: OonaSettings, *, client: OonaClient, registry: CollectorRegistry,
                          health: HealthCheck, loops: Loops, close: Callable[[], None] = lambda: None,
                          ready: Mapping[str, object] | None = None,
                          routes: Mapping[str, Route] | None = None) -> int:
    """Run `loops(stop)` until SIGTERM, then drain them; `close` releases the service's own resources
    (files, stores) after the loops ended, before the bus client closes. `routes` are extra GET paths
    served beside /metrics and /healthz (Nissa's /alerts)."""
    configure_logging(level=settings.log_level, fmt=settings.log_format, service=name)
    life = Lifecycle(name, drain_timeout_s=settings.drain_timeout_s)
    life.install_signal_handlers()
    http: HealthServer | None = None
    try:
        await client.connect()
        if settings.metrics_port >= 0:
            http = HealthServer(registry, health, host=settings.metrics_host, port=settings.metrics_port,
                                routes=routes)
            await http.start()
        beat = Heartbeat(client.redis, name, settings.instance_id, interval_s=settings.heartbeat_interval_s,
                         ttl_s=settings.heartbeat_ttl_s)
        stop = life.stop_event
        tasks = [asyncio.create_task(c) for c in (*loops(stop), beat.run(stop))]
        log.info(f"{name} ready", **dict(ready or {}))
        await life.wait_stopped()
        await life.drain(tasks)
    finally:
        if http is not None:
            await http.stop()
        close()
        await client.close()
        log.info(f"{name} stopped")
    return 0
