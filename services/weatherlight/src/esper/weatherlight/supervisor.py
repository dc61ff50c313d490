"""The supervisor: a private Redis (or `ESPER_REDIS_URL`), every service as its own process, readiness,
restarts with backoff and jitter, the emergency lane, and a clean shutdown that leaves nothing behind.

Weatherlight starts processes; it imports none of the services it supervises (ARCHITECTURE §2). It
talks to them through their `/healthz` and through Oona like everyone else.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from esper.core.errors import ConfigurationError, EsperError
from esper.core.logging import get_logger
from esper.core.redis_server import EmbeddedRedis, free_port
from esper.core.telemetry import build_event, build_telemetry_packet
from esper.leyline import enum_name, pb
from esper.oona import Consumer, Delivery, OonaClient, OonaMetrics, PublishError
from esper.weatherlight.backoff import restart_delay_s
from esper.weatherlight.fleet import TRAINER, ServiceSpec, child_env
from esper.weatherlight.metrics import WeatherlightMetrics
from esper.weatherlight.mode import SystemMode
from esper.weatherlight.process import Child
from esper.weatherlight.settings import WeatherlightSettings

log = get_logger("esper.weatherlight.supervisor")


class StartupError(EsperError):
    """A service did not become ready (or died) during fleet start-up; the message names it and its log."""


@dataclass(slots=True)
class FleetOutcome:
    trainer_exit: int | None = None
    restarts: dict[str, int] = field(default_factory=dict)
    graceful: dict[str, bool] = field(default_factory=dict)
    redis_stopped: bool = True

    @property
    def clean_shutdown(self) -> bool:
        return all(self.graceful.values()) and self.redis_stopped


class Supervisor:
    def __init__(self, settings: WeatherlightSettings, services: list[ServiceSpec], *,
                 trainer_env: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None,
                 per_service_env: Mapping[str, Mapping[str, str]] | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.specs = services
        self.trainer_env = trainer_env
        self.base_env = dict(os.environ if env is None else env)
        self.per_service_env = per_service_env or {}
        self.registry = registry or CollectorRegistry()
        self.metrics = WeatherlightMetrics(self.registry)
        self.mode = SystemMode(settings.mode_hold_s)
        self.var_dir = settings.var_dir.resolve()
        self.log_dir = self.var_dir / "logs"
        self.redis: EmbeddedRedis | None = None
        self.redis_url = ""
        self.secret = ""
        self.client: OonaClient | None = None
        self.children: dict[str, Child] = {}
        self.trainer: Child | None = None
        self.trainer_done = asyncio.Event()
        self.outcome = FleetOutcome()
        self._restart_at: dict[str, float] = {}
        self._crashes: dict[str, int] = {}
        self._stopping = False
        self._started_at = time.monotonic()

    # -- start ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Redis, the bus client, then oona, then the other services together; each must answer
        /healthz (and its ready key) within `ready_timeout_s`, or start-up fails naming it."""
        self.var_dir.mkdir(parents=True, exist_ok=True)
        await self._start_redis()
        bus = self.settings.model_copy(update={"redis_url": self.redis_url, "leyline_secret": SecretStr(self.secret)})
        self.client = OonaClient.from_settings(bus, sender="weatherlight", metrics=OonaMetrics(self.registry))
        await self.client.connect()
        first = [s for s in self.specs if s.name == "oona"]
        rest = [s for s in self.specs if s.name != "oona"]
        for batch in (first, rest):
            for spec in batch:
                self._spawn(spec)
            await asyncio.gather(*(self._wait_ready(self.children[s.name]) for s in batch))

    async def _start_redis(self) -> None:
        s = self.settings
        if s.redis_url is not None:
            self.redis_url = s.redis_url
            self.secret = s.leyline_secret.get_secret_value() if s.leyline_secret else ""
            if not self.secret:
                raise ConfigurationError("ESPER_REDIS_URL is set, so ESPER_LEYLINE_SECRET must be too "
                                         "(a generated secret exists only for the embedded fleet)")
            return
        # AOF (fsync every second; a graceful restart loses nothing) so a Redis restart keeps the
        # streams and consumer groups: the restart drill proves no field report is lost.
        self.redis = EmbeddedRedis(appendonly=True, extra_args=("--appendfsync", "everysec"))
        await asyncio.to_thread(self.redis.start)
        self.redis_url = self.redis.url
        self.secret = s.leyline_secret.get_secret_value() if s.leyline_secret else secrets.token_hex(32)
        self.outcome.redis_stopped = False

    def _env_for(self, spec: ServiceSpec, port: int) -> dict[str, str]:
        overrides = dict(self.per_service_env.get(spec.name, {}))
        return child_env(self.base_env, redis_url=self.redis_url, secret=self.secret, var_dir=self.var_dir,
                         metrics_port=port, overrides=overrides)

    def _spawn(self, spec: ServiceSpec) -> Child:
        child = Child(spec, env=self._env_for(spec, free_port()), log_dir=self.log_dir, port=0, cwd=Path.cwd())
        child.port = int(child.env["ESPER_METRICS_PORT"])
        self.children[spec.name] = child
        child.start()
        log.info("service started", service=spec.name, pid=child.pid, metrics=f"http://127.0.0.1:{child.port}")
        return child

    async def _wait_ready(self, child: Child) -> None:
        deadline = time.monotonic() + self.settings.ready_timeout_s
        while not await child.ready():
            code = child.poll()
            if code is not None:
                raise StartupError(f"{child.name} exited with code {code} during start-up:\n{child.tail()}")
            if time.monotonic() > deadline:
                raise StartupError(f"{child.name} not ready after {self.settings.ready_timeout_s:.0f} s "
                                   f"(log {child.log_path}):\n{child.tail()}")
            await asyncio.sleep(self.settings.poll_s)
        log.info("service ready", service=child.name)

    def start_trainer(self, env: Mapping[str, str] | None = None) -> Child:
        """Start the fleet's job, the trainer; `trainer_done` is set when it exits (not restarted)."""
        overrides = {**(self.trainer_env or {}), **(env or {})}
        self.per_service_env = {**self.per_service_env, TRAINER.name: overrides}
        self.trainer = self._spawn(TRAINER)
        return self.trainer

    # -- watch ---------------------------------------------------------------------------------
    async def watch(self, stop: asyncio.Event) -> None:
        """Poll children until `stop`: restart crashed services with backoff, note the trainer's exit."""
        while not stop.is_set():
            self.check_children(time.monotonic())
            await asyncio.sleep(self.settings.poll_s)

    def check_children(self, now: float) -> None:
        s = self.settings
        for name, child in self.children.items():
            if self._stopping:
                return
            due = self._restart_at.get(name)
            if due is not None:
                if now >= due:
                    del self._restart_at[name]
                    child.start()
                    log.warning("service restarted", service=name, pid=child.pid, start=child.starts)
                continue
            code = child.poll() if child.proc is not None else None
            if code is None or child.proc is None:
                continue
            child.proc = None
            if child.spec.job:
                self.outcome.trainer_exit = code
                self.trainer_done.set()
                log.info("trainer finished", code=code)
                continue
            stable = now - child.started_at >= s.stable_after_s
            attempt = 1 if stable else self._crashes.get(name, 0) + 1
            self._crashes[name] = attempt
            delay = restart_delay_s(attempt, min_s=s.restart_min_s, max_s=s.restart_max_s, jitter=s.restart_jitter)
            self._restart_at[name] = now + delay
            self.outcome.restarts[name] = self.outcome.restarts.get(name, 0) + 1
            self.metrics.restarts.labels(name).inc()
            log.warning("service exited; restart scheduled", service=name, code=code, attempt=attempt,
                        delay_s=round(delay, 2), log=str(child.log_path))
            self._announce_restart(name, code, delay)
        alive = [c for c in self.children.values() if c.alive()]
        self.metrics.running.set(len(alive))
        for name, child in self.children.items():
            self.metrics.up.labels(name).set(1 if child.alive() else 0)
        self.metrics.uptime.set(now - self._started_at)
        self.metrics.mode.set(self.mode.level(now))

    def _announce_restart(self, name: str, code: int, delay_s: float) -> None:
        if self.client is None:
            return
        event = build_event("service_restarted", level=pb.TELEMETRY_LEVEL_WARNING,
                            description=f"{name} exited with code {code}; restart in {delay_s:.1f} s",
                            service=name, exit_code=str(code))
        task = asyncio.create_task(self.client.publish("telemetry", build_telemetry_packet("weatherlight",
                                                                                          events=[event])))
        task.add_done_callback(_log_publish_failure)

    # -- emergency lane ------------------------------------------------------------------------
    def emergency_consumer(self) -> Consumer:
        assert self.client is not None, "start() first"
        return Consumer(self.client, "emergency", group=self.settings.emergency_group, handler=self.on_emergency,
                        name=f"weatherlight-{self.settings.instance_id}")

    async def on_emergency(self, delivery: Delivery) -> None:
        signal_ = delivery.message_as(pb.EmergencySignal)
        self.mode.observe(signal_.level, time.monotonic())
        level = enum_name(pb.EmergencyLevel, signal_.level).removeprefix("EMERGENCY_LEVEL_").lower()
        self.metrics.signals.labels(level).inc()
        log.warning("emergency signal", level=level, origin=signal_.origin, reason=signal_.reason,
                    mode=self.mode.name(time.monotonic()))

    # -- status and shutdown -------------------------------------------------------------------
    def health(self) -> tuple[bool, Mapping[str, object]]:
        status = {n: {"pid": c.pid, "alive": c.alive(), "starts": c.starts, "port": c.port}
                  for n, c in self.children.items()}
        healthy = all(c.alive() or c.spec.job for c in self.children.values())
        return healthy, {"services": status, "mode": self.mode.name(time.monotonic()),
                         "redis": "embedded" if self.redis is not None else "external"}

    def describe(self) -> dict[str, Any]:
        """Ports, pids and logs of the fleet (written to `<var>/fleet.json` for operators and tests)."""
        return {"redis_url": self.redis_url.split("@")[-1], "var_dir": str(self.var_dir),
                "services": {n: {"pid": c.pid, "metrics": f"http://127.0.0.1:{c.port}/metrics",
                                 "log": str(c.log_path)} for n, c in self.children.items()}}

    async def shutdown(self) -> FleetOutcome:
        """Trainer first, then services in reverse start order: SIGTERM, grace, SIGKILL; then Redis."""
        self._stopping = True
        order = [c for c in self.children.values() if c.spec.job] + \
                [c for c in reversed(list(self.children.values())) if not c.spec.job]
        for child in order:
            if child.proc is None:
                continue
            graceful = await child.stop(self.settings.stop_timeout_s)
            self.outcome.graceful[child.name] = graceful
            if child.spec.job and self.outcome.trainer_exit is None:
                self.outcome.trainer_exit = child.last_exit
            if not graceful:
                log.error("service did not stop on SIGTERM; killed", service=child.name)
        if self.client is not None:
            await self.client.close()
        if self.redis is not None:
            await asyncio.to_thread(self.redis.stop)
            self.outcome.redis_stopped = not self.redis.running
        return self.outcome


def _log_publish_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and isinstance(task.exception(), PublishError):
        log.warning("weatherlight telemetry not sent", error=str(task.exception()))
